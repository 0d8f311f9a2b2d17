"""Resumable per-chunk state on disk: tensors in safetensors, metadata in JSON, every write atomic."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ChunkStore", "atomic_write_text", "write_json"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _finite(value):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, default=_json_default) + "\n")


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", run_id)


class ChunkStore:
    """``root/<run>/chunk00003.safetensors`` + ``.json``; a chunk counts as done once its JSON exists.

    ``root=None`` keeps nothing (no resume). ``fingerprint`` (the evaluation's
    inputs) is checked against the stored one so a resume never mixes runs.
    """

    def __init__(self, root: Path | None, fingerprint: dict | None = None, resume: bool = True):
        self.root = Path(root) if root is not None else None
        self.resume = resume
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "fingerprint.json"
        if fingerprint is not None:
            if resume and marker.is_file():
                stored = json.loads(marker.read_text())
                if stored != json.loads(json.dumps(_finite(fingerprint), default=_json_default)):
                    raise ValueError(f"the state in {self.root} belongs to a different evaluation "
                                     "(inputs, seed or budget differ); use another --out or resume=False")
            write_json(marker, fingerprint)

    def _paths(self, run_id: str, chunk: int) -> tuple[Path, Path]:
        folder = self.root / _safe(run_id)
        return folder / f"chunk{chunk:05d}.safetensors", folder / f"chunk{chunk:05d}.json"

    def aa_state_path(self, run_id: str, chunk: int) -> Path | None:
        if self.root is None:
            return None
        path = self.root / _safe(run_id) / f"chunk{chunk:05d}.autoattack.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a left-over state cannot be restored (see autoattack.py)
        return path

    def load(self, run_id: str, chunk: int):
        """``(tensors, meta)`` of a finished chunk, or ``None``."""
        if self.root is None or not self.resume:
            return None
        tensor_path, meta_path = self._paths(run_id, chunk)
        if not meta_path.is_file() or not tensor_path.is_file():
            return None
        return load_file(str(tensor_path)), json.loads(meta_path.read_text())

    def save(self, run_id: str, chunk: int, tensors: dict, meta: dict) -> None:
        if self.root is None:
            return
        tensor_path, meta_path = self._paths(run_id, chunk)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tensor_path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, tensor_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json(meta_path, meta)  # written last: marks the chunk complete

"""Resumable per-chunk state on disk: tensors in safetensors, metadata in JSON, every write atomic."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import write_safetensors_atomic, write_text_atomic

atomic_write_text = write_text_atomic  # the old name, kept for callers

__all__ = ["ChunkStore", "ChunkProgress", "OverlayStore", "atomic_write_text", "write_json", "json_text",
           "rng_state", "set_rng_state"]

_log = logging.getLogger(__name__)
FINGERPRINT_KEY = "fingerprint_sha256"  # in every chunk's JSON: the evaluation the chunk belongs to
_TENSORS_KEY = "tensors_file"  # in a progress JSON: which of its two tensor files it goes with


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


def json_text(obj) -> str:
    """What :func:`write_json` writes for ``obj``: indented JSON with NaN/Inf as null and tensors, sets,
    tuples and paths converted, keys in their order, a final newline."""
    return json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON (:func:`json_text`), atomically."""
    write_text_atomic(path, json_text(obj))


def rng_state(device: torch.device) -> dict:
    """The global random state (the defense draws its noise from it), as tensors to save with progress."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(tensors: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(tensors["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", run_id)


def json_value(obj):
    """``obj`` as it reads back from :func:`write_json` (lists for tuples, None for NaN, ...)."""
    return json.loads(json.dumps(_finite(obj), default=_json_default))


def _read_json_object(path: Path) -> dict:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"it holds a {type(meta).__name__}, not an object")
    return meta


def _read_stamped(tensor_path, meta_path: Path, digest: str | None, why: str):
    """``(tensors, meta)`` written with ``digest``, or ``None``: missing, unreadable (zero-byte, truncated, torn
    JSON: a warning, never an error that fails every rerun) or stamped by another evaluation (a warning).
    ``tensor_path``: a path, or a function of the JSON that names it. ``why`` starts each warning: what happens
    instead."""
    if not meta_path.is_file():
        return None
    path = None
    try:
        meta = _read_json_object(meta_path)
        path = tensor_path(meta) if callable(tensor_path) else tensor_path
        tensors = load_file(str(path))
    except Exception as exc:
        names = f"{path.name} / {meta_path.name}" if path is not None else meta_path.name
        warnings.warn(f"{why}: {names} in {meta_path.parent} cannot be read ({type(exc).__name__}: {exc})",
                      RuntimeWarning, stacklevel=3)
        return None
    if meta.get(FINGERPRINT_KEY) != digest:
        warnings.warn(f"{why}: {meta_path} belongs to another evaluation (its fingerprint differs)", RuntimeWarning,
                      stacklevel=3)
        return None
    return tensors, {k: v for k, v in meta.items() if k not in (FINGERPRINT_KEY, _TENSORS_KEY)}


class ChunkStore:
    """``root/<run>/chunk00003.safetensors`` + ``.json``; a chunk counts as done once its JSON exists.

    ``root=None`` keeps nothing (no resume). ``fingerprint`` (the evaluation's
    inputs) is checked against the stored one so a resume never mixes runs, and
    its digest is written into every chunk and checked again when the chunk is
    loaded: a chunk of another evaluation, or one that cannot be read (a
    zero-byte or truncated file, torn JSON), is recomputed with a warning naming
    it. ``resume=False`` deletes the stored state first. Only the ``owner``
    (rank 0) writes the marker or deletes state; every rank stamps and checks chunks.
    """

    def __init__(self, root: Path | None, fingerprint: dict | None = None, resume: bool = True, *,
                 owner: bool = True):
        self.root = Path(root) if root is not None else None
        self.resume = resume
        self.digest = None
        if fingerprint is not None:
            canonical = json.dumps(json_value(fingerprint), sort_keys=True, separators=(",", ":"))
            self.digest = hashlib.sha256(canonical.encode()).hexdigest()
        if self.root is None or not owner:
            return
        if not resume and self.root.exists():
            _log.info("resume=False: deleting the evaluation state in %s", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "fingerprint.json"
        if fingerprint is not None:
            if resume and marker.is_file():
                try:
                    stored = json.loads(marker.read_text())
                except ValueError:
                    stored = None  # torn: the chunks' own stamps decide what is reused
                    warnings.warn(f"unreadable {marker}; every chunk is checked against this evaluation's "
                                  "fingerprint", RuntimeWarning, stacklevel=2)
                if stored is not None and stored != json_value(fingerprint):
                    raise ValueError(f"the state in {self.root} belongs to a different evaluation "
                                     "(inputs, seed or budget differ); use another --out or resume=False")
            write_json(marker, fingerprint)

    def _paths(self, run_id: str, chunk: int) -> tuple[Path, Path]:
        folder = self.root / _safe(run_id)
        return folder / f"chunk{chunk:05d}.safetensors", folder / f"chunk{chunk:05d}.json"

    def progress(self, run_id: str, chunk: int) -> "ChunkProgress | None":
        """Where chunk ``chunk`` of ``run_id`` keeps its work in flight (``None`` when nothing is kept)."""
        if self.root is None:
            return None
        return ChunkProgress(self.root / _safe(run_id), chunk, self.digest)

    def finished(self, run_id: str, chunk: int) -> bool:
        """Whether chunk ``chunk`` of ``run_id`` has finished for this evaluation (its JSON, stamped with this
        evaluation's fingerprint, exists); reads the JSON only, not the tensors."""
        if self.root is None or not self.resume:
            return False
        _, meta_path = self._paths(run_id, chunk)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get(FINGERPRINT_KEY) == self.digest

    def load(self, run_id: str, chunk: int):
        """``(tensors, meta)`` of a finished chunk of this evaluation, or ``None`` (to be computed)."""
        if self.root is None or not self.resume:
            return None
        tensor_path, meta_path = self._paths(run_id, chunk)
        return _read_stamped(tensor_path, meta_path, self.digest, f"recomputing chunk {chunk} of {run_id!r}")

    def save(self, run_id: str, chunk: int, tensors: dict, meta: dict) -> None:
        if self.root is None:
            return
        tensor_path, meta_path = self._paths(run_id, chunk)
        write_safetensors_atomic(tensor_path, tensors)
        write_json(meta_path, {**meta, FINGERPRINT_KEY: self.digest})  # written last: marks the chunk complete
        ChunkProgress(tensor_path.parent, chunk, self.digest).clear()  # the chunk's work in flight is done


class OverlayStore:
    """Reads the chunks of ``overlay``, then of ``base``; writes only to ``overlay``; ``finished`` asks ``base``.

    A partial report reads the state of an evaluation that may still be running: its own chunks (re-scoring,
    a missing clean pass) go to the overlay, so nothing it computes enters the evaluation it reads.
    """

    def __init__(self, base: ChunkStore, overlay: ChunkStore):
        self.base, self.overlay = base, overlay

    def finished(self, run_id: str, chunk: int) -> bool:
        return self.base.finished(run_id, chunk)

    def load(self, run_id: str, chunk: int):
        return self.overlay.load(run_id, chunk) or self.base.load(run_id, chunk)

    def save(self, run_id: str, chunk: int, tensors: dict, meta: dict) -> None:
        self.overlay.save(run_id, chunk, tensors, meta)

    def progress(self, run_id: str, chunk: int) -> "ChunkProgress | None":
        return self.overlay.progress(run_id, chunk)


class ChunkProgress:
    """A chunk's work in flight (``chunk00003.progress.json`` and the tensor file it names), saved between steps.

    Saved as the chunk goes (after an attack or a batch, and inside long attacks every minute), so a chunk
    killed part-way resumes at its last save instead of starting over. Each save writes its tensors to the
    file the JSON does not name (``chunk00003.progress.0.safetensors`` or ``.1.``), then switches the JSON to it,
    then removes the other: a kill at any moment leaves the last complete save readable. Stamped with the
    evaluation's digest like a chunk; progress of another evaluation, or that cannot be read, is ignored with a
    warning (the chunk starts over). :meth:`ChunkStore.save` removes it once the chunk is done.
    """

    def __init__(self, folder: Path, chunk: int, digest: str | None):
        self.folder = Path(folder)
        self.meta_path = self.folder / f"chunk{chunk:05d}.progress.json"
        self._files = [self.folder / f"chunk{chunk:05d}.progress.{g}.safetensors" for g in (0, 1)]
        self._legacy = self.folder / f"chunk{chunk:05d}.progress.safetensors"  # saved before 2026-11-27 06:30 UTC
        self.chunk, self.digest = chunk, digest

    def _named(self, meta: dict) -> Path:
        return self.folder / meta.get(_TENSORS_KEY, self._legacy.name)

    @property
    def tensor_path(self) -> Path:
        """The tensor file of the last save (the first of the two when nothing can be read)."""
        try:
            return self._named(_read_json_object(self.meta_path))
        except Exception:  # none saved yet, or torn: the next save starts from the first file
            return self._files[0]

    def load(self):
        """``(tensors, meta)`` saved by :meth:`save` for this evaluation, or ``None``."""
        return _read_stamped(self._named, self.meta_path, self.digest,
                             f"chunk {self.chunk} starts over (its saved progress)")

    def save(self, tensors: dict, meta: dict) -> None:
        current = self.tensor_path if self.meta_path.is_file() else None
        new = self._files[1] if current == self._files[0] else self._files[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(new, tensors)
        write_json(self.meta_path, {**meta, _TENSORS_KEY: new.name, FINGERPRINT_KEY: self.digest})  # the switch
        for path in (*self._files, self._legacy):
            if path != new:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.meta_path.unlink(missing_ok=True)
        for path in (*self._files, self._legacy):
            path.unlink(missing_ok=True)

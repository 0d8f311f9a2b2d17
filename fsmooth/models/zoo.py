"""Pretrained models shipped inside the package (``fsmooth/models/weights/``), loaded offline.

Each model ``NAME`` is three files: ``NAME.safetensors`` (fp16 weights),
``NAME.json`` (checkpoint metadata: architecture, training command, epochs,
metrics, calibrated ``delta_test``) and ``NAME.log.jsonl`` (its training log).
Weights are read with safetensors; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint, save_checkpoint
from ..data import load_dataset
from ..io import write_bytes_atomic, write_json_atomic

__all__ = ["pretrained", "available_pretrained", "pretrained_meta", "pretrained_files", "export_pretrained",
           "load_classifier", "DEFAULT_PRETRAINED"]

# The demo's default: the small WRN trained on CPU with the feature-smoothing loss.
DEFAULT_PRETRAINED = "wrn-16-1-cifar10-jpeg-fs36"


def _weights_dir() -> Path:
    return Path(str(resources.files("fsmooth.models") / "weights"))


def available_pretrained() -> list[str]:
    """Names of the embedded models whose weights and metadata are both present."""
    folder = _weights_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors") if p.with_suffix(".json").is_file())


def pretrained_files(name: str) -> dict[str, Path]:
    """Paths of ``name``'s ``weights``, ``meta`` and ``log`` files."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    names = available_pretrained()
    if name not in names:
        raise ValueError(f"unknown pretrained model {name!r}; available: {names or 'none'}")
    folder = _weights_dir()
    return {"weights": folder / f"{name}.safetensors", "meta": folder / f"{name}.json",
            "log": folder / f"{name}.log.jsonl"}


def pretrained_meta(name: str) -> dict:
    """The metadata dict of embedded model ``name``."""
    return json.loads(pretrained_files(name)["meta"].read_text(encoding="utf-8"))


def pretrained(name: str = DEFAULT_PRETRAINED, device=None):
    """Embedded model ``name`` in eval mode (fp32), with ``defense_delta`` set from its calibration.

    Its metadata is available as ``model.pretrained_meta``.
    """
    model, meta = load_model(pretrained_files(name)["weights"], device=device)
    model.pretrained_meta = meta
    return model


def load_classifier(spec: str | os.PathLike | None = None, device=None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, meta)`` from an embedded model's name or a checkpoint path (any form
    :func:`fsmooth.checkpoint.resolve_checkpoint` accepts); ``None`` means :data:`DEFAULT_PRETRAINED`.

    The one loader behind ``fsmooth demo``, ``defend``, ``eval`` and ``figures``. ``ValueError`` names the
    embedded models when ``spec`` is neither one of them nor an existing path.
    """
    if spec is None:
        spec = DEFAULT_PRETRAINED
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model must be a name or a path, got {type(spec).__name__}")
    available = available_pretrained()
    if isinstance(spec, str) and spec in available:
        model = pretrained(spec, device=device)
        return model, dict(model.pretrained_meta)
    if not Path(spec).exists():
        raise ValueError(f"model {str(spec)!r} is neither an embedded model ({available or 'none installed'}) "
                         "nor an existing checkpoint path")
    return load_model(spec, device=device)


def export_pretrained(checkpoint, name: str, out_dir=None, *, data=None, log=None, subset: int = 1000,
                      notes: dict | None = None) -> dict:
    """Package a (calibrated) checkpoint as embedded model ``name``: fp16 weights, metadata, training log.

    The metadata gains ``subset_check``: the fp16 model's correct count on a fixed,
    seeded subset of ``subset`` test images of ``data`` (when given), which the test
    suite reproduces. ``out_dir`` defaults to the package's ``weights/`` folder.
    """
    model, meta = load_model(checkpoint)
    if meta.get("delta_test") is None:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is not calibrated: run `fsmooth calibrate` first")
    out_dir = Path(out_dir) if out_dir is not None else _weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, name=name, weights_dtype="float16", **(notes or {}))
    meta.pop("weights_sha256", None)
    if log is None:
        weights, _ = resolve_checkpoint(checkpoint)
        candidates = (weights.parent.parent.parent / "log.jsonl",  # <run>/checkpoints/epoch-N/model.safetensors
                      weights.with_name(f"{weights.stem}.log.jsonl"))  # an embedded model, exported again
        log = next((c for c in candidates if c.is_file()), None)
    staging = out_dir / f".{name}.staging"
    try:
        save_checkpoint(staging, model, meta, dtype=torch.float16)
        if data is not None:
            half, _ = load_model(staging)
            images, labels = load_dataset(data, "test", meta.get("dataset", "cifar10"))
            index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:subset]
            with torch.no_grad():
                pred = torch.cat([half(images[i].float() / 255).argmax(1) for i in index.split(250)])
            meta["subset_check"] = {"seed": 1234, "n": int(index.numel()), "split": "test",
                                    "correct": int((pred == labels[index]).sum()),
                                    "how": "first n of torch.randperm(N, generator=manual_seed(seed)); fp16 weights"}
        weights_bytes = (staging / "model.safetensors").read_bytes()
        meta["weights_sha256"] = hashlib.sha256(weights_bytes).hexdigest()
        # Each file is replaced atomically; the metadata, which names its weights' checksum, before the weights,
        # so that an export cut off between the two leaves a pair that load_model refuses.
        if log is not None:
            write_bytes_atomic(out_dir / f"{name}.log.jsonl", Path(log).read_bytes())
        else:  # an older export's log describes another model's training
            (out_dir / f"{name}.log.jsonl").unlink(missing_ok=True)
        write_json_atomic(out_dir / f"{name}.json", meta)
        write_bytes_atomic(out_dir / f"{name}.safetensors", weights_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta

"""Checkpoints: safetensors weights + JSON metadata, with optimizer/RNG state kept apart.

A checkpoint is a folder::

    model.safetensors   weights (any float dtype; loaded as fp32)
    meta.json           architecture, data set, training delta, epoch, metrics, delta_test, ...
    state.pt            optional training state (optimizer, scheduler, RNG states), plain tensors and
                        containers only, read back with ``torch.load(weights_only=True)``

A training run keeps its checkpoints under ``<run>/checkpoints/epoch-NNNN/``: each is
written to a temporary folder, its files and the folder are fsynced, it is renamed into
place, then ``<run>/checkpoints/latest`` is replaced atomically, so a run killed at any
instant (or a power loss) leaves the previous checkpoint intact, and the pointer never
names data that is not on disk. :func:`load_run_checkpoint` falls back to the previous
complete checkpoint when the latest one cannot be read. Nothing here unpickles arbitrary
objects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes, load_file
from torch import nn

from .io import (append_line, fsync_dir, fsync_file, public_mode, save_safetensors, write_json_atomic,
                 write_text_atomic)
from .models.wrn import WideResNet

__all__ = ["save_checkpoint", "load_model", "load_meta", "load_training_state", "resolve_checkpoint",
           "write_json_atomic", "write_text_atomic", "append_line", "save_run_checkpoint", "latest_checkpoint",
           "load_run_checkpoint", "update_meta", "model_from_meta"]
# write_json_atomic, write_text_atomic, append_line, fsync_file and fsync_dir live in fsmooth.io; they stay
# importable from here for existing callers.

_log = logging.getLogger(__name__)
FORMAT = "fsmooth-checkpoint/1"
WEIGHTS, META, STATE = "model.safetensors", "meta.json", "state.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in _unwrap(model).state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    return state


def save_checkpoint(path_dir: str | os.PathLike, model: nn.Module, meta: dict, *, optimizer=None, scheduler=None,
                    extra_state: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint folder ``path_dir`` atomically (temp folder + rename); returns its path.

    ``meta`` must be JSON-serialisable; the model's ``config`` (WRN depth, width,
    ...) is added as ``model_config``. ``dtype`` (e.g. ``torch.float16``) casts the
    stored float weights. Optimizer/scheduler state and ``extra_state`` go to
    ``state.pt``. An existing ``path_dir`` is replaced.
    """
    path_dir = Path(path_dir)
    path_dir.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("format", FORMAT)
    config = getattr(_unwrap(model), "config", None)
    if config is not None:
        meta.setdefault("model_config", dict(config))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path_dir.name}.", dir=path_dir.parent))
    public_mode(tmp, 0o777)
    try:
        save_safetensors(tmp / WEIGHTS, _state_dict(model, dtype), metadata={"format": FORMAT})
        fsync_file(tmp / WEIGHTS)
        if optimizer is not None or scheduler is not None or extra_state:
            state = dict(extra_state or {})
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            if scheduler is not None:
                state["scheduler"] = scheduler.state_dict()
            torch.save(state, tmp / STATE)
            fsync_file(tmp / STATE)
        write_json_atomic(tmp / META, meta)  # fsyncs the file and the temporary folder's entries
        if path_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path_dir.name}.old.", dir=path_dir.parent))
            os.replace(path_dir, old / "x")
            os.replace(tmp, path_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path_dir)
        fsync_dir(path_dir.parent)  # the rename is durable before anything (a pointer) names the folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path_dir


def save_run_checkpoint(run_dir: str | os.PathLike, epoch: int, model: nn.Module, meta: dict, *,
                        keep: int = 2, **kwargs) -> Path:
    """Save ``<run>/checkpoints/epoch-NNNN``, point ``<run>/checkpoints/latest`` at it, prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    path = save_checkpoint(root / name, model, meta, **kwargs)
    write_json_atomic(root / "latest", {"checkpoint": name, "epoch": epoch})
    existing = _epoch_folders(root)[::-1]  # oldest first, by number (epoch-10000 after epoch-9999)
    for old in existing[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    # The temporary folders of a save killed part-way (save_checkpoint's ".epoch-NNNN.*"): never read, and each
    # as large as a checkpoint. One process writes a run's checkpoints, so none of them is in use now.
    for stale in root.glob(".epoch-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return path


def _epoch_folders(root: Path) -> list[Path]:
    """``epoch-NNNN`` folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        number = path.name[len("epoch-"):]
        if path.is_dir() and path.name.startswith("epoch-") and number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found, reverse=True)]


def _read_run_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """``(weights, training state, meta)`` of one run checkpoint; raises if any part is missing or unreadable."""
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{META} holds a {type(meta).__name__}, not an object")
    weights = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    missing = [key for key in ("epoch", "optimizer", "scheduler", "rng") if not isinstance(state, dict)
               or key not in state]
    if missing:
        raise ValueError(f"{STATE} lacks {missing}")
    if meta.get("epoch") is not None and meta["epoch"] != state["epoch"]:
        raise ValueError(f"{META} says epoch {meta['epoch']} but {STATE} epoch {state['epoch']}")
    return weights, state, meta


def load_run_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict, dict, dict] | None:
    """``(folder, weights, training state, meta)`` of a run's newest complete checkpoint; ``None`` if it has none.

    Tries the checkpoint ``<run>/checkpoints/latest`` names, then the older ones,
    newest first (all of them when the pointer itself is unreadable). Each one
    that cannot be read completely (a zero-byte or truncated file, torn JSON) is
    skipped with a :class:`RuntimeWarning` naming it. Raises ``ValueError`` when
    checkpoints exist but none is readable.
    """
    root = Path(run_dir) / "checkpoints"
    folders = _epoch_folders(root)
    pointer = root / "latest"
    if pointer.is_file():
        try:
            named = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
            epoch = int(named[len("epoch-"):])
        except (ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"checkpoint pointer {str(pointer)!r} is unreadable ({exc}); trying every checkpoint "
                          "of the run, newest first", RuntimeWarning, stacklevel=2)
        else:
            # Folders newer than the pointer were renamed into place but never made current.
            folders = [p for p in folders if int(p.name[len("epoch-"):]) <= epoch]
            if not folders or folders[0].name != named:
                warnings.warn(f"checkpoint pointer {str(pointer)!r} names {named!r}, which is missing",
                              RuntimeWarning, stacklevel=2)
    elif not folders:
        return None
    failures = []
    for path in folders:
        try:
            weights, state, meta = _read_run_checkpoint(path)
        except Exception as exc:  # any damage means: not this one
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
            warnings.warn(f"checkpoint {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); "
                          "falling back to the previous one", RuntimeWarning, stacklevel=2)
            continue
        return path, weights, state, meta
    raise ValueError(f"no readable checkpoint in {str(root)!r}: " + ("; ".join(failures) or "none left"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``<run>/checkpoints/latest`` points at, or ``None`` if there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt checkpoint pointer {str(pointer)!r}: {exc}") from exc
    path = pointer.parent / name
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"checkpoint pointer {str(pointer)!r} names {name!r}, which has no {WEIGHTS}")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights file, meta file)`` for a checkpoint folder, a run folder or a ``.safetensors`` file.

    For ``NAME.safetensors`` the metadata is ``meta.json`` beside it or ``NAME.json``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            latest = latest_checkpoint(path)
            if latest is None:
                raise ValueError(f"{str(path)!r} is neither a checkpoint folder ({WEIGHTS}) nor a run folder")
            path = latest
        weights, meta = path / WEIGHTS, path / META
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint {str(path)!r} must be a folder or a .safetensors file")
        weights = path
        meta = path.with_suffix(".json") if path.name != WEIGHTS else path.parent / META
    if not meta.is_file():
        raise FileNotFoundError(f"checkpoint metadata {str(meta)!r} is missing")
    return weights, meta


def load_meta(path: str | os.PathLike) -> dict:
    """The metadata dict of a checkpoint (any form :func:`resolve_checkpoint` accepts)."""
    _, meta = resolve_checkpoint(path)
    try:
        value = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"corrupt checkpoint metadata {str(meta)!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint metadata {str(meta)!r} must hold a JSON object, got a {type(value).__name__}")
    return value


def update_meta(path: str | os.PathLike, **changes) -> dict:
    """Merge ``changes`` into a checkpoint's metadata (atomic rewrite); returns the new dict."""
    _, meta_path = resolve_checkpoint(path)
    meta = load_meta(path)
    meta.update(changes)
    write_json_atomic(meta_path, meta)
    return meta


def model_from_meta(meta: dict) -> nn.Module:
    """An untrained model of the architecture ``meta`` describes."""
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise ValueError("checkpoint metadata has no 'model_config'")
    allowed = {"depth", "width", "num_classes", "dropout"}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"checkpoint model_config has unknown keys {sorted(unknown)}")
    for key, value in config.items():
        kinds = (int, float) if key == "dropout" else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "a number" if key == "dropout" else "an integer"
            raise ValueError(f"checkpoint model_config {key!r} must be {kind}, got {value!r}")
    return WideResNet(**config)


def load_model(path: str | os.PathLike, device=None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, meta)`` from a checkpoint, with its calibrated defense settings attached.

    ``model.defense_defaults`` gets the calibration's ``{"sigma", "beta", "delta"}``
    (``meta["defense"]``, written by ``fsmooth calibrate``) and ``model.defense_delta``
    its ``delta_test``; :meth:`fsmooth.DefenseConfig.for_model` reads them.

    Weights are read with safetensors (no pickle) and cast to fp32.
    """
    weights, _ = resolve_checkpoint(path)
    meta = load_meta(path)
    model = model_from_meta(meta)
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read weights {str(weights)!r}: {type(exc).__name__}: {exc}") from exc
    expected = meta.get("weights_sha256")  # written by export_pretrained
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"weights {str(weights)!r} are not the ones their metadata names (weights_sha256 "
                         "differs): an export cut off between its files, or files mixed by hand")
    try:
        state = load_safetensors_bytes(data)
    except Exception as exc:
        raise ValueError(f"cannot read weights {str(weights)!r}: {type(exc).__name__}: {exc}") from exc
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights {str(weights)!r} do not match {meta.get('model_config')}: {exc}") from exc
    model.eval()
    if meta.get("delta_test") is not None:
        model.defense_delta = float(meta["delta_test"])
    defense = meta.get("defense")
    if defense is not None:
        if not isinstance(defense, dict):
            raise ValueError(f"checkpoint metadata 'defense' must be an object, got {type(defense).__name__}")
        model.defense_defaults = {k: float(defense[k]) for k in ("sigma", "beta", "delta")
                                  if defense.get(k) is not None}
    if device is not None:
        model.to(device)
    return model, meta


def load_training_state(path: str | os.PathLike) -> dict:
    """``state.pt`` of a checkpoint folder, loaded with ``weights_only=True``."""
    weights, _ = resolve_checkpoint(path)
    state_file = weights.parent / STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {str(weights.parent)!r} has no training state ({STATE})")
    return torch.load(state_file, map_location="cpu", weights_only=True)

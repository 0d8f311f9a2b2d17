"""Resumable per-chunk state on disk: tensors in safetensors, metadata in JSON, every write atomic."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..io import write_safetensors_atomic, write_text_atomic

atomic_write_text = write_text_atomic  # the old name, kept for callers

__all__ = ["ChunkStore", "ChunkProgress", "ChunkedData", "OverlayStore", "atomic_write_text", "write_json",
           "json_text", "rng_state", "set_rng_state", "tensor_checksum"]

_log = logging.getLogger(__name__)
FINGERPRINT_KEY = "fingerprint_sha256"  # in every chunk's JSON: the evaluation the chunk belongs to
_TENSORS_KEY = "tensors_file"  # in a progress JSON: which of its two tensor files it goes with
_RUN_KEY = "run"  # in a chunk's or a progress JSON since 2026-11-29: the run id its folder holds (for reports)
_LEGACY_KEY = "legacy_stamps"  # in fingerprint.json: stamps of chunks written before per-chunk stamps, still good
_IMAGES_KEY = "images"  # in fingerprint.json: how many images the evaluation that wrote it had


def tensor_checksum(*tensors) -> str:
    """A short sha256 of the tensors' bytes (on the CPU, contiguous), in order: what chunks are stamped with."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def _recorded_run(folder: Path) -> str:
    """The run id that ``folder``'s chunk or progress JSONs record, else the folder's name."""
    for path in sorted(folder.glob("chunk*.json")):
        try:
            run = _read_json_object(path).get(_RUN_KEY)
        except (OSError, ValueError):
            continue
        if isinstance(run, str) and _safe(run) == folder.name:
            return run
    return folder.name


def json_value(obj):
    """``obj`` as it reads back from :func:`write_json` (lists for tuples, None for NaN, ...)."""
    return json.loads(json.dumps(_finite(obj), default=_json_default))


def _read_json_object(path: Path) -> dict:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"it holds a {type(meta).__name__}, not an object")
    return meta


def _read_stamped(tensor_path, meta_path: Path, accepted: tuple, why: str):
    """``(tensors, meta)`` stamped with one of the ``accepted`` digests, or ``None``: missing, unreadable
    (zero-byte, truncated, torn JSON: a warning, never an error that fails every rerun) or stamped by another
    evaluation (a warning). ``tensor_path``: a path, or a function of the JSON that names it. ``why`` starts each
    warning: what happens instead."""
    if not meta_path.is_file():
        return None
    path = None
    try:
        meta = _read_json_object(meta_path)
        path = tensor_path(meta) if callable(tensor_path) else tensor_path
        tensors = load_file(str(path))
    except Exception as exc:
        if path is not None and isinstance(exc, FileNotFoundError):
            # Not damage: results/ commits a finished chunk's record without its (large) tensors, so a clone
            # holds the JSON alone (results/PLAN.md says which commit brings them back).
            what = f"{meta_path.name} is here but its tensors {path.name} are not (left out of the tree, or deleted)"
        else:
            names = f"{path.name} / {meta_path.name}" if path is not None else meta_path.name
            what = f"{names} cannot be read ({type(exc).__name__}: {exc})"
        warnings.warn(f"{why}: {what}, in {meta_path.parent}", RuntimeWarning, stacklevel=3)
        return None
    if meta.get(FINGERPRINT_KEY) not in accepted:
        warnings.warn(f"{why}: {meta_path} belongs to another evaluation (its fingerprint differs)", RuntimeWarning,
                      stacklevel=3)
        return None
    return tensors, {k: v for k, v in meta.items() if k not in (FINGERPRINT_KEY, _TENSORS_KEY, _RUN_KEY)}


def _digest(fingerprint) -> str:
    canonical = json.dumps(json_value(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ChunkedData:
    """The evaluated images as the store stamps them: one checksum per chunk, so that a chunk's stamp covers its
    own images only and an evaluation rerun on more (or fewer) images reuses every chunk whose images are
    unchanged.

    ``chunk_size``: images per chunk (the last may hold fewer); ``prefix_checksum(k)``: the checksum of the first
    ``k`` images as state written before per-chunk stamps (2026-11-27, 22:00 UTC) recorded it for all its images,
    to adopt that state.
    """

    checksums: tuple[str, ...]
    chunk_size: int
    images: int
    prefix_checksum: Callable[[int], str]

    def __post_init__(self):
        if len(self.checksums) != -(-self.images // self.chunk_size):
            raise ValueError(f"ChunkedData: {len(self.checksums)} checksums for {self.images} images in chunks of "
                             f"{self.chunk_size}")

    def hi(self, chunk: int) -> int:
        """Where chunk ``chunk`` ends."""
        return min((chunk + 1) * self.chunk_size, self.images)


class ChunkStore:
    """``root/<run>/chunk00003.safetensors`` + ``.json``; a chunk counts as done once its JSON exists.

    ``root=None`` keeps nothing (no resume). ``fingerprint`` (the evaluation's inputs) is checked against the
    stored one so a resume never mixes runs, and a digest of it is written into every chunk and checked again
    when the chunk is loaded: a chunk of another evaluation, or one that cannot be read (a zero-byte or
    truncated file, torn JSON), is recomputed with a warning naming it. ``resume=False`` deletes the stored state
    first. Only the ``owner`` (rank 0) writes the marker or deletes state; every rank stamps and checks chunks.

    With ``data`` (:class:`ChunkedData`; ``fingerprint["data"]`` is then its list of checksums) each chunk's
    digest covers the rest of the fingerprint and that chunk's images only, so the number of images may change
    between runs: the stored and new checksums must agree on every chunk full in both (the marker records how
    many images wrote it), and the chunks whose images are unchanged are reused. State written before per-chunk
    stamps (one digest over all its images) is adopted when its images are the first ``k`` new ones (``k``: where
    one of its chunks ends, or any chunk's end here): its chunks within them stay good (``legacy_stamps`` in
    ``fingerprint.json``).
    """

    def __init__(self, root: Path | None, fingerprint: dict | None = None, resume: bool = True, *,
                 owner: bool = True, data: ChunkedData | None = None):
        self.root = Path(root) if root is not None else None
        self.resume = resume
        self.fingerprint = json_value(fingerprint) if fingerprint is not None else None
        self.data = data
        if data is not None and (fingerprint is None or self.fingerprint.get("data") != list(data.checksums)):
            raise ValueError("ChunkStore: fingerprint['data'] must be data.checksums when data is given")
        self.digest = _digest(self.fingerprint) if fingerprint is not None else None
        self._legacy: list | None = None  # [{"sha256", "chunks"}]; read from the marker when first needed
        if self.root is None or not owner:
            return
        if not resume and self.root.exists():
            _log.info("resume=False: deleting the evaluation state in %s", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "fingerprint.json"
        if fingerprint is None:
            return
        self._legacy = []
        if resume and marker.is_file():
            try:
                stored = json.loads(marker.read_text())
            except ValueError:
                stored = None  # torn: the chunks' own stamps decide what is reused; kept aside, not overwritten
                marker.replace(marker.with_name("fingerprint.unreadable.json"))
                warnings.warn(f"unreadable {marker} (kept as fingerprint.unreadable.json); every chunk is checked "
                              "against this evaluation's fingerprint", RuntimeWarning, stacklevel=2)
            if stored is not None:
                self._legacy = self._adopt(stored)
        written = dict(self.fingerprint)
        if data is not None:
            written[_IMAGES_KEY] = data.images
        if self._legacy:
            written[_LEGACY_KEY] = self._legacy
        write_json(marker, written)

    def _different(self, why: str = "inputs, seed or budget differ") -> ValueError:
        return ValueError(f"the state in {self.root} belongs to a different evaluation ({why}); use another --out "
                          "or resume=False")

    def _adopt(self, stored) -> list:
        """The legacy stamps still good for this evaluation, from the stored marker; raises when it belongs to
        another evaluation."""
        if not isinstance(stored, dict):
            raise self._different()
        stored = dict(stored)
        legacy = stored.pop(_LEGACY_KEY, [])
        images = stored.pop(_IMAGES_KEY, None)
        old, new = stored.get("data"), self.fingerprint.get("data")
        if self.data is None or {k: v for k, v in stored.items() if k != "data"} != \
                {k: v for k, v in self.fingerprint.items() if k != "data"}:
            if stored != self.fingerprint:
                raise self._different()
            return legacy
        if isinstance(old, list):  # per-chunk checksums: each chunk full in both must hold the same images
            size = self.data.chunk_size
            old_n = images if isinstance(images, int) else (len(old) - 1) * size  # unrecorded: its last may be short
            for c, (a, b) in enumerate(zip(old, new)):
                if a != b and (c + 1) * size <= min(old_n, self.data.images):
                    raise self._different(f"chunk {c} holds other images")
            return legacy
        k = self._legacy_images(stored, old)
        if k is None:
            raise self._different("its images are not the first images of these: state saved before per-chunk "
                                  "stamps can only grow")
        kept = [checksum for c, checksum in enumerate(self.data.checksums) if self.data.hi(c) <= k]
        _log.info("adopting the state in %s written before per-chunk stamps: its %d images are the first of "
                  "these, %d chunks stay good", self.root, k, len(kept))
        return [{"sha256": _digest(stored), "chunks": kept}] if kept else []

    def _legacy_images(self, stored: dict, checksum) -> int | None:
        """How many of the first images the legacy state ``stored`` (one checksum over all its images) was
        written for, or ``None`` when no image count its chunks name (nor this evaluation's) matches."""
        digest = _digest(stored)
        named = set()  # where its finished chunks end: the count is most likely the largest
        for meta_path in self.root.glob("*/chunk[0-9][0-9][0-9][0-9][0-9].json"):
            try:
                meta = _read_json_object(meta_path)
            except (OSError, ValueError):
                continue
            if meta.get(FINGERPRINT_KEY) == digest and isinstance(meta.get("hi"), int):
                named.add(meta["hi"])
        n = self.data.images
        ends = {self.data.hi(c) for c in range(len(self.data.checksums))}  # a run that finished no last chunk
        for k in [*sorted(named | {n}, reverse=True), *sorted(ends - named - {n}, reverse=True)]:
            if 0 < k <= n and self.data.prefix_checksum(k) == checksum:
                return k
        return None

    def stamp(self, chunk: int) -> str | None:
        """The digest written into chunk ``chunk``'s files: the fingerprint's, with only that chunk's images."""
        if self.data is None or not 0 <= chunk < len(self.data.checksums):
            return self.digest
        return _digest({**self.fingerprint, "data": self.data.checksums[chunk]})

    def accepted(self, chunk: int) -> tuple:
        """The digests a stored chunk ``chunk`` (or its progress) may carry to be reused: its :meth:`stamp`, and a
        legacy stamp whose record holds this chunk's images."""
        if self._legacy is None:  # a rank that did not write the marker reads it (after the owner has)
            try:
                self._legacy = json.loads((self.root / "fingerprint.json").read_text()).get(_LEGACY_KEY, [])
            except (TypeError, OSError, ValueError, AttributeError):  # no root, no marker, torn, not an object
                self._legacy = []
        mine = self.data.checksums[chunk] if self.data is not None and 0 <= chunk < len(self.data.checksums) \
            else None
        return (self.stamp(chunk), *(entry["sha256"] for entry in self._legacy
                                     if mine is not None and chunk < len(entry["chunks"])
                                     and entry["chunks"][chunk] == mine))

    def _paths(self, run_id: str, chunk: int) -> tuple[Path, Path]:
        folder = self.root / _safe(run_id)
        return folder / f"chunk{chunk:05d}.safetensors", folder / f"chunk{chunk:05d}.json"

    def other_runs(self, run_ids) -> list[str]:
        """The attack or clean runs other than ``run_ids`` whose state holds a finished chunk or work in flight
        (re-scoring left aside): what a partial report on ``run_ids`` does not show. Each is named by the run id
        its chunks record, or by its state folder when they record none (saved before 2026-11-29)."""
        if self.root is None or not self.root.is_dir():
            return []
        mine = {_safe(r) for r in run_ids}
        return sorted(_recorded_run(p) for p in self.root.iterdir()
                      if p.is_dir() and p.name not in mine and not p.name.startswith("rescore_")
                      and any(p.glob("chunk*.json")))

    def progress(self, run_id: str, chunk: int) -> "ChunkProgress | None":
        """Where chunk ``chunk`` of ``run_id`` keeps its work in flight (``None`` when nothing is kept)."""
        if self.root is None:
            return None
        return ChunkProgress(self.root / _safe(run_id), chunk, self.stamp(chunk), self.accepted(chunk), run_id=run_id)

    def finished(self, run_id: str, chunk: int) -> dict | None:
        """The JSON of chunk ``chunk`` of ``run_id`` if it has finished for this evaluation (stamped for this
        evaluation), else ``None``; reads the JSON only, not the tensors."""
        if self.root is None or not self.resume:
            return None
        _, meta_path = self._paths(run_id, chunk)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get(FINGERPRINT_KEY) in self.accepted(chunk) else None

    def load(self, run_id: str, chunk: int):
        """``(tensors, meta)`` of a finished chunk of this evaluation, or ``None`` (to be computed)."""
        if self.root is None or not self.resume:
            return None
        tensor_path, meta_path = self._paths(run_id, chunk)
        if self.data is not None and 0 <= chunk < len(self.data.checksums):
            try:
                held = _read_json_object(meta_path).get("hi")
            except (OSError, ValueError):
                held = None
            if isinstance(held, int) and held != self.data.hi(chunk):  # the evaluation ran on other n
                lo, hi = chunk * self.data.chunk_size, self.data.hi(chunk)
                _log.info("recomputing chunk %d of %r: it held images %d to %d, it holds %d to %d now", chunk,
                          run_id, lo, held - 1, lo, hi - 1)
                return None
        return _read_stamped(tensor_path, meta_path, self.accepted(chunk), f"recomputing chunk {chunk} of {run_id!r}")

    def save(self, run_id: str, chunk: int, tensors: dict, meta: dict) -> None:
        if self.root is None:
            return
        tensor_path, meta_path = self._paths(run_id, chunk)
        write_safetensors_atomic(tensor_path, tensors)
        # written last: marks the chunk complete
        write_json(meta_path, {**meta, _RUN_KEY: run_id, FINGERPRINT_KEY: self.stamp(chunk)})
        self.progress(run_id, chunk).clear()  # the chunk's work in flight is done


class OverlayStore:
    """Reads the chunks of ``overlay``, then of ``base``; writes only to ``overlay``; ``finished`` asks ``base``.

    A partial report reads the state of an evaluation that may still be running: its own chunks (re-scoring,
    a missing clean pass) go to the overlay, so nothing it computes enters the evaluation it reads.
    """

    def __init__(self, base: ChunkStore, overlay: ChunkStore):
        self.base, self.overlay = base, overlay

    def finished(self, run_id: str, chunk: int) -> dict | None:
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

    def __init__(self, folder: Path, chunk: int, digest: str | None, accepted: tuple | None = None,
                 run_id: str | None = None):
        self.folder, self.run_id = Path(folder), run_id
        self.meta_path = self.folder / f"chunk{chunk:05d}.progress.json"
        self._files = [self.folder / f"chunk{chunk:05d}.progress.{g}.safetensors" for g in (0, 1)]
        self._legacy = self.folder / f"chunk{chunk:05d}.progress.safetensors"  # saved before 2026-11-27 06:30 UTC
        self.chunk, self.digest = chunk, digest
        self.accepted = (digest,) if accepted is None else tuple(accepted)  # the stamps it may resume from

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
        return _read_stamped(self._named, self.meta_path, self.accepted,
                             f"chunk {self.chunk} starts over (its saved progress)")

    def save(self, tensors: dict, meta: dict) -> None:
        current = self.tensor_path if self.meta_path.is_file() else None
        new = self._files[1] if current == self._files[0] else self._files[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(new, tensors)
        named = {_RUN_KEY: self.run_id} if self.run_id is not None else {}
        # the switch
        write_json(self.meta_path, {**meta, **named, _TENSORS_KEY: new.name, FINGERPRINT_KEY: self.digest})
        for path in (*self._files, self._legacy):
            if path != new:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.meta_path.unlink(missing_ok=True)
        for path in (*self._files, self._legacy):
            path.unlink(missing_ok=True)

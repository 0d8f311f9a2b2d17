"""CIFAR-style data sets as uint8 tensors, a decode cache, and a device-resident loader.

Sources (``load_dataset(source, split)``):

* the torchvision layout: a folder holding (or being) ``cifar-10-batches-py`` or
  ``cifar-100-python``; the pickles are read with a restricted unpickler that only
  rebuilds numpy arrays, so a tampered file cannot run code;
* an ImageFolder tree ``<root>/<split>/<class>/<image>``;
* a ``.tar.gz`` (or ``.tar``) of such a tree, e.g. the CIFAR-10 JPEG q75 copy.

Images are decoded once to ``uint8 (N, 3, H, W)`` with ``int64`` labels and cached
under ``$FSMOOTH_CACHE`` (default ``~/.cache/fsmooth``) in a safetensors file
keyed by a checksum of the source (sha256 of archive/pickle bytes; for an image
folder, of every file's path, size and mtime). Cache files are written to a
temporary name and renamed, so an interrupted decode never leaves a half cache.

:class:`DeviceLoader` keeps a whole split on the training device and does the
random crop (4-pixel zero padding) and horizontal flip there with one gather,
so training is never bound by Python data loading.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .io import write_safetensors_atomic

__all__ = ["load_dataset", "evaluation_order", "synthetic_dataset", "DeviceLoader", "augment", "resolve_source",
           "cache_dir", "DATASETS", "DATASET_NAMES", "CIFAR10_CLASSES", "DataError"]

_log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = {"cifar10": 10, "cifar100": 100}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}  # as tables and logs print them
SPLITS = ("train", "test")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_CACHE_VERSION = 2  # 2: class folders in natural order (numbers in names by value)
# A CIFAR image is a few kilobytes: a member above this is not an image of these data sets, and reading it
# whole into memory (as every member is) could exhaust it.
MAX_IMAGE_BYTES = 16 << 20
_TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class DataError(ValueError):
    """A data source that is missing, corrupt or laid out wrongly (the message names the path)."""


# --------------------------------------------------------------------------- locations


def resolve_source(source: str | os.PathLike | None) -> Path:
    """``source``, or ``$FSMOOTH_DATA`` when ``None``; must exist."""
    if source is None:
        source = os.environ.get("FSMOOTH_DATA")
        if not source:
            raise DataError("no data source: pass --data PATH (or source=...) or set FSMOOTH_DATA")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    return path


def cache_dir() -> Path:
    """Where decoded data sets are cached: ``$FSMOOTH_CACHE`` or ``~/.cache/fsmooth``."""
    return Path(os.environ.get("FSMOOTH_CACHE") or Path.home() / ".cache" / "fsmooth").expanduser()


def _sha256_file(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def _fingerprint(kind: str, path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256(f"{kind}:{_CACHE_VERSION}".encode())
    for file in files:
        if kind == "folder":
            st = file.stat()
            digest.update(f"{file.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            digest.update(file.name.encode())
            _sha256_file(file, digest)
    return digest.hexdigest()


# --------------------------------------------------------------------------- public entry point


def load_dataset(source: str | os.PathLike | None, split: str, dataset: str = "cifar10", *,
                 use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, H, W), labels int64 (N,))`` of ``split`` ("train"/"test") from ``source``.

    ``dataset`` ("cifar10" or "cifar100") fixes the number of classes the source must have.
    Raises :class:`DataError` (a ``ValueError``) naming the path for a missing,
    truncated or corrupt source, a wrong class layout or a missing split.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = resolve_source(source)
    kind, files = _detect(path, dataset)
    key = _fingerprint(kind, path, files)
    cached = cache_dir() / f"{dataset}-{split}-{key[:24]}.safetensors"
    if use_cache and cached.is_file():
        try:
            return _read_cache(cached)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            _log.warning("ignoring unreadable cache %s (%s); decoding again", cached, exc)
    if kind == "torchvision":
        images, labels = _read_torchvision(files, split, dataset)
    elif kind == "tar":
        images, labels = _read_tar(path, split, dataset)
    else:
        images, labels = _read_folder(path, split, dataset)
    if use_cache:
        _write_cache(cached, images, labels, str(path))
    return images, labels


def _detect(path: Path, dataset: str) -> tuple[str, list[Path]]:
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            return "tar", [path]
        raise DataError(f"data source {str(path)!r} is a file but not a .tar.gz/.tar archive")
    folder = _TORCHVISION_DIRS[dataset]
    candidate = path if path.name == folder else path / folder
    if candidate.is_dir():
        names = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if dataset == "cifar10"
                 else ["train", "test"])
        missing = [n for n in names if not (candidate / n).is_file()]
        if missing:
            raise DataError(f"torchvision {dataset} folder {str(candidate)!r} lacks {missing}")
        return "torchvision", [candidate / n for n in names]
    other = [d for k, d in _TORCHVISION_DIRS.items() if k != dataset and ((path / d).is_dir() or path.name == d)]
    if other:
        raise DataError(f"{str(path)!r} holds {other[0]!r}, not the {dataset} data ({folder!r})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{str(path)!r} holds neither {folder!r} nor an ImageFolder tree (split/class/image)")
    return "folder", files


# --------------------------------------------------------------------------- cache


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["images"], tensors["labels"]


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    try:
        write_safetensors_atomic(path, {"images": images, "labels": labels},
                                 metadata={"source": source, "version": str(_CACHE_VERSION)})
    except OSError as exc:  # caching is an optimisation: a read-only home must not stop training
        _log.warning("could not write the data cache %s: %s", path, exc)


# --------------------------------------------------------------------------- torchvision pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and numpy arrays: nothing that can run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "object"),
        ("builtins", "object"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2; only builds a bytes object
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a numpy array")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"cannot read CIFAR pickle {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR pickle {str(path)!r} does not hold a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_torchvision(files: list[Path], split: str, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "cifar10":
        chosen = [f for f in files if (f.name == "test_batch") == (split == "test")]
        label_key = "labels"
    else:
        chosen = [f for f in files if f.name == split]
        label_key = "fine_labels"
    images, labels = [], []
    for file in chosen:
        entry = _load_pickle(file)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"CIFAR pickle {str(file)!r} lacks 'data' or {label_key!r}")
        data = np.asarray(entry["data"])
        lab = np.asarray(entry[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(f"CIFAR pickle {str(file)!r} has data {data.dtype}{data.shape} and "
                            f"{len(lab)} labels; expected uint8 (N, 3072) and N labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    images, labels = torch.cat(images), torch.cat(labels)
    _check_labels(labels, DATASETS[dataset], str(files[0].parent))
    return images, labels


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels in {where!r} fall outside [0, {num_classes})")


# --------------------------------------------------------------------------- image folders / archives


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image  # optional (Pillow): only image-folder and JPEG sources need it
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"cannot decode image {where!r}: {type(exc).__name__}: {exc}") from exc


def _natural_key(name: str) -> tuple:
    """Sort key that reads digit runs as numbers: "class2" before "class10", "7" before "10"."""
    return tuple((0, int(part), "") if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", name))


def _class_order(names: list[str], split: str, dataset: str, where: str) -> list[str]:
    """The class folders in label order: natural order (numbers in names by value), which is CIFAR-10's and
    CIFAR-100's own label order for their class names and the numeric order for numbered folders. CIFAR-10
    folders with other names are labelled in that order too, with a warning: a CIFAR-10 model's labels
    follow its class names, which the folders do not name."""
    expected = DATASETS[dataset]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    if len(names) != expected:
        raise DataError(f"{where!r} split {split!r} has {len(names)} class folders ({shown}); "
                        f"{dataset} needs {expected}")
    ordered = sorted(names, key=_natural_key)
    numbered = all(n.isdecimal() for n in names)
    if numbered and [int(n) for n in ordered] != list(range(expected)):
        raise DataError(f"{where!r} split {split!r} has numbered class folders ({shown}) that are not "
                        f"0 to {expected - 1}")
    if dataset == "cifar10" and not numbered and set(names) != set(CIFAR10_CLASSES):
        _log.warning("%s split %r: class folders %s are not CIFAR-10's class names %s; labels 0-9 follow the "
                     "folders' order, which a model trained on CIFAR-10 does not know", where, split, ordered,
                     list(CIFAR10_CLASSES))
    return ordered


def _check_other_split(classes: list[str], other: set[str] | None, split: str, where: str) -> None:
    """The source's other split, where it has one, must hold the same class folders (else their labels
    differ between the splits)."""
    if not other or other == set(classes):
        return
    only_here, only_there = sorted(set(classes) - other), sorted(other - set(classes))
    raise DataError(f"{where!r}: split {split!r} and the other split name different class folders "
                    f"(only in {split!r}: {only_here}; only in the other: {only_there})")


def _assemble(entries: dict[str, list[tuple[str, bytes]]], split: str, dataset: str, where: str,
              other_classes: set[str] | None = None):
    """entries: class name -> [(name, encoded bytes)]; returns stacked tensors in (label, name) order.
    other_classes: the class folders of the source's other split, where it has one."""
    if not entries:
        raise DataError(f"split {split!r} not found in {where!r} (expected {split}/<class>/<image>)")
    classes = _class_order(sorted(entries), split, dataset, where)
    _check_other_split(classes, other_classes, split, where)
    images, labels, shape = [], [], None
    for index, cls in enumerate(classes):
        for name, data in sorted(entries[cls]):
            array = _decode(data, f"{where}:{name}" if not os.path.isabs(name) else name)
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise DataError(f"image {name!r} in {where!r} is {array.shape[1]}x{array.shape[0]}, "
                                f"the others {shape[1]}x{shape[0]}")
            images.append(array)
            labels.append(index)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)


def _split_parts(relative: str) -> tuple[str, str] | None:
    """``(split, class)`` of ``[top/]split/class/file``; ``None`` for anything else."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if len(parts) == 3:
        return parts[0], parts[1]
    if len(parts) == 4:  # one wrapping folder, e.g. "cifar10/train/cat/0001.jpg"
        return parts[1], parts[2]
    return None


def _check_image_size(size: int, where: str) -> None:
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"image {where!r} is {size} bytes, more than the {MAX_IMAGE_BYTES} bytes an image of "
                        "these data sets can be (fsmooth.data.MAX_IMAGE_BYTES); is this the right archive?")


def _read_tar(path: Path, split: str, dataset: str):
    entries: dict[str, list[tuple[str, bytes]]] = {}
    other: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.lower().endswith(_IMAGE_EXTENSIONS):
                    continue
                parts = _split_parts(member.name)
                if parts is not None and parts[0] in SPLITS and parts[0] != split:
                    other.add(parts[1])
                if parts is None or parts[0] != split:
                    continue
                _check_image_size(member.size, f"{path}:{member.name}")  # before reading it into memory
                handle = archive.extractfile(member)
                entries.setdefault(parts[1], []).append((member.name, handle.read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"cannot read archive {str(path)!r} (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc}") from exc
    return _assemble(entries, split, dataset, str(path), other)


def _read_folder(path: Path, split: str, dataset: str):
    root = path / split
    if not root.is_dir():
        raise DataError(f"split {split!r} not found: {str(root)!r} is not a folder")
    entries: dict[str, list[tuple[str, bytes]]] = {}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in cls_dir.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_EXTENSIONS]
        for f in files:
            _check_image_size(f.stat().st_size, str(f))
        entries[cls_dir.name] = [(str(f), f.read_bytes()) for f in files]
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS]
    if loose:
        raise DataError(f"{str(root)!r} holds images outside class folders (e.g. {loose[0]!r})")
    empty = [c for c, items in entries.items() if not items]
    if empty:
        raise DataError(f"class folder {str(root / empty[0])!r} holds no images")
    other_root = path / next(s for s in SPLITS if s != split)
    other = ({p.name for p in other_root.iterdir() if p.is_dir()} if other_root.is_dir() else None)
    return _assemble(entries, split, dataset, str(root) if entries else str(path), other)


EVALUATION_ORDER_SEED = 0  # fixed: every evaluation of a class-sorted set takes its images in the same order


def evaluation_order(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images, labels, how)`` in the order evaluations take their first ``n`` from.

    A source in class order (an ImageFolder tree or archive: all airplanes, then all automobiles, ...) would
    make the first ``n`` images one class; it is put in one fixed pseudo-random order (seed
    :data:`EVALUATION_ORDER_SEED`, the same for every evaluation, so a smaller ``n`` is a prefix of a larger
    one). Any other order (the torchvision batches' own) is kept, as published evaluations take the first
    ``n`` of it. ``how`` says which, for reports.
    """
    if labels.numel() > 1 and bool((labels[1:] >= labels[:-1]).all()) and int(labels.unique().numel()) > 1:
        order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(EVALUATION_ORDER_SEED))
        return images[order], labels[order], (f"a fixed permutation (seed {EVALUATION_ORDER_SEED}) of the "
                                              "class-sorted source")
    return images, labels, "the source's order"


# --------------------------------------------------------------------------- synthetic data


def synthetic_dataset(n: int, num_classes: int = 10, *, seed: int = 0, image_size: int = 32,
                      noise: float = 40.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random but learnable uint8 images: a per-class colour pattern plus uniform noise."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"n must be >= 0 and num_classes >= 1, got {n}, {num_classes}")
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, image_size, image_size, generator=g) * 160 + 48
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    jitter = (torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1) * noise
    images = (patterns[labels] + jitter).clamp(0, 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


# --------------------------------------------------------------------------- device-side loading


def augment(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Random crop with ``padding`` zero pixels and random horizontal flip, on ``images``' device.

    Works on any dtype; one advanced-indexing gather does both crop and flip.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    rows = oy[:, None] + torch.arange(h, device=device)
    steps = torch.arange(w, device=device)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - steps, steps)
    bi = torch.arange(b, device=device)[:, None, None, None]
    ci = torch.arange(c, device=device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches of ``(float images in [0, 1], labels)`` from uint8 tensors kept on ``device``.

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a
    resumed run sees exactly the batches an uninterrupted one would. With
    ``world_size > 1`` each rank takes an interleaved shard of the permutation
    (padded by wrapping, as ``DistributedSampler``; ``pad=False`` for evaluation, where each
    sample must count once) and ``batch_size`` is per rank.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 train_augment: bool = False, drop_last: bool = False, device=None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, pad: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        for name, value in (("batch_size", batch_size), ("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank}, "
                             f"world_size {world_size}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.train_augment = batch_size, shuffle, train_augment
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.channels_last, self.pad = channels_last, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = -(-n // self.world_size) * self.world_size
            if self.pad and total > n and n:  # wrapped as often as needed: a set smaller than world_size too
                order = order.repeat(-(-total // n))[:total]
            order = order[self.rank::self.world_size]
        return order.to(self.device)

    def __len__(self) -> int:
        n = self.images.shape[0]
        if self.world_size == 1:
            per_rank = n
        elif self.pad:
            per_rank = -(-n // self.world_size)
        else:
            per_rank = len(range(self.rank, n, self.world_size))
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        order = self._indices()
        gen = None
        if self.train_augment:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 7919 + self.rank)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train_augment:
                x = augment(x, gen)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def describe(images: torch.Tensor, labels: torch.Tensor) -> str:
    """One line for logs: count, shape and class balance."""
    counts = torch.bincount(labels).tolist() if labels.numel() else []
    return json.dumps({"n": int(images.shape[0]), "shape": list(images.shape[1:]),
                       "per_class_min": min(counts) if counts else 0, "per_class_max": max(counts) if counts else 0})

"""Durable file writes and JSON-lines logs: the one place fsmooth writes files that must survive a crash.

Every whole-file write goes through :func:`atomic_path`: the data goes to a temporary
file beside the target, is fsynced, renamed over the target, and the folder is
fsynced, so a process killed at any instant leaves either the old file or the new
one, never half of one (and no temporary file is left behind when Python unwinds).
JSON-lines logs are appended one record per ``write`` call (:func:`append_line`);
a crash can only tear the last line, which :func:`read_jsonl` skips.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import save_file

__all__ = ["fsync_file", "fsync_dir", "atomic_path", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic", "write_safetensors_atomic", "append_line", "append_jsonl", "read_jsonl"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual permissions."""
    os.chmod(path, mode & ~_umask())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk (files written by libraries that do not fsync themselves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries (renames, new files) of folder ``path`` durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, make it ``path``.

    The caller (or a library: safetensors, matplotlib) writes the whole file to the
    yielded path; it is then fsynced, renamed over ``path`` and the folder fsynced.
    On any error, ``KeyboardInterrupt`` included, the temporary file is removed and
    ``path`` is untouched. The temporary name keeps ``path``'s suffix (libraries
    pick the format from it). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    public_mode(tmp, 0o666)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, *, sort_keys: bool = True,
                      default: Callable | None = None) -> Path:
    """Write ``obj`` as indented JSON with a final newline, atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the usual permissions: safetensors (0.8) replaces the file it is
    given with a private one of its own."""
    save_file(tensors, str(path), metadata=metadata)
    public_mode(path, 0o666)


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Save ``tensors`` (moved to the CPU, made contiguous) as a safetensors file, atomically."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_safetensors(tmp, tensors, metadata)
    return Path(path)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` with one ``write`` call, then fsync.

    A crash can only leave the new line torn at the very end of the file (readers skip it);
    earlier lines are never touched. A line torn by an earlier crash is ended first, so that it stays
    a line of its own and the new one is kept whole.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # a short write (disk full): finish it rather than leave half a line
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: str | os.PathLike, record, *, default: Callable | None = None) -> None:
    """Append ``record`` as one JSON line (see :func:`append_line`)."""
    append_line(path, json.dumps(record, default=default))


def read_jsonl(path: str | os.PathLike, *, corrupt: str = "raise") -> list:
    """The records of a JSON-lines file, in order; blank lines are skipped.

    A last line that does not parse is a write torn by a crash: it is skipped with a
    :class:`RuntimeWarning`. Any other line that does not parse raises ``ValueError``
    naming it (``corrupt="raise"``), or is skipped with a warning (``"warn"``) or
    silently (``"skip"``). Raises ``FileNotFoundError`` when ``path`` does not exist.
    """
    if corrupt not in ("raise", "warn", "skip"):
        raise ValueError(f"corrupt must be 'raise', 'warn' or 'skip', got {corrupt!r}")
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            where = f"line {index + 1} of {str(path)!r}"
            if index == last:
                if corrupt != "skip":
                    warnings.warn(f"skipping unreadable line {index + 1} of {str(path)!r} (a torn last line: {exc})",
                                  RuntimeWarning, stacklevel=2)
                continue
            if corrupt == "raise":
                raise ValueError(f"{where} is not JSON: {exc}") from exc
            if corrupt == "warn":
                warnings.warn(f"skipping unreadable {where} ({type(exc).__name__}: {exc})", RuntimeWarning,
                              stacklevel=2)
    return records

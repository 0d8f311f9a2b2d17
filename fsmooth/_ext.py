"""Lazy access to the optional CUDA extension ``fsmooth._C``.

The extension is built by ``setup.py`` when a CUDA toolkit is present. Nothing
imports it at ``import fsmooth`` time; engines that need it call
:func:`load_extension` and fall back (or raise, when forced) with the reason.

A build records the torch and CUDA versions it compiled against and a digest of
``csrc/`` (:func:`build_info`); :func:`stale_reason` compares them with the
running torch and the current sources, so a GPU run can rebuild before it
relies on an extension built for another torch or from older sources.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

_log = logging.getLogger(__name__)

# The version of the op set in csrc/ this Python code expects (csrc/fsmooth_ops.cpp's abi_version()).
EXTENSION_ABI = 2
# csrc/ next to the package: present in a source checkout and an editable install, absent from a wheel.
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
_REBUILD = "pip install --no-build-isolation -e ."


def sources_digest(csrc_dir: str | Path = SOURCE_DIR) -> str:
    """Digest of the extension's sources (names and contents); ``setup.py`` compiles it into the build."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(csrc_dir).iterdir() if p.suffix in _SOURCE_SUFFIXES):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _load():
    try:
        import torch  # noqa: F401  (loads libc10 and friends, which _C links against)
        from . import _C  # noqa: F401  (registers torch.ops.fsmooth.*)
    except ImportError as exc:
        return None, (f"the CUDA extension fsmooth._C is not available ({exc}); reinstall with a CUDA toolkit: "
                      f"{_REBUILD}")
    return _C, ""


def load_extension():
    """``(module, "")`` if ``fsmooth._C`` imports, else ``(None, reason)``; logged once."""
    module, reason = _load()
    if module is None:
        _log.info("%s", reason)
    return module, reason


def extension_available() -> bool:
    return _load()[0] is not None


def abi_reason() -> str | None:
    """``None`` when ``fsmooth._C`` imports and has the op set this code expects, else why not."""
    module, reason = load_extension()
    if module is None:
        return reason
    import torch  # lazy: setup.py loads this file to digest csrc/ before torch may be importable
    abi = int(torch.ops.fsmooth.abi_version())
    if abi != EXTENSION_ABI:
        return f"fsmooth._C is a stale build (ABI {abi}, this fsmooth needs {EXTENSION_ABI}); rebuild it: {_REBUILD}"
    return None


def build_info() -> dict | None:
    """``{"torch", "cuda", "sources"}`` that ``fsmooth._C`` was built with; ``None`` without a current build."""
    if abi_reason() is not None:
        return None
    import torch  # lazy: setup.py loads this file to digest csrc/ before torch may be importable
    return json.loads(torch.ops.fsmooth.build_info())


def stale_reason(csrc_dir: str | Path | None = SOURCE_DIR) -> str | None:
    """``None`` when ``fsmooth._C`` imports, was built for the running torch and, when ``csrc_dir``
    exists, from its current sources; else a sentence saying what to rebuild and why."""
    reason = abi_reason()
    if reason is not None:
        return reason
    import torch  # lazy: setup.py loads this file to digest csrc/ before torch may be importable
    info = build_info()
    if info["torch"] != torch.__version__:
        return (f"fsmooth._C was built for torch {info['torch']}, but torch {torch.__version__} is running; "
                f"rebuild it: {_REBUILD}")
    if csrc_dir is not None and Path(csrc_dir).is_dir():
        digest = sources_digest(csrc_dir)
        if info["sources"] != digest:
            return (f"{csrc_dir} changed since fsmooth._C was built (sources {info['sources']}, now {digest}); "
                    f"rebuild it: {_REBUILD}")
    return None

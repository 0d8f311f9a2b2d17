"""Lazy access to the optional CUDA extension ``fsmooth._C``.

The extension is built by ``setup.py`` when a CUDA toolkit is present. Nothing
imports it at ``import fsmooth`` time; engines that need it call
:func:`load_extension` and fall back (or raise, when forced) with the reason.
"""
from __future__ import annotations

import functools
import logging

_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        import torch  # noqa: F401  (loads libc10 and friends, which _C links against)
        from . import _C  # noqa: F401  (registers torch.ops.fsmooth.*)
    except ImportError as exc:
        return None, (f"the CUDA extension fsmooth._C is not available ({exc}); reinstall with a CUDA toolkit: "
                      "pip install --no-build-isolation -e .")
    return _C, ""


def load_extension():
    """``(module, "")`` if ``fsmooth._C`` imports, else ``(None, reason)``; logged once."""
    module, reason = _load()
    if module is None:
        _log.info("%s", reason)
    return module, reason


def extension_available() -> bool:
    return _load()[0] is not None

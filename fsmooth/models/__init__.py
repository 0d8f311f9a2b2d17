"""Models: pre-activation WideResNets, network prefixes and the embedded pretrained weights."""
from __future__ import annotations

from .prefix import layer_module, prefix, resolve_layer
from .wrn import PRESETS, WideResNet, wrn16_4, wrn28_10

__all__ = ["WideResNet", "wrn28_10", "wrn16_4", "PRESETS", "build", "prefix", "resolve_layer", "layer_module",
           "pretrained", "available_pretrained", "load_classifier"]


def build(arch: str, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """A WRN from a preset name (``"wrn-28-10"``, ``"wrn-16-4"``, ...) or ``"wrn-D-W"``."""
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    key = arch.lower().replace("_", "-")
    if key in PRESETS:
        depth, width = PRESETS[key]
    else:
        parts = key.split("-")
        if len(parts) != 3 or parts[0] != "wrn" or not (parts[1].isdigit() and parts[2].isdigit()):
            raise ValueError(f"arch must be one of {sorted(PRESETS)} or 'wrn-DEPTH-WIDTH', got {arch!r}")
        depth, width = int(parts[1]), int(parts[2])
    return WideResNet(depth, width, num_classes, dropout)


def __getattr__(name):
    # The pretrained registry (zoo.py) imports the checkpoint and data modules; import it only when asked.
    if name in ("pretrained", "available_pretrained", "load_classifier"):
        from . import zoo as module
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

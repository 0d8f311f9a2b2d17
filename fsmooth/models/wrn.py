"""Pre-activation WideResNet (Zagoruyko & Komodakis, 2016) for 32x32 inputs in [0, 1].

Groups are named ``block1``, ``block2``, ``block3``; ``block1``'s output is the
paper's layer l=0 (160x32x32 for WRN-28-10). The model normalises its inputs
itself, so attacks and the defense work in [0, 1] pixel space.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .prefix import unknown_layer_error

__all__ = ["WideResNet", "Normalize", "wrn28_10", "wrn16_4", "PRESETS", "CIFAR10_MEAN", "CIFAR10_STD",
           "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as buffers so they follow ``.to()``."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class BasicBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-(dropout)-conv plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the reference WRN code.
        shortcut = x if self.equal_in_out else self.shortcut(o)
        o = F.relu(self.bn2(self.conv1(o)))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return shortcut + self.conv2(o)


class NetworkBlock(nn.Sequential):
    """One group of ``n`` blocks; the first may change width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
            for i in range(n)
        ])


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` with ``num_classes`` outputs, taking [0, 1] inputs.

    ``default_layer`` is the layer Active Defense and the training loss use
    when none is named: ``block1``, the paper's l=0.
    """

    default_layer = "block1"
    layer_names = ("conv1", "block1", "block2", "block3")

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, dropout: float = 0.0,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got {depth}")
        if width < 1 or num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got {width}, {num_classes}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.config = dict(depth=depth, width=width, num_classes=num_classes, dropout=dropout)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv1(self.normalize(x))
        o = self.block3(self.block2(self.block1(o)))
        o = F.relu(self.bn(o))
        o = F.adaptive_avg_pool2d(o, 1).flatten(1)
        return self.fc(o)

    def prefix(self, layer: str | None = None) -> nn.Module:
        """The sub-network from the input to ``layer``'s output, sharing this model's modules."""
        layer = layer or self.default_layer
        if layer not in self.layer_names:
            raise unknown_layer_error(self, layer, candidates=self.layer_names)
        stages = [self.normalize]
        for name in self.layer_names:
            stages.append(getattr(self, name))
            if name == layer:
                break
        return nn.Sequential(*stages)


def wrn28_10(num_classes: int = 10, dropout: float = 0.0, **kwargs) -> WideResNet:
    """The paper's WRN-28-10 (36.5M parameters)."""
    return WideResNet(28, 10, num_classes, dropout, **kwargs)


def wrn16_4(num_classes: int = 10, dropout: float = 0.0, **kwargs) -> WideResNet:
    """A small WRN-16-4 (2.7M parameters), for the embedded model and quick experiments."""
    return WideResNet(16, 4, num_classes, dropout, **kwargs)


PRESETS = {"wrn-28-10": (28, 10), "wrn-16-4": (16, 4), "wrn-16-1": (16, 1), "wrn-10-1": (10, 1)}

"""Tiny models and data for the evaluation tests (CPU, seconds)."""
from __future__ import annotations

import torch
from torch import nn

from fsmooth.defense import DefendedClassifier, DefenseConfig
from fsmooth.evaluation import Budget

# Small noise and a cap on iterations keep the defended forward cheap; the semantics are the paper's.
TINY_DEFENSE = DefenseConfig(sigma=0.01, beta=2.0, delta=0.02, max_iters=3)
TINY_BASELINE_DEFENSE = DefenseConfig(sigma=0.01, beta=2.0, delta=0.03, max_iters=3)


class TinyNet(nn.Module):
    """conv-ReLU feature layer ``block1`` and a linear head, for 3x8x8 inputs."""

    default_layer = "block1"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))

    def forward(self, x):
        return self.head(self.block1(x))


def separable_data(n: int = 64, num_classes: int = 10, seed: int = 0, spread: float = 0.02):
    """Fixed class patterns ``0.5 + spread * N(0, 1)`` plus small noise drawn from ``seed``.

    Learnable, but within reach of eps = 8/255 (the classes are ~5/255 apart in L-inf terms).
    """
    patterns = torch.randn(num_classes, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = (0.5 + spread * patterns[y] + 0.005 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def trained_tiny_net(seed: int = 0, steps: int = 40) -> TinyNet:
    torch.manual_seed(seed)
    x, y = separable_data()
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_budget() -> Budget:
    return Budget.tiny()


def tiny_factory(model, config, outer_loops, layer):
    return DefendedClassifier(model, config, outer_loops, layer=layer, engine="eager")


class SimulatedKill(Exception):
    pass


class Interrupting(TinyNet):
    """Raises after ``limit`` forward calls: an evaluation killed part-way."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.limit:
            raise SimulatedKill(f"killed after {self.limit} forward calls")
        return super().forward(x)


class NoisyKillable(nn.Module):
    """``model`` on inputs with uniform noise of ``scale`` drawn from the global random state (randomized like
    the defense); raises :class:`SimulatedKill` after ``limit`` calls (``None``: never)."""

    def __init__(self, model, scale: float):
        super().__init__()
        self.net, self.scale, self.limit, self.calls = model, scale, None, 0

    def forward(self, x):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise SimulatedKill(f"killed at call {self.calls}")
        return self.net(x + self.scale * (2 * torch.rand_like(x) - 1))

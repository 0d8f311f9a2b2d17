"""Shared test setup.

Without CUDA, the Triton kernels are imported once in interpreter mode
(``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` runs) and Triton's
runtime knob stays in interpreter mode, so CI tests the real kernel code on CPU
tensors (``backend="triton"``). The environment variable itself is restored:
``backend="auto"`` keeps using the fast reference on CPU (the interpreter takes
~0.4 s per call at 8x16x32x32) unless a test sets ``TRITON_INTERPRET=1``
(the ``interpret_triton`` fixture).
"""
import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest -n N (pytest-xdist): share the cores between the workers instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    config.addinivalue_line("markers", "slow: slower CPU test (seconds, not minutes)")
    if not torch.cuda.is_available():
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton
            import fsmooth.kernels.feature_loss  # noqa: F401  (binds the interpreter)
            triton.knobs.runtime.interpret = True
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpret_triton(monkeypatch):
    """Route ``backend="auto"`` on CPU tensors to the (interpreted) Triton kernel."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")

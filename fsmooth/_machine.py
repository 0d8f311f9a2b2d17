"""What a result was computed on: the one place that names the machine (reports, chunks, benchmarks)."""
from __future__ import annotations

import functools
import platform

import torch

__all__ = ["cpu_model", "machine", "machines_with"]


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: torch.device | str | None = None) -> dict:
    """The facts that can change a float result: device, CPU model and the vector ISA torch's kernels use,
    threads, torch and CUDA versions.

    A randomized defense iterated hundreds of times turns last-bit differences into different outcomes, so
    every chunk of an evaluation records this: two chunks of one run computed on different machines can then
    be told apart.
    """
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(device) if cuda else None, "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def machines_with(earlier: list, device: torch.device | str | None = None) -> list:
    """``earlier`` (the machines that worked on a piece of work before) and this one, each once, in order."""
    here = machine(device)
    return list(earlier) + ([here] if here not in earlier else [])

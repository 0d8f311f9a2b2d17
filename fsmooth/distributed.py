"""Sharding an evaluation over ``torchrun`` ranks: rank r runs chunks r, r + W, ...; results are gathered.

Launch: ``torchrun --nproc_per_node=4 --no-python fsmooth eval ...``. Each rank
uses ``cuda:LOCAL_RANK`` (NCCL) when CUDA is available, otherwise the CPU
(gloo). Every rank ends with the full merged results; rank 0 writes the report.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "init_from_env", "all_gather_object", "barrier", "local_device"]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); ``True`` when distributed."""
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return True


def all_gather_object(obj) -> list:
    """``obj`` of every rank (CPU tensors inside are fine with gloo and NCCL)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()

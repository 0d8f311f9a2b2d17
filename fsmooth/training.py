"""Feature-smoothing training: ``L = CE + max(L_F, delta)`` on clean images (``delta=None``: plain CE).

``train(...)`` runs a WRN on CIFAR-style data with SGD (Nesterov), a cosine
schedule with linear warm-up and weight decay 5e-4; bf16 autocast and
channels_last on CUDA; optional ``torch.compile``. It writes, under ``out_dir``:

* ``log.jsonl``: one line per epoch (train/test accuracy, train/test feature loss, lr, seconds, ...),
  each appended with one fsynced write;
* ``checkpoints/epoch-NNNN/``: weights + metadata + optimizer/scheduler/RNG state every epoch
  (see :mod:`fsmooth.checkpoint`); ``resume=True`` continues exactly where a killed run stopped.

A folder that already holds a run is never silently reused: ``resume=True`` continues it
(with the same hyperparameters, or it refuses and lists what differs), ``overwrite=True``
deletes it and starts over, and anything else is an error.

The same call runs under ``torchrun``: it joins the process group from the
environment (NCCL on CUDA, gloo on CPU), wraps the model in
DistributedDataParallel, shards every epoch's permutation across ranks
(``batch_size`` stays the global batch) and all-reduces the metrics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from torch import nn

from ._validation import check_bool, check_device, check_number, check_out_dir, check_positive_int
from .checkpoint import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from .data import DeviceLoader, load_dataset
from .distributed import all_gather_object, barrier, env_ranks, init_from_env
from .functional import feature_loss
from .io import append_jsonl, read_jsonl, write_text_atomic
from .loss import FeatureSmoothingLoss
from .models import build
from .models.prefix import layer_module, resolve_layer

__all__ = ["train", "TrainResult", "cosine_with_warmup", "evaluate_split"]

_log = logging.getLogger(__name__)
LOG_NAME = "log.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    """What :func:`train` returns: the (unwrapped) model, the per-epoch log and the last checkpoint."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    run_dir: Path | None = None
    finished: bool = False


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _FeatureProbe:
    """Forward hook keeping a layer's output, to log L_F when the loss itself does not use it."""

    def __init__(self, module: nn.Module):
        self.features = None
        self.handle = module.register_forward_hook(lambda m, i, o: setattr(self, "features", o))

    def pop(self):
        features, self.features = self.features, None
        return features

    def close(self):
        self.handle.remove()


def _reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate_split(model: nn.Module, loader: DeviceLoader, layer: str | None = None, *, autocast_dtype=None) -> dict:
    """Clean accuracy, mean CE and mean feature loss of ``model`` (eval mode) over ``loader``, reduced across ranks."""
    was_training = model.training
    model.eval()
    probe = _FeatureProbe(layer_module(model, layer))
    device = loader.device
    correct = torch.zeros((), dtype=torch.float64, device=device)
    ce_sum, lf_sum = correct.clone(), correct.clone()
    count = 0
    try:
        for x, y in loader:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            features = probe.pop()
            correct += (logits.argmax(1) == y).sum()
            ce_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            lf_sum += feature_loss(features).double().sum()
            count += y.numel()
    finally:
        probe.close()
        model.train(was_training)
    correct, ce_sum, lf_sum, count = _reduce([correct.item(), ce_sum.item(), lf_sum.item(), float(count)], device)
    count = max(count, 1.0)
    return {"acc": correct / count, "loss": ce_sum / count, "feature_loss": lf_sum / count, "n": int(count)}


def _subset(images, labels, limit: int | None):
    if limit is None or limit >= images.shape[0]:
        return images, labels
    # A fixed subset (independent of the training seed) so runs with different seeds compare.
    index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1234))[:limit].sort().values
    return images[index], labels[index]


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(out_dir: str | os.PathLike, *, arch: str = "wrn-16-4", data=None, dataset: str = "cifar10",
          epochs: int = 200, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
          weight_decay: float = 5e-4, warmup_epochs: float = 1.0, delta: float | None = 0.02,
          layer: str | None = None, seed: int = 0, device=None, amp: str = "auto",
          channels_last: bool | None = None, compile: bool = False, eval_batch_size: int = 512,
          limit_train: int | None = None, limit_test: int | None = None, resume: bool = False,
          overwrite: bool = False, max_epochs_this_run: int | None = None, quiet: bool = False, train_data=None,
          test_data=None, command: str | None = None) -> TrainResult:
    """Train ``arch`` with the feature-smoothing loss; see the module docstring for outputs.

    Args:
        out_dir: run folder (log, checkpoints). With ``resume=True`` the latest readable
            checkpoint there is restored (weights, optimizer, scheduler, RNG, epoch); every
            hyperparameter that shapes the schedule, optimizer, loss or data must equal the recorded one.
        overwrite: delete the run already in ``out_dir`` (its log and checkpoints) and start over; it is
            deleted only once every argument is checked and the data is read, so a call that fails before
            leaves it as it was. Without it (or ``resume``), a folder holding a run is refused.
        data: data source for :func:`fsmooth.data.load_dataset` (``None``: ``$FSMOOTH_DATA``),
            unless ``train_data``/``test_data`` (``(uint8 images, labels)``) are given.
        delta: training threshold of ``max(L_F, delta)``; ``None`` trains with plain CE.
        amp: ``"auto"`` (bf16 on CUDA), ``"bf16"`` or ``"off"``.
        max_epochs_this_run: stop after this many epochs in this call (the run can be resumed).
        command: the command line recorded in the checkpoint metadata.
    """
    options = dict(locals())
    rank, world, local_rank = env_ranks()
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        init_from_env()
    try:
        return _train(**options, rank=rank, world=world, local_rank=local_rank)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(out_dir, *, arch, data, dataset, epochs, batch_size, lr, momentum, weight_decay, warmup_epochs,
           delta, layer, seed, device, amp, channels_last, compile, eval_batch_size, limit_train, limit_test,
           resume, overwrite, max_epochs_this_run, quiet, train_data, test_data, command, rank, world, local_rank):
    # Every argument is checked, and the run folder claimed, before any data is read. A run that
    # overwrite=True replaces is deleted only once the data is read and the loaders are built: a bad
    # argument (or data that makes no batch) leaves it as it was.
    _check_arguments(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     warmup_epochs=warmup_epochs, delta=delta, seed=seed, eval_batch_size=eval_batch_size,
                     limit_train=limit_train, limit_test=limit_test, max_epochs_this_run=max_epochs_this_run,
                     channels_last=channels_last, compile=compile, resume=resume, overwrite=overwrite, quiet=quiet,
                     command=command)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                         "overwrite deletes it")
    num_classes = {"cifar10": 10, "cifar100": 100}.get(dataset)
    if num_classes is None:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    run_dir = check_out_dir(out_dir, "out_dir")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_amp else None
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    replaced = _claim_run_dir(run_dir, resume=resume, overwrite=overwrite)

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build(arch, num_classes=num_classes)  # checks arch
    layer = resolve_layer(model, layer)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # What shapes the schedule, optimizer, loss and data. A resumed run restores the LR schedule and the
    # optimizer state from its checkpoint, so a changed value would be recorded but not run: it is refused.
    settings = {"arch": arch, "dataset": dataset, "layer": layer, "delta": delta, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "warmup_epochs": warmup_epochs, "seed": seed, "amp": "bf16" if use_amp else "off",
                "limit_train": limit_train, "limit_test": limit_test,
                "world_size": world}  # the ranks shard the data, seed the augmentation and split each batch
    restored = load_run_checkpoint(run_dir) if resume else None
    if restored is not None:
        _check_resume_settings(restored[0], restored[3], settings)

    # Data: decoded once (cached), then resident on the device.
    if train_data is None:
        train_data = load_dataset(data, "train", dataset)
    if test_data is None:
        test_data = load_dataset(data, "test", dataset)
    train_images, train_labels = _subset(*train_data, limit_train)
    test_images, test_labels = _subset(*test_data, limit_test)
    if restored is not None:
        _check_resume_settings(restored[0], restored[3], {"n_train": int(train_images.shape[0]),
                                                          "n_test": int(test_images.shape[0])})
    train_loader = DeviceLoader(train_images, train_labels, batch_size // world, shuffle=True, train_augment=True,
                                drop_last=True, device=device, seed=seed, rank=rank, world_size=world,
                                channels_last=channels_last)
    test_loader = DeviceLoader(test_images, test_labels, eval_batch_size, device=device, rank=rank,
                               world_size=world, channels_last=channels_last, pad=False)
    if len(train_loader) == 0:
        raise ValueError(f"{train_images.shape[0]} training images make no batch of {batch_size}")
    if rank == 0:
        _delete_run(run_dir, replaced)
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed + 7 * rank)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=momentum, nesterov=True)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(epochs * steps, int(round(warmup_epochs * steps))))

    history: list[dict] = []
    start_epoch = 0
    checkpoint = restored[0] if restored is not None else None
    if restored is not None:
        start_epoch, history = _restore(restored, model, optimizer, scheduler, device, rank, run_dir)
        restored = None  # the loaded tensors are in the model and optimizer now
        _log.info("resumed from %s at epoch %d", checkpoint, start_epoch)
    elif resume and rank == 0:
        _rewrite_log(run_dir, [])  # lines of a first epoch that never reached its checkpoint

    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)
    if delta is not None:
        criterion = FeatureSmoothingLoss(model, layer=layer, delta=delta)
        probe = None
    else:
        criterion, probe = None, _FeatureProbe(layer_module(model, layer))

    meta_base = {
        **settings, "data": str(data) if data is not None else os.environ.get("FSMOOTH_DATA"),
        "nesterov": True, "device": device.type, "n_train": int(train_images.shape[0]),
        "n_test": int(test_images.shape[0]), "torch": torch.__version__,
        "command": command if command is not None else " ".join(sys.argv),
    }
    stop = epochs if max_epochs_this_run is None else min(epochs, start_epoch + max_epochs_this_run)
    for epoch in range(start_epoch, stop):
        train_loader.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # total loss, correct, L_F, count
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{epochs}", disable=quiet or rank != 0,
                   dynamic_ncols=True)
        for step, (x, y) in enumerate(train_loader):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
                logits = net(x)
                if criterion is not None:
                    loss = criterion(logits, y)
                    lf_mean = criterion.last["feature_loss"]
                else:
                    loss = F.cross_entropy(logits.float(), y)
                    lf_mean = feature_loss(probe.pop().detach()).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            n = y.numel()
            sums[:3] += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                                     lf_mean.double() * n])
            sums[3] += n
            bar.update(1)
            if step % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{sums[0].item() / sums[3].item():.3f}",
                                acc=f"{sums[1].item() / sums[3].item():.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        total, correct, lf_sum, count = _reduce(sums.tolist(), device)
        eval_start = time.perf_counter()
        # The test forwards run the hooked layer too: they must not be taken for a training step's.
        with criterion.paused() if criterion is not None else contextlib.nullcontext():
            test = evaluate_split(model, test_loader, layer, autocast_dtype=autocast_dtype)
        record = {
            "epoch": epoch + 1, "lr": last_lr,
            "train_loss": total / count, "train_acc": correct / count, "train_feature_loss": lf_sum / count,
            "test_loss": test["loss"], "test_acc": test["acc"], "test_feature_loss": test["feature_loss"],
            "test_n": test["n"],
            "seconds": train_seconds, "eval_seconds": time.perf_counter() - eval_start,
            "images_per_s": count / train_seconds,
        }
        history.append(record)
        rng = _rng_state(device)
        if world > 1:
            rng = {"ranks": all_gather_object(rng)}
        if rank == 0:
            append_jsonl(run_dir / LOG_NAME, record)
            meta = dict(meta_base, epoch=epoch + 1, metrics=record)
            checkpoint = save_run_checkpoint(run_dir, epoch + 1, model, meta, optimizer=optimizer,
                                             scheduler=scheduler, extra_state={"epoch": epoch + 1, "rng": rng})
            _log.info("epoch %d: %s", epoch + 1, record)
        # The epoch's bar stays on screen with its summary (no prints from library code).
        bar.set_postfix(train_acc=f"{record['train_acc']:.4f}", train_LF=f"{record['train_feature_loss']:.4f}",
                        test_acc=f"{record['test_acc']:.4f}", test_LF=f"{record['test_feature_loss']:.4f}",
                        lr=f"{record['lr']:.3g}")
        bar.close()
        barrier()
    if criterion is not None:
        criterion.close()
    if probe is not None:
        probe.close()
    if world > 1 and rank != 0:
        checkpoint = latest_checkpoint(run_dir)
    return TrainResult(model=model, history=history, checkpoint=checkpoint, run_dir=run_dir,
                       finished=len(history) >= epochs)


def _check_arguments(*, epochs, batch_size, lr, momentum, weight_decay, warmup_epochs, delta, seed, eval_batch_size,
                     limit_train, limit_test, max_epochs_this_run, channels_last, compile, resume, overwrite, quiet,
                     command) -> None:
    """``TypeError``/``ValueError`` naming the first of :func:`train`'s arguments that is wrong."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        check_positive_int(value, name)
    for name, value in (("limit_train", limit_train), ("limit_test", limit_test),
                        ("max_epochs_this_run", max_epochs_this_run)):
        check_positive_int(value, name, allow_none=True)
    check_number(lr, "lr", positive=True)
    check_number(momentum, "momentum", positive=True)  # Nesterov SGD needs momentum > 0
    check_number(weight_decay, "weight_decay", min_value=0.0)
    check_number(warmup_epochs, "warmup_epochs", min_value=0.0)
    if delta is not None:
        check_number(delta, "delta", min_value=0.0)
    check_number(seed, "seed", integer=True)
    if not 0 <= seed < 2**31:  # the data's per-epoch generator seeds derive from it in 64 bits (data.py)
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    check_bool(channels_last, "channels_last", allow_none=True)
    for name, value in (("compile", compile), ("resume", resume), ("overwrite", overwrite), ("quiet", quiet)):
        check_bool(value, name)
    if command is not None and not isinstance(command, str):
        raise TypeError(f"command must be a str or None, got {type(command).__name__}")


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a fresh run over an existing one unless ``overwrite``; returns what ``overwrite``
    replaces (deleted later by :func:`_delete_run`, once nothing can fail before the run starts)."""
    existing = [p for p in (run_dir / LOG_NAME, run_dir / CHECKPOINTS) if p.exists()]
    if resume or not existing:
        return []
    if not overwrite:
        names = " and ".join(p.name for p in existing)
        raise ValueError(f"{str(run_dir)!r} already holds a run ({names}): continue it with resume=True "
                         "(--resume), or delete it and start over with overwrite=True (--overwrite)")
    return existing


def _delete_run(run_dir: Path, existing: list[Path]) -> None:
    """Delete the log and checkpoints of the run that ``overwrite=True`` replaces."""
    if not existing:
        return
    _log.warning("overwrite: deleting %s in %s", " and ".join(p.name for p in existing), run_dir)
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_resume_settings(checkpoint: Path, meta: dict, current: dict) -> None:
    """``ValueError`` listing every recorded setting that ``current`` changes (``old -> new``)."""
    changed = [f"{key} {meta[key]!r} -> {value!r}" for key, value in current.items()
               if key in meta and meta[key] != value]
    if changed:
        raise ValueError(f"cannot resume from {str(checkpoint)!r} with other settings than it was trained with "
                         f"({'; '.join(changed)}): resume with the recorded values, or start a new run in another "
                         "folder")


def _read_log(log: Path, last_epoch: int) -> list[dict]:
    """The records of epochs ``<= last_epoch``; a torn or corrupt line is skipped with a warning."""
    if not log.exists():
        return []
    history = []
    for number, record in enumerate(read_jsonl(log, corrupt="warn"), 1):
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            warnings.warn(f"skipping record {number} of {str(log)!r}: its epoch is {epoch!r}", RuntimeWarning,
                          stacklevel=3)
            continue
        if epoch <= last_epoch:  # epochs logged after the checkpoint are rerun
            history.append(record)
    return history


def _rewrite_log(run_dir: Path, history: list[dict]) -> None:
    log = run_dir / LOG_NAME
    if log.exists():
        write_text_atomic(log, "".join(json.dumps(h) + "\n" for h in history))


def _restore(restored, model, optimizer, scheduler, device, rank: int, run_dir: Path):
    _, weights, state, _ = restored
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    epoch = int(state["epoch"])
    rng = state["rng"]
    if "ranks" in rng:  # one state per rank; the world size was checked against the checkpoint's
        rng = rng["ranks"][rank]
    _set_rng_state(rng, device)
    history = _read_log(run_dir / LOG_NAME, epoch)
    if [h["epoch"] for h in history] != list(range(1, epoch + 1)):
        _log.warning("the log of %s does not hold one line for each of the %d checkpointed epochs", run_dir, epoch)
    if rank == 0:
        _rewrite_log(run_dir, history)
    return epoch, history


"""Shared pieces of the benchmark scripts in ``bench/``.

Timing (CUDA events or synchronised host timers, warm-up excluded, median
with min/max), the device's own ceilings measured in the same run (copy
bandwidth, matrix-product rates), FLOP counting from the modules that really
run (forward hooks), environment metadata, and result files (JSON lines + CSV
rows appended under an output directory).

The scripts import this module as a sibling (``python bench/<script>.py`` puts
``bench/`` first on ``sys.path``); tests load it from its file path.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from fsmooth._machine import cpu_model
from fsmooth.io import append_jsonl

_log = logging.getLogger("bench")

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# Environment


def environment(device=None) -> dict:
    """Device, library versions, command line and date of this run (goes into every result row).

    ``device``: the one the run measures on (default: CUDA if available, else the CPU); a CPU run on a GPU
    machine is labelled ``cpu``, with no GPU name."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # a broken Triton must not stop a CPU run
        triton_version = f"unavailable ({type(exc).__name__})"
    return {
        "run_id": uuid.uuid4().hex[:12],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(device) if cuda else "none",
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


# ----------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    """Milliseconds of repeated runs of one measurement."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    def as_row(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "max_ms": self.max_ms,
                "repeats": len(self.samples_ms)}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device | str) -> tuple[float, object]:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU, a synchronised host clock on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def time_repeated(fn: Callable[[int], object], device, repeats: int, warmup: int = 1) -> tuple[Timing, list]:
    """Time ``fn(r)`` for ``r`` in ``range(repeats)`` after ``warmup`` untimed calls of ``fn(0)``.

    ``fn`` gets the repeat index so callers can rotate among several input sets.
    Returns the timing and the outputs of the timed calls.
    """
    for _ in range(warmup):
        fn(0)
    synchronize(device)
    samples, outs = [], []
    for r in range(repeats):
        ms, out = time_once(lambda: fn(r), device)
        samples.append(ms)
        outs.append(out)
    return Timing(samples), outs


def bench_kernel_ms(fn: Callable[[], object], device, warmup_ms: float = 25, rep_ms: float = 100,
                    min_repeats: int = 5) -> Timing:
    """Median/min/max milliseconds of a short kernel call.

    On CUDA: ``triton.testing.do_bench`` (events, L2 flushed between calls), every
    timed call it made (``return_mode="all"``), so ``repeats`` counts them; a
    triton without that mode gives its 0/50/100 % quantiles, three samples that
    keep the median and the spread (and say ``repeats`` 3). On CPU: a
    synchronised host timer.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        try:
            samples = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (AssertionError, ValueError, TypeError):  # a triton without return_mode="all"
            samples = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.0, 0.5, 1.0])
        return Timing([float(v) for v in samples])
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_repeats or time.perf_counter() < deadline:
        ms, _ = time_once(fn, device)
        samples.append(ms)
        if len(samples) >= 1000:
            break
    return Timing(samples)


# ----------------------------------------------------------------------------------------------
# Precision


@contextlib.contextmanager
def float32_matmul(mode: str):
    """``mode="tf32"`` lets cuBLAS/cuDNN use TF32 for fp32 products; ``"ieee"`` forbids it.

    cuDNN allows TF32 for convolutions by default, so "fp32" providers must
    switch it off explicitly. Graph engines bake the choice in at capture time,
    so keep the context around construction *and* calls.
    """
    if mode not in ("tf32", "ieee"):
        raise ValueError(f"mode must be 'tf32' or 'ieee', got {mode!r}")
    allow = mode == "tf32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the old flags still work
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Device ceilings, measured in the same run


def copy_bandwidth(device, nbytes: int) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)  # random data: zeros can run faster than real data
    dst = torch.empty_like(src)
    timing = bench_kernel_ms(lambda: dst.copy_(src), device)
    moved = 2 * n * 4
    return {"copy_bytes": moved, **timing.as_row(), "bytes_per_s": moved / (timing.median_ms * 1e-3)}


def matmul_rate(device, size: int, dtype: torch.dtype, tf32: bool) -> dict:
    """FLOP/s of a ``size``-cubed matrix product (random operands) in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with float32_matmul("tf32" if tf32 else "ieee"):
        timing = bench_kernel_ms(lambda: a @ b, device)
    flops = 2 * size ** 3
    return {"size": size, **timing.as_row(), "flops_per_s": flops / (timing.median_ms * 1e-3)}


def device_ceilings(device, matmul_size: int, copy_bytes: int) -> dict:
    """Measured bf16, TF32 and IEEE-fp32 matrix-product rates and the copy bandwidth."""
    device = torch.device(device)
    out = {"copy": copy_bandwidth(device, copy_bytes),
           "bf16": matmul_rate(device, matmul_size, torch.bfloat16, tf32=False),
           "fp32": matmul_rate(device, matmul_size, torch.float32, tf32=False)}
    if device.type == "cuda":
        out["tf32"] = matmul_rate(device, matmul_size, torch.float32, tf32=True)
    else:
        out["tf32"] = dict(out["fp32"], note="no TF32 on CPU: the fp32 rate")
    return out


# ----------------------------------------------------------------------------------------------
# FLOP counting


def _conv_forward_flops(module: nn.Conv2d | nn.Conv1d | nn.Conv3d, out: torch.Tensor) -> int:
    """2 * output elements * multiply-adds per output (bias and elementwise work are not counted)."""
    macs_per_output = (module.in_channels // module.groups)
    for k in module.kernel_size:
        macs_per_output *= k
    return 2 * out.numel() * macs_per_output


def count_flops(module: nn.Module, example: torch.Tensor) -> dict:
    """FLOPs of one call of ``module`` on ``example``, per sample, from the convolutions and linears that ran.

    Forward hooks record the output shape of every ``Conv*d`` and ``Linear``
    actually called (a module called twice counts twice). The input-gradient
    backward of a convolution/linear does as many multiply-adds as its forward
    (a transposed product with the same weights), so
    ``forward_plus_input_grad = 2 * forward``; weight gradients are not part
    of Active Defense and are not counted.
    """
    counts: list[int] = []

    def hook(mod, _inp, out):
        if isinstance(mod, nn.Linear):
            counts.append(2 * out.numel() * mod.in_features)
        else:
            counts.append(_conv_forward_flops(mod, out))

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    batch = max(1, example.shape[0])
    forward = sum(counts) // batch
    return {"forward_flops": forward, "input_grad_flops": forward, "forward_plus_input_grad_flops": 2 * forward,
            "layers_counted": len(counts)}


# ----------------------------------------------------------------------------------------------
# Results

RESULT_FIELDS = (
    "run_id", "date", "command", "device", "gpu_name", "torch", "triton", "cuda",
    "section", "provider", "engine_used", "status", "reason", "dtype", "batch", "iters", "shape",
    "median_ms", "min_ms", "max_ms", "repeats",
    "useful_iters", "useful_iters_per_s", "speedup_vs_eager", "occupancy",
    "flops_per_s", "roofline_fraction", "bytes_per_s", "copy_bandwidth_fraction",
    "rel_err", "planned_s", "wall_s", "tag", "extra",
)


def append_results(out_dir: str | os.PathLike, stem: str, env: dict, rows: Iterable[dict]) -> tuple[Path, Path]:
    """Append ``rows`` (each merged with ``env``) to ``<out_dir>/<stem>.jsonl`` and ``<stem>.csv``.

    The CSV has the fixed columns :data:`RESULT_FIELDS` (or, when it exists, the
    columns of its header); fields outside them go to its ``extra`` column as
    JSON. The JSON lines keep every field.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, csv_path = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.csv"
    full_rows = [{**env, **row} for row in rows]
    for row in full_rows:  # one fsynced write per row: a kill can only tear the last line
        append_jsonl(jsonl, row, default=_json_default)
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    fields = RESULT_FIELDS
    if not new:
        # Keep an existing file's columns (an older RESULT_FIELDS): what it lacks goes to ``extra``.
        with open(csv_path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        if "extra" in header:
            fields = tuple(header)
    with open(csv_path, "a", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in full_rows:
            extra = {k: v for k, v in row.items() if k not in fields}
            flat = {k: row.get(k, "") for k in fields}
            flat["extra"] = json.dumps(extra, default=_json_default) if extra else ""
            writer.writerow(flat)
    return jsonl, csv_path


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(field, header, format)`` with ``format`` like ``".3g"``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for field, _, fmt in columns:
            value = row.get(field)
            if value is None or value == "":
                line.append("-")
            elif isinstance(value, float) and fmt:
                line.append(format(value, fmt))
            else:
                line.append(str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def default_out_dir(quick: bool) -> Path:
    """``bench/results/`` for real runs; smoke runs (``--quick``) stay out of the committed results."""
    import tempfile
    return Path(tempfile.gettempdir()) / "fsmooth-bench-quick" if quick else DEFAULT_OUT_DIR


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory(device) -> None:
    """Free cached blocks between measurements so one provider's pool does not squeeze the next."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def error_reason(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Derived row fields


def add_ratios(rows: list[dict], flops_per_iter: float | None, ceilings: dict | None,
               context: list[dict] | None = None) -> None:
    """Speedup over ``eager`` at the same section/batch/iters (looked up in ``context``, default ``rows``),
    achieved FLOP/s and roofline fractions."""
    eager = {(r.get("section"), r["batch"], r["iters"]): r for r in (context or rows)
             if r["provider"] == "eager" and r.get("useful_iters_per_s")}
    for r in rows:
        rate = r.get("useful_iters_per_s")
        if not rate:
            continue
        base = eager.get((r.get("section"), r["batch"], r["iters"]))
        if base is not None:
            if r.get("section") == "latency":
                r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
            else:
                r["speedup_vs_eager"] = rate / base["useful_iters_per_s"]
        per_iter = r.get("model_flops_per_iter") or flops_per_iter  # the exit model may be another network
        if per_iter and ceilings:
            r["flops_per_s"] = rate * per_iter
            r["roofline_fraction"] = r["flops_per_s"] / ceilings[r["dtype"]]["flops_per_s"]
            r["fraction_of_bf16_peak"] = r["flops_per_s"] / ceilings["bf16"]["flops_per_s"]
            r["fraction_of_tf32_peak"] = r["flops_per_s"] / ceilings["tf32"]["flops_per_s"]


def add_compaction_saving(rows: list[dict], context: list[dict] | None = None) -> None:
    """``1 - t(compacting engine) / t(same engine, masking only)`` on the compacting engine's row."""
    by_key = {(r.get("section"), r["provider"], r.get("batch")): r for r in (context or rows)}
    for r in rows:
        masked = by_key.get((r.get("section"), r["provider"] + "-nocompact", r.get("batch")))
        if masked and r.get("median_ms") and masked.get("median_ms"):
            r["compaction_saving"] = 1.0 - r["median_ms"] / masked["median_ms"]

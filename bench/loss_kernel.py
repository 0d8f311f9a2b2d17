"""Benchmark of the fused Triton feature-loss kernel (forward + gradient) against the eager reference.

For each shape and dtype: a correctness check of both providers against a
float64 reference (relative errors of loss and gradient, recorded, never
fatal), then the median/min/max time of forward+gradient
(``triton.testing.do_bench`` on CUDA), rotating among several input sets so
repeated calls do not just hit the L2 cache. Bandwidth is reported two ways:

* ``bytes_per_s``: the fewest bytes the operation must move (read F once,
  write the gradient once) over the time: comparable across providers;
* ``model_bytes_per_s`` (Triton only): the bytes the kernel family actually
  moves by design (two reads of F, the int8 signs written and read back, the
  gradient written).

Both are set against the device-to-device copy bandwidth measured in the same
run (bytes read plus written).

Usage::

    python bench/loss_kernel.py                 # CUDA: B=256 160x32x32 and odd shapes, fp32 and bf16
    python bench/loss_kernel.py --quick         # CPU smoke run (Triton only with TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

import benchlib

_log = logging.getLogger("bench.loss_kernel")

# The paper's layer (WRN-28-10 block1) at batch 256, then odd shapes: batch 1, N not a multiple of
# the kernel's block, a non-power-of-two batch, and channels_last.
FULL_SHAPES = ("256x160x32x32", "1x160x32x32", "513x37x11x13", "7x3x33x17", "64x160x32x32:cl")
QUICK_SHAPES = ("2x3x5x7", "3x16x8x8:cl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_shape(text: str) -> tuple[tuple[int, ...], bool]:
    """``"BxCxHxW"`` or ``"BxCxHxW:cl"`` (channels_last) -> (shape, channels_last)."""
    body, _, flag = text.partition(":")
    try:
        shape = tuple(int(v) for v in body.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x160x32x32[:cl], got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1 or flag not in ("", "cl") or (flag and len(shape) != 4):
        raise argparse.ArgumentTypeError(f"shape must look like 256x160x32x32[:cl], got {text!r}")
    return shape, flag == "cl"


def make_inputs(shape, channels_last: bool, dtype: torch.dtype, device, sets: int, seed: int) -> list[torch.Tensor]:
    """``sets`` independent random feature maps (never zeros; a per-sample offset so means differ)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(sets):
        x = torch.randn(shape, generator=gen) + torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=gen)
        x = x.to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


def triton_unavailable(device: torch.device) -> str | None:
    from fsmooth.functional import triton_available
    ok, reason = triton_available(device)
    return None if ok else reason


def providers(device: torch.device) -> dict:
    """name -> (fn(features) -> (loss, grad), unavailable reason or None)."""
    from fsmooth.reference import feature_loss_grad_reference
    out = {"reference": (feature_loss_grad_reference, None)}
    reason = triton_unavailable(device)
    if reason is None:
        from fsmooth.kernels.feature_loss import feature_loss_and_grad_triton
        out["triton"] = (feature_loss_and_grad_triton, None)
    else:
        out["triton"] = (None, reason)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().flatten(), ref.double().flatten()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def check(fn, features: torch.Tensor) -> dict:
    """Relative errors of loss and gradient against the float64 reference, and whether all are finite."""
    from fsmooth.reference import feature_loss_grad_reference
    ref_loss, ref_grad = feature_loss_grad_reference(features.double())
    loss, grad = fn(features)
    finite = bool(torch.isfinite(loss).all() and torch.isfinite(grad).all())
    return {"loss_rel_err": rel_err(loss, ref_loss), "grad_rel_err": rel_err(grad, ref_grad), "finite": finite,
            "grad_layout_ok": grad.shape == features.shape}


def bytes_moved(features: torch.Tensor) -> tuple[int, int]:
    """(fewest bytes: read F + write grad, bytes the Triton kernel family moves by design)."""
    n, elt = features.numel(), features.element_size()
    minimal = 2 * n * elt
    # pass 1 reads F; pass 2 reads F and writes int8 signs; backward reads signs and writes the gradient.
    triton_model = 2 * n * elt + n + n + n * elt
    return minimal, triton_model


# Loss: fp32 accumulation whatever the input dtype. Gradient: stored in the input dtype (bf16 rounding is
# ~4e-3), and an element within rounding of its sample's mean may take the other sign in fp32 than in
# fp64 (one flip in a 64x160x32x32 batch is ~6e-4 of the norm): correct kernels stay far below 1e-2,
# wrong ones land near 1.
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-2


def bench_shape(shape_text: str, dtype_name: str, device: torch.device, copy_bw: float | None,
                sets: int, seed: int, rep_ms: float) -> list[dict]:
    shape, channels_last = parse_shape(shape_text)
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, channels_last, dtype, device, sets, seed)
    minimal, model = bytes_moved(inputs[0])
    rows = []
    for name, (fn, reason) in providers(device).items():
        row = {"section": "loss-kernel", "provider": name, "dtype": dtype_name, "shape": shape_text,
               "batch": shape[0]}
        if fn is None:
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        try:
            checked = check(fn, inputs[0])
            ok = checked["finite"] and checked["grad_rel_err"] < GRAD_TOLERANCE \
                and checked["loss_rel_err"] < LOSS_TOLERANCE
            counter = iter(range(1 << 62))
            timing = benchlib.bench_kernel_ms(lambda: fn(inputs[next(counter) % len(inputs)]), device,
                                              rep_ms=rep_ms)
        except Exception as exc:  # record and go on: one failing shape must not lose the others
            rows.append({**row, "status": "error", "reason": benchlib.error_reason(exc)})
            _log.warning("loss kernel %s %s %s failed: %s", name, shape_text, dtype_name, exc)
            continue
        seconds = timing.median_ms * 1e-3
        out = {**row, **timing.as_row(), "status": "ok" if ok else "check_failed",
               "rel_err": checked["grad_rel_err"], "loss_rel_err": checked["loss_rel_err"],
               "bytes_per_s": minimal / seconds, "min_bytes": minimal}
        if name == "triton":
            out["model_bytes"] = model
            out["model_bytes_per_s"] = model / seconds
        if copy_bw:
            out["copy_bandwidth_fraction"] = out["bytes_per_s"] / copy_bw
            if "model_bytes_per_s" in out:
                out["model_copy_bandwidth_fraction"] = out["model_bytes_per_s"] / copy_bw
        rows.append(out)
    ref = next((r for r in rows if r["provider"] == "reference" and "median_ms" in r), None)
    for r in rows:
        if ref is not None and "median_ms" in r:
            r["speedup_vs_eager"] = ref["median_ms"] / r["median_ms"]
    return rows


def run(shapes, dtype_names, device, sets: int = 3, seed: int = 0, rep_ms: float = 100,
        copy_bytes: int = 1 << 30) -> tuple[list[dict], dict]:
    """All shape x dtype rows, plus the measured copy bandwidth (one ``copy`` row first)."""
    device = torch.device(device)
    copy = benchlib.copy_bandwidth(device, copy_bytes)
    copy_row = {"section": "loss-kernel", "provider": "copy", "status": "ok", "dtype": "fp32",
                "shape": f"{copy['copy_bytes'] // 8}", **{k: copy[k] for k in ("median_ms", "min_ms", "max_ms",
                                                                                 "repeats", "bytes_per_s")}}
    rows = [copy_row]
    for shape in shapes:
        for dtype_name in dtype_names:
            _log.info("loss kernel: %s %s", shape, dtype_name)
            rows += bench_shape(shape, dtype_name, device, copy["bytes_per_s"], sets, seed, rep_ms)
            benchlib.release_memory(device)
    return rows, copy


TABLE_COLUMNS = (("provider", "provider", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                 ("status", "status", ""), ("median_ms", "median ms", ".4g"), ("min_ms", "min", ".4g"),
                 ("max_ms", "max", ".4g"), ("bytes_per_s", "B/s (min bytes)", ".3g"),
                 ("copy_bandwidth_fraction", "of copy BW", ".2f"), ("speedup_vs_eager", "x ref", ".2f"),
                 ("rel_err", "grad rel err", ".1e"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU-friendly configuration (seconds)")
    p.add_argument("--shapes", nargs="+", default=None, help="BxCxHxW[:cl] shapes (default: the paper's + odd)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--input-sets", type=int, default=3, help="inputs rotated between timed calls")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per measurement (ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default bench/results/; with --quick a temp dir")
    p.add_argument("--no-save", action="store_true", help="do not append result rows")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = str(benchlib.default_out_dir(args.quick))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.configure_logging(args.verbose)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    copy_bytes = (8 << 20) if args.quick or device.type != "cuda" else (1 << 30)
    rep_ms = min(args.rep_ms, 20.0) if args.quick else args.rep_ms
    env = benchlib.environment(device)
    rows, _ = run(shapes, args.dtypes, device, args.input_sets, args.seed, rep_ms, copy_bytes)
    if not args.no_save:
        paths = benchlib.append_results(args.out_dir, "loss_kernel", env, rows)
        _log.info("appended %d rows to %s", len(rows), ", ".join(map(str, paths)))
    print(f"# loss kernel, {env['gpu_name'] if device.type == 'cuda' else 'CPU'}; torch {env['torch']}, "
          f"triton {env['triton']}, TRITON_INTERPRET={env['triton_interpret']}")
    print(benchlib.format_table(rows, TABLE_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

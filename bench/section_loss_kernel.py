"""``loss-kernel`` section of ``iters_per_sec.py``: ``bench/loss_kernel.py``'s shapes, planned like a row."""
from __future__ import annotations

import loss_kernel


def section_loss_kernel(args, device, plan=None) -> list[dict]:
    """``bench/loss_kernel.py``'s shapes in fp32 and bf16. Planned from ``do_bench``'s time budget per
    measurement (warm-up + repetitions), doubled for the float64 checks and the input generation."""
    shapes = loss_kernel.QUICK_SHAPES if args.quick else loss_kernel.FULL_SHAPES
    rep_ms = 20.0 if args.quick else 100.0
    dtypes = ["fp32", "bf16"]
    if plan is not None:
        measurements = len(shapes) * len(dtypes) * 2  # Triton and the reference
        planned_s = 2 * measurements * (25.0 + rep_ms) * 1e-3
        plan.announce("loss-kernel", [(f"{len(shapes)} shapes x {dtypes} x 2 providers", planned_s)])
        reason = plan.skip_reason(planned_s)
        if reason is not None:
            return [{"section": "loss-kernel", "provider": "all", "status": "skipped", "reason": reason,
                     "planned_s": round(planned_s, 3)}]
    rows, _ = loss_kernel.run(shapes, dtypes, device, args.input_sets, args.seed, rep_ms, args.copy_bytes)
    return rows

"""``roofline`` section of ``iters_per_sec.py``: the device's copy and matrix-product rates measured in this
run, and the FLOPs of one image-iteration of the prefix."""
from __future__ import annotations

import torch

import fsmooth.models as models

import benchlib


def section_roofline(model, layer, args, device) -> tuple[list[dict], dict, dict]:
    module = models.prefix(model, layer)
    flops = benchlib.count_flops(module, torch.rand(1, 3, 32, 32, device=device))
    ceilings = benchlib.device_ceilings(device, args.matmul_size, args.copy_bytes)
    rows = [{"section": "roofline", "provider": "flops-per-image-iteration", "status": "ok", "dtype": "-",
             "batch": 1, "iters": 1, "shape": "1x3x32x32", **flops}]
    for key in ("bf16", "tf32", "fp32"):
        c = ceilings[key]
        rows.append({"section": "roofline", "provider": f"matmul-{key}", "status": "ok", "dtype": key,
                     "shape": f"{c['size']}^3", **{k: v for k, v in c.items() if k != "size"}})
    c = ceilings["copy"]
    rows.append({"section": "roofline", "provider": "copy", "status": "ok", "dtype": "fp32",
                 "shape": str(c["copy_bytes"]), **c})
    return rows, flops, ceilings

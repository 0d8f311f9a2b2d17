"""Which ops of one Active Defense iteration launch tensor copies, and what they cost on the device.

One iteration of the defense loop (prefix forward in the compute dtype, fused feature loss and gradient,
input gradient through the prefix) is profiled with shapes; every ``copy_``/``clone``/``_to_copy`` is listed
with its shapes, its device time and the ops it ran under (its parents in the profiler's tree), largest
device time first. A copy of a full feature tensor per layer is what a layout mismatch looks like (a
channels_last prefix handed an NCHW gradient, or a backward op that returns NCHW).

    python bench/copy_sources.py --batch 512                   # GPU: the bf16 channels_last prefix
    python bench/copy_sources.py --batch 2 --backend reference  # CPU smoke run

With ``$OUT`` set (the device tool) the rows are also written to ``$OUT/copy_sources.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from fsmooth.defense.prefix_state import PrefixState
from fsmooth.functional import feature_loss_and_grad
from fsmooth.models import build

COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


def profile_copies(prefix: PrefixState, t: torch.Tensor, backend: str = "auto", warmup: int = 3) -> list[dict]:
    """The copies of one defense iteration on ``t``: one row per (op, shapes, parents), largest device time
    first, with ``calls`` and ``device_us`` (0 on CPU)."""
    scale = torch.ones(t.shape[0], device=t.device)
    cuda = t.device.type == "cuda"

    def iteration(module):
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            feats = prefix.features(module, leaf)
        _, grad = feature_loss_and_grad(feats.detach(), grad_scale=scale, backend=backend)
        torch.autograd.grad(feats, leaf, grad_outputs=grad)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prefix.session() as module:
        for _ in range(warmup):
            iteration(module)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities, record_shapes=True) as prof:
            iteration(module)
            if cuda:
                torch.cuda.synchronize()
    rows = collections.defaultdict(lambda: {"calls": 0, "device_us": 0.0})
    for e in prof.events():
        if e.name not in COPY_OPS:
            continue
        parents, p = [], e.cpu_parent
        while p is not None and len(parents) < 4:
            parents.append(p.name)
            p = p.cpu_parent
        row = rows[(e.name, str(e.input_shapes), " < ".join(parents))]
        row["calls"] += 1
        row["device_us"] += e.self_device_time_total if cuda else 0.0
    return [{"op": op, "shapes": shapes, "parents": parents, **v}
            for (op, shapes, parents), v in sorted(rows.items(), key=lambda kv: -kv[1]["device_us"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="wrn-28-10")
    ap.add_argument("--layer", default="block1")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                    help="the feature loss's backend (auto: Triton on CUDA when fsmooth is installed)")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build(args.arch).eval().to(dev)
    prefix = PrefixState(model, args.layer, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    t = torch.rand(args.batch, 3, 32, 32, device=dev)
    copies = profile_copies(prefix, t, args.backend)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "arch": args.arch, "layer": args.layer, "batch": args.batch, "dtype": args.dtype,
           "backend": args.backend, "copies": copies}
    for c in copies:
        print(f"{c['device_us']:10.1f} us  x{c['calls']:<3} {c['op']}  {c['shapes'][:80]}  <  {c['parents']}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "copy_sources.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

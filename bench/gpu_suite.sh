#!/usr/bin/env bash
# The GPU suite of fsmooth in at most three device calls of 8 minutes each (bench/gpu_suite.py does the work):
#
#   bash bench/gpu_suite.sh first    # THE GPU check: install + fsmooth._C build, import check, GPU tests,
#                                    # headline throughput table (batches 512 64 1)
#   bash bench/gpu_suite.sh second   # latency (batch 1 and 8, 300 iterations), loss kernel, compile max-autotune
#   bash bench/gpu_suite.sh third    # early exit (compaction vs masking) at 512, the 10,000-input workload
#   bash bench/gpu_suite.sh fourth   # after a first run: the GPU tests again, BatchNorm A/B, the kernel profile (graph-bf16,
#                                    # eager-bf16, torch.compile at 512), the compiled prefix inside the graphs,
#                                    # fp32 early exit, compile max-autotune
#   bash bench/gpu_suite.sh fifth    # after fourth: GPU tests, the affine kernel's A/B, graph-bf16-compiled's
#                                    # profile, batch-1 latency, torch.compile bf16 max-autotune at 512
#   bash bench/gpu_suite.sh setup    # install; rebuild fsmooth._C if csrc/ changed or it was built for another torch
#   bash bench/gpu_suite.sh tests    # setup + the GPU tests only
#
# No argument lists the calls and their steps. Every step prints its planned time before it runs and is
# skipped when it would overrun the call's budget (--budget-s, default 480 s). Results go to $OUT when set
# (the device tool), else bench/results/gpu-<call>-<time>/: iters_per_sec.{jsonl,csv}, steps.jsonl,
# summary.md, suite.log. See bench/README.md.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_suite.py --started "$started" "$@"

#!/usr/bin/env bash
# GPU runner: the CUDA tests, the loss-kernel benchmark, the engine's first timing and the full
# iters_per_sec benchmark, in steps that each fit one 10-minute device command.
#
#   bash bench/gpu_suite.sh STEP [STEP ...]      (no STEP: list the steps)
#
# Steps (each bounded by STEP_TIMEOUT seconds, default 540, and all together by SUITE_BUDGET seconds
# from the script's start, default 570, so one device command never passes its 600 s limit):
#   setup             only the install below (fresh machine: about a minute or two for the extension)
#   tests             pytest -m cuda (GPU tests of the whole project)
#   kernel            bench/loss_kernel.py: fp32/bf16, B=256 160x32x32 and odd shapes
#   engine            first engine timing: eager vs graph engines, B=1,64,512, 300 fixed iterations
#   throughput-small  iters_per_sec throughput, batches 1 8 64, all providers (torch.compile: reduce-overhead)
#   throughput-large  iters_per_sec throughput, batches 256 512 + the largest batch that fits
#   latency           iters_per_sec latency, batches 1 8, 300 fixed iterations, all providers
#   compile           torch.compile max-autotune (falling back) vs eager and graph-bf16 at batch 512
#   early-exit        synthetic exit schedule at batch 512: masking vs compaction
#   workload          10,000 inputs: masking vs compaction vs continuous batching
#   quick             the CPU smoke configuration, on the GPU machine (seconds)
#
# Every call first installs the project (editable, no network, builds fsmooth._C with nvcc) unless
# `import fsmooth.kernels` already works. Results: JSON lines + CSV appended under RESULTS (default
# $OUT when set, else bench/results/), each step's printed table and status in RESULTS/summary.md,
# everything else in RESULTS/suite.log. That is at most 7 files: within the device tool's 8 per call.
# bench/README.md gives the exact device-tool invocations.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${RESULTS:-${OUT:-$ROOT/bench/results}}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
SUITE_BUDGET=${SUITE_BUDGET:-570}
SUITE_START=$(date +%s)
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
LOG=$RESULTS/suite.log
SUMMARY=$RESULTS/summary.md
export PYTHONUNBUFFERED=1
# Pure-Python packages and the dataset prepared by ../shared/tools/prep-gpu-carry.sh, when carried.
if [ -d "$ROOT/.carry/site" ]; then
  export PYTHONPATH=$ROOT/.carry/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f "$ROOT/.carry/cifar10-jpeg-q75.tar.gz" ]; then
  export FSMOOTH_DATA=$ROOT/.carry/cifar10-jpeg-q75.tar.gz
fi

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

setup() {
  if (cd /tmp && "$PY" -c "import fsmooth.kernels, fsmooth.defense" >/dev/null 2>&1); then
    return 0
  fi
  echo "== setup: pip install -e . (no index, builds fsmooth._C)" | tee -a "$LOG"
  MAX_JOBS=${MAX_JOBS:-16} timeout 480 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
    >>"$LOG" 2>&1 || { echo "setup failed: see suite.log" | tee -a "$LOG"; return 1; }
  (cd /tmp && "$PY" -c "import fsmooth._ext as e; print('extension:', e.load_extension()[1] or 'loaded')") \
    2>&1 | tee -a "$LOG"
}

header() {
  {
    echo "# fsmooth GPU suite"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
    echo "- versions: $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)' 2>&1)"
    echo "- command: bash bench/gpu_suite.sh $*"
    echo
  } >>"$SUMMARY"
}

# run_step NAME COMMAND...: bounded run; stdout+stderr to suite.log, the printed table to summary.md.
run_step() {
  local name=$1; shift
  local tmp start rc limit
  start=$(date +%s)
  limit=$(( SUITE_BUDGET - (start - SUITE_START) ))
  [ "$limit" -gt "$STEP_TIMEOUT" ] && limit=$STEP_TIMEOUT
  if [ "$limit" -lt 30 ]; then
    echo "== $name: skipped, ${limit}s left of SUITE_BUDGET" | tee -a "$LOG" "$SUMMARY"
    return 1
  fi
  tmp=$(mktemp)
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >"$tmp" 2>>"$LOG"
  rc=$?
  cat "$tmp" >>"$LOG"
  {
    echo "## $name (exit $rc$([ $rc = 124 ] && echo ', timed out'), $(( $(date +%s) - start )) s)"
    echo
    echo '```'
    echo "$*"
    tail -n 80 "$tmp"
    echo '```'
    echo
  } >>"$SUMMARY"
  tail -n 40 "$tmp"
  rm -f "$tmp"
  return $rc
}

IPS=("$PY" bench/iters_per_sec.py --out-dir "$RESULTS" -v)
# eager first (the others' ratios refer to it), torch.compile last (its compile time is the most likely cut).
ALL_PROVIDERS=(eager eager-bf16 fsmooth-eager graph-fp32 graph-tf32 graph-bf16 chunked-fp32 chunked-tf32
               chunked-bf16 compile compile-bf16)

step() {
  case "$1" in
    setup)
      return 0 ;;
    tests)
      run_step tests "$PY" -m pytest -m cuda -q -rs tests/ ;;
    kernel)
      run_step kernel "$PY" bench/loss_kernel.py --out-dir "$RESULTS" -v ;;
    engine)
      run_step engine "${IPS[@]}" --sections latency --latency-batches 1 64 512 --latency-iters 300 \
        --providers eager fsmooth-eager graph-fp32 chunked-fp32 graph-tf32 graph-bf16 chunked-bf16 \
        --repeats 3 --warmup 0 ;;
    throughput-small)
      run_step throughput-small "${IPS[@]}" --sections throughput --batches 1 8 64 --iters 50 \
        --providers "${ALL_PROVIDERS[@]}" --compile-modes reduce-overhead default --max-batch-probe '' ;;
    throughput-large)
      run_step throughput-large "${IPS[@]}" --sections throughput --batches 256 512 --iters 50 \
        --providers "${ALL_PROVIDERS[@]}" --compile-modes reduce-overhead default --repeats 3 --warmup 0 ;;
    latency)
      run_step latency "${IPS[@]}" --sections latency --latency-batches 1 8 --latency-iters 300 \
        --providers "${ALL_PROVIDERS[@]}" --compile-modes reduce-overhead default ;;
    compile)
      run_step compile "${IPS[@]}" --sections throughput --batches 512 --iters 50 \
        --providers eager compile compile-bf16 graph-bf16 --compile-modes max-autotune reduce-overhead default \
        --max-batch-probe '' --repeats 3 --warmup 0 ;;
    early-exit)
      run_step early-exit "${IPS[@]}" --sections early-exit --exit-batches 512 --exit-iters 300 \
        --repeats 3 --warmup 0 ;;
    workload)
      run_step workload "${IPS[@]}" --sections workload --workload-size 10000 --workload-batch 512 \
        --exit-iters 300 ;;
    quick)
      run_step quick "${IPS[@]}" --quick ;;
    *)
      echo "unknown step: $1" >&2; usage >&2; return 2 ;;
  esac
}

if [ $# -eq 0 ]; then
  usage
  exit 0
fi
for s in "$@"; do
  case "$s" in
    setup|tests|kernel|engine|throughput-small|throughput-large|latency|compile|early-exit|workload|quick) ;;
    *) echo "unknown step: $s" >&2; usage >&2; exit 2 ;;
  esac
done
header "$@"
setup || exit 1
status=0
for s in "$@"; do
  step "$s" || status=1
done
exit $status

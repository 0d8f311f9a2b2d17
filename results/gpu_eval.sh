#!/usr/bin/env bash
# One gpu-* queue of results/run_evals.sh on the GPU machine, in one device call, its reports brought back.
#
#   bash ../shared/tools/prep-gpu-carry.sh      # here, once: .carry/ (the data, pyautoattack, torchattacks)
#   run(command="bash results/gpu_eval.sh gpu-adaptive", carry=[".carry"], timeout_s=600)
#
# On the device: installs fsmooth and builds fsmooth._C (bench/gpu_suite.sh setup), runs the queue with the
# carried packages and data under a time limit (FSMOOTH_EVAL_LIMIT_S, default 420 s; the evaluation is
# resumable by chunks, but only within one machine: the adversarial images stay there), then packs each run's
# report, log and chunk records (JSON; not the images) into $OUT/eval-<queue>.tar.gz. Here, unpack it with
#   tar xzf <files_at>/eval-<queue>.tar.gz -C results/eval
# and commit results/eval/<run>/ (report.{json,md}, the chunk JSON) and results/eval/<run>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
queue=${1:?usage: bash results/gpu_eval.sh gpu-adaptive|gpu-row2}
case "$queue" in
    gpu-adaptive) runs=(fs-adaptive-gpu) ;;
    gpu-row2) runs=(fs-row2-gpu) ;;
    *) echo "unknown GPU queue $queue: gpu-adaptive or gpu-row2" >&2; exit 2 ;;
esac
limit=${FSMOOTH_EVAL_LIMIT_S:-420}
out=${OUT:-/tmp/fsmooth-gpu-eval}
eval_dir=${FSMOOTH_EVAL_DIR:-/tmp/fsmooth-eval}   # outside the tree: the images never travel back
carry=${FSMOOTH_CARRY:-$PWD/.carry}
mkdir -p "$out" "$eval_dir"
[ -d "$carry/site" ] || { echo "no $carry/site: run ../shared/tools/prep-gpu-carry.sh and carry .carry" >&2; exit 2; }
export PYTHONPATH=$carry/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export FSMOOTH_DATA=${FSMOOTH_DATA:-$carry/cifar10-jpeg-q75.tar.gz}
if [ -z "${FSMOOTH:-}" ]; then  # the CLI through the interpreter: a console script may not be on PATH there
    printf '#!/bin/sh\nexec %s -m fsmooth "$@"\n' "${PYTHON:-python3}" > "$eval_dir/fsmooth-cli"
    chmod +x "$eval_dir/fsmooth-cli"
    FSMOOTH=$eval_dir/fsmooth-cli
fi
export FSMOOTH_EVAL_DIR=$eval_dir FSMOOTH

if [ "${FSMOOTH_SKIP_SETUP:-0}" = 0 ]; then
    OUT="$out/setup" bash bench/gpu_suite.sh setup --budget-s 150 || { echo "setup failed: see $out/setup" >&2; exit 1; }
fi
started=$(date +%s)
timeout --signal=INT --kill-after=20 "$limit" bash results/run_evals.sh "$queue"
rc=$?
echo "== queue $queue: exit $rc after $(( $(date +%s) - started )) s (limit $limit s; 124: cut at the limit)"
for run in "${runs[@]}"; do
    tail -5 "$eval_dir/$run.log" 2>/dev/null
    [ -f "$eval_dir/$run/report.md" ] && sed -n 1,60p "$eval_dir/$run/report.md"
done
(cd "$eval_dir" && find "${runs[@]/%/.log}" "${runs[@]}" -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' \) \
    2>/dev/null | tar czf "$out/eval-$queue.tar.gz" -T -)
ls -l "$out"
exit "$rc"

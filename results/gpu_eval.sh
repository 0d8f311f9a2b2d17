#!/usr/bin/env bash
# gpu-* queues of results/run_evals.sh on the GPU machine, in one device call, their reports brought back.
#
#   bash ../shared/tools/prep-gpu-carry.sh      # here, once: .carry/ (the data, pyautoattack, torchattacks)
#   run(command="bash results/gpu_eval.sh gpu-adaptive", carry=[".carry"], timeout_s=600)
#   run(command="bash results/gpu_eval.sh gpu-rand gpu-paper", ...)   # several queues in turn, one deadline
#
# On the device: installs fsmooth and builds fsmooth._C (bench/gpu_suite.sh setup), runs the queue with the
# carried packages and data until a deadline (FSMOOTH_EVAL_DEADLINE_S seconds after the start, default 540,
# less 40 s for packing: the device command may run 600), then packs each run's report, per-image results,
# log and chunk records (JSON) into $OUT/eval-<queue>.tar.gz. A finished run leaves its adversarial images
# behind; an unfinished one brings them back too (its chunks' safetensors, up to 12 MiB in all), and once
# unpacked and committed under results/eval/<run>/state, the next call (on a warm or a fresh machine) copies
# that state in and resumes by chunks; its report is written only when it finishes. Cost: on one CPU core the adaptive protocol took 19-23 s per image and lambda (fs-adaptive), so
# gpu-adaptive (5 lambdas, n = 1000) fits one call only if the GPU is some 250-300x faster than that core; run
# gpu-adaptive-200 first to measure (it took 190 s on an H200: 0.17-0.18 s per image and lambda, about
# 1.7 ms per defended gradient and image; so gpu-rand, about 2,000 such gradients per image for n = 100,
# should take some 6 minutes: an estimate). Exit status 3: cut at the deadline (not 124, the device tool's own).
# The working tree and .carry travel together, 64 MiB at most (on 2026-11-26 the tree was about 19 MB and
# .carry 20 MB). Unpack with
#   tar xzf <files_at>/eval-<queue>.tar.gz -C results/eval      (eval-<q1>+<q2>.tar.gz for several queues)
# and commit results/eval/<run>/ (report.{json,md}, the chunk JSON, an unfinished run's state images) and
# results/eval/<run>.log. Once a run has finished, remove its state images from the tree
# (git rm results/eval/<run>/state/*/*.safetensors): the tree and .carry travel together.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
[ $# -ge 1 ] || { echo "usage: bash results/gpu_eval.sh QUEUE [QUEUE...] (gpu-adaptive-200|gpu-adaptive|gpu-row2|gpu-rand|gpu-paper)" >&2; exit 2; }
queues=("$@")
runs=()
for queue in "${queues[@]}"; do
    case "$queue" in
        gpu-adaptive-200) runs+=(fs-adaptive-gpu-200) ;;
        gpu-adaptive) runs+=(fs-adaptive-gpu) ;;
        gpu-row2) runs+=(fs-row2-gpu) ;;
        gpu-rand) runs+=(fs-rand-gpu) ;;
        gpu-paper) runs+=(fs-paper-gpu) ;;
        *) echo "unknown GPU queue $queue: gpu-adaptive-200, gpu-adaptive, gpu-row2, gpu-rand or gpu-paper" >&2; exit 2 ;;
    esac
done
name=$(IFS=+; echo "${queues[*]}")   # the archive: eval-<queue>.tar.gz, eval-<q1>+<q2>.tar.gz for several
deadline=${FSMOOTH_EVAL_DEADLINE_S:-540}
out=${OUT:-/tmp/fsmooth-gpu-eval}
eval_dir=${FSMOOTH_EVAL_DIR:-/tmp/fsmooth-eval}   # outside the tree: only what is packed below travels back
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

# The committed state of an unfinished run (brought back by an earlier session) is where it resumes; on a warm
# machine its own newer chunks are kept (cp -n).
seed_dir=${FSMOOTH_EVAL_SEED_DIR:-$PWD/results/eval}
for run in "${runs[@]}"; do
    if [ -d "$seed_dir/$run/state" ] && [ ! -f "$seed_dir/$run/report.json" ]; then
        mkdir -p "$eval_dir/$run"
        cp -rn "$seed_dir/$run/state" "$eval_dir/$run/"
        [ -f "$seed_dir/$run.log" ] && [ ! -f "$eval_dir/$run.log" ] && cp "$seed_dir/$run.log" "$eval_dir/$run.log"
        echo "== $run: resuming from the committed state ($(find "$eval_dir/$run/state" -name 'chunk*.json' | wc -l) chunk records)"
    fi
done

if [ "${FSMOOTH_SKIP_SETUP:-0}" = 0 ]; then
    OUT="$out/setup" bash bench/gpu_suite.sh setup --budget-s 150 || { echo "setup failed: see $out/setup" >&2; exit 1; }
fi
rc=0
for queue in "${queues[@]}"; do  # in the order given, each while time is left; a failure stops the rest
    limit=$(( deadline - 40 - ($(date +%s) - started) ))
    if [ "$limit" -le 30 ]; then
        echo "only $limit s left before the deadline: not starting $queue" >&2
        rc=3
        break
    fi
    queue_started=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" bash results/run_evals.sh "$queue"
    rc=$?
    [ "$rc" = 124 ] && rc=3
    echo "== queue $queue: exit $rc after $(( $(date +%s) - queue_started )) s (limit $limit s; 3: cut at the deadline)"
    [ "$rc" = 0 ] || break
done
for run in "${runs[@]}"; do
    tail -5 "$eval_dir/$run.log" 2>/dev/null
    [ -f "$eval_dir/$run/report.md" ] && sed -n 1,60p "$eval_dir/$run/report.md"
done
list=$(mktemp)
(cd "$eval_dir" && find "${runs[@]/%/.log}" "${runs[@]}" -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' \
    -o -name per_image.safetensors \) 2>/dev/null) > "$list"
# An unfinished run also brings back its chunks' images (the adversarial points), up to a size the device tool
# returns, so that a later session resumes it from the committed state instead of starting over.
state_list=$(mktemp)
for run in "${runs[@]}"; do
    [ -f "$eval_dir/$run/report.json" ] || (cd "$eval_dir" && find "$run/state" -type f -name '*.safetensors' 2>/dev/null)
done > "$state_list"
if [ -s "$state_list" ]; then
    bytes=$(cd "$eval_dir" && tr '\n' '\0' < "$state_list" | du -cb --files0-from=- | tail -1 | cut -f1)
    if [ "$bytes" -le "${FSMOOTH_EVAL_STATE_MAX_BYTES:-12582912}" ]; then
        cat "$state_list" >> "$list"
        echo "== unfinished runs: packing their $(wc -l < "$state_list") state files ($bytes bytes) to resume later"
    else
        echo "== unfinished runs: their state files ($bytes bytes) are too big to bring back: they resume only on this warm machine"
    fi
fi
(cd "$eval_dir" && tar czf "$out/eval-$name.tar.gz" -T "$list")
rm -f "$list" "$state_list"
ls -l "$out"
exit "$rc"

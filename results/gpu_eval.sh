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
# log and chunk records (JSON) into $OUT/eval-<queue>.tar.gz; for a run that has not finished, also its
# chunks' tensors and saved progress (saved as a chunk goes: AutoAttack after each attack and batch; EOT-PGD,
# APGD, APGD-T, Square and FAB-T every minute inside the attack). An archive over 15 MiB comes back in parts
# (eval-<queue>.tar.gz.part0, .part1, ...: at most 4, 60 MiB; beyond that without the tensors, which then stay
# there, with a warning). Committed to results/eval/<run>/state, they travel with the tree to the next device
# session, which copies them into its evaluation folder and resumes: a finished chunk is not redone, an
# unfinished one goes on from its last save (only an APGD run is redone whole). That holds only for state that
# fits what a call carries (below): a chunk's adversarial images weigh 12 KiB per image and attack, so 61 MB
# for gpu-adaptive's 1000 images and 5 lambdas. Larger state, unpacked here but not committed, still gives a
# report of the chunks it holds: the queue's line of results/run_evals.sh with --out at the unpacked folder
# and --partial (its re-scoring then runs here). A finished run's
# adversarial images stay on the device; its report is written only when it finishes. Cost: on one CPU core the adaptive protocol took 18.5-21.1 s per image and lambda
# (fs-adaptive); gpu-adaptive-200 took 190 s on an H200 (0.17-0.18 s per image and lambda at batch 200), and
# gpu-adaptive's chunks of 250 took 27.7-30.6 s per lambda (2026-11-27: cut at 18 of 20, see
# bench/results/gpu-runs-20261127.md; its state, 61 MB of images, came back without tensors); run again
# alone in the next session, on an H100, it finished in 9 min 22 s (28.6-31.3 s per chunk and lambda;
# results/eval/fs-adaptive-gpu), its first call's state coming back in three parts. A
# chunk's time is set by the attack's steps in sequence, not by its images: each defended step took about
# 0.33 s there at batch 200 (and, we infer, at any batch up to the engine's 256 slots), the slowest image running the defense's 1000 iterations (34-36 s per
# 100-step APGD run in fs-adaptive-gpu-200/report.json). So an attack of S sequential steps needs about
# 0.33 x S seconds per chunk (estimates): APGD-CE 100 steps, under a minute; AutoAttack rand's APGD with 20
# EOT draws about 2,000 steps, some 11 minutes per attack; Square alone up to 5,000, some 27 minutes; EOT-PGD
# 101 per restart, each a pass of 20 copies per image (its EOT draws in one batch).
# With FSMOOTH_EVAL_DETACH=1 the queues run detached, in a process session of their own that outlives the
# call on the warm machine: each call waits until its deadline and packs what is there;
#   run(command="FSMOOTH_EVAL_DETACH=1 bash results/gpu_eval.sh gpu-rand", carry=[".carry"], timeout_s=600)
# then the same command again at once (a machine idle for 30 s goes back, and the run with it). What a
# session leaves unfinished resumes in the next from its last save, except an APGD run, which must finish
# within one session's device time (15 minutes): gpu-rand's APGD-CE takes about 11 minutes (estimate). Exit status 3: cut at the
# deadline, or still running detached (not 124, the device tool's own).
# The working tree and .carry travel together, 64 MiB at most (on 2026-11-27 the tree was about 34 MB and
# .carry 20 MB). Unpack with
#   tar xzf <files_at>/eval-<queue>.tar.gz -C results/eval      (eval-<q1>+<q2>.tar.gz for several queues)
#   cat <files_at>/eval-<queue>.tar.gz.part* | tar xz -C results/eval      (an archive in parts)
# and commit results/eval/<run>/ (report.{json,md}, the chunk JSON) and results/eval/<run>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
[ $# -ge 1 ] || { echo "usage: bash results/gpu_eval.sh QUEUE [QUEUE...] (gpu-adaptive-200|gpu-adaptive|gpu-row2|gpu-row7|gpu-row6|gpu-eot-100|gpu-rand|gpu-paper|gpu-fabt)" >&2; exit 2; }
queues=("$@")
runs=()
for queue in "${queues[@]}"; do
    case "$queue" in
        gpu-adaptive-200) runs+=(fs-adaptive-gpu-200) ;;
        gpu-adaptive) runs+=(fs-adaptive-gpu) ;;
        gpu-row2) runs+=(fs-row2-gpu) ;;
        gpu-row7) runs+=(std-row7-gpu) ;;
        gpu-row6) runs+=(fs-row6-gpu) ;;
        gpu-eot-100) runs+=(fs-eot-gpu-100) ;;
        gpu-rand) runs+=(fs-rand-gpu) ;;
        gpu-paper) runs+=(fs-paper-gpu) ;;
        gpu-fabt) runs+=(fs-fabt-gpu) ;;
        *) echo "unknown GPU queue $queue: gpu-adaptive-200, gpu-adaptive, gpu-row2, gpu-row7, gpu-row6, gpu-eot-100, gpu-rand, gpu-paper or gpu-fabt" >&2; exit 2 ;;
    esac
done
name=$(IFS=+; echo "${queues[*]}")   # the archive: eval-<queue>.tar.gz, eval-<q1>+<q2>.tar.gz for several
deadline=${FSMOOTH_EVAL_DEADLINE_S:-540}
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
resume_dir=${FSMOOTH_RESUME_DIR:-results/eval}   # where earlier sessions' state was committed

seed_state() {  # an earlier session's state of each run (from the tree), where this machine has none yet
    local run
    for run in "${runs[@]}"; do
        if [ -d "$resume_dir/$run/state" ] && [ ! -d "$eval_dir/$run/state" ]; then
            mkdir -p "$eval_dir/$run" && cp -r "$resume_dir/$run/state" "$eval_dir/$run/"
            [ -f "$resume_dir/$run.log" ] && [ ! -f "$eval_dir/$run.log" ] && cp "$resume_dir/$run.log" "$eval_dir/"
            echo "== $run: resuming from $resume_dir/$run/state ($(find "$eval_dir/$run/state" -name 'chunk*.json' \
                ! -name '*.progress.json' | wc -l) chunk records, $(find "$eval_dir/$run/state" -name '*.progress.json' \
                | wc -l) in progress)"
        fi
    done
}

setup() {
    [ "${FSMOOTH_SKIP_SETUP:-0}" = 0 ] || return 0
    OUT="$out/setup" bash bench/gpu_suite.sh setup --budget-s 150 || { echo "setup failed: see $out/setup" >&2; exit 1; }
}
rc=0
if [ "${FSMOOTH_EVAL_DETACH:-0}" = 1 ]; then
    # Detached: the queues run in a process session of their own (setsid), which the device tool leaves running
    # when the call returns, on the warm machine; each call waits for it until its deadline, then packs what
    # is there. Call again at once with the same queues (a machine left idle goes back, and the run with it).
    pidfile=$eval_dir/detached-$name.pid
    rcfile=$eval_dir/detached-$name.rc
    alive() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
    if alive; then
        echo "== $name: the detached run (pid $(cat "$pidfile")) is still going: waiting for it"
    elif [ -f "$pidfile" ]; then
        echo "== $name: the detached run has ended"
    else
        setup
        seed_state
        # A snapshot of what the run reads (the package, the carried packages and data, the queue script): the
        # device tool copies the working tree and .carry anew on each call while the run goes on, and bash
        # reads a script as it runs.
        snap=$eval_dir/snapshot-$name
        rm -rf "$snap" && mkdir -p "$snap/results"
        cp -r fsmooth "$snap/" && cp results/run_evals.sh "$snap/results/" && cp -r "$carry/site" "$snap/site"
        [ -f "$FSMOOTH_DATA" ] && cp "$FSMOOTH_DATA" "$snap/" && FSMOOTH_DATA=$snap/$(basename "$FSMOOTH_DATA")
        rm -f "$rcfile"
        FSMOOTH_ROOT=$snap PYTHONPATH=$snap/site:$snap FSMOOTH_DATA=$FSMOOTH_DATA setsid nohup bash -c '
            rc=0; for q in "${@:2}"; do bash "$0" "$q" || { rc=$?; break; }; done; echo "$rc" > "$1"' \
            "$snap/results/run_evals.sh" "$rcfile" "${queues[@]}" > "$eval_dir/detached-$name.log" 2>&1 < /dev/null &
        echo $! > "$pidfile"
        echo "== $name: started detached (pid $!)"
    fi
    while alive && [ $(( $(date +%s) - started )) -lt $(( deadline - 40 )) ]; do
        sleep 2
    done
    if alive; then
        rc=3
        echo "== $name: still running detached (pid $(cat "$pidfile")) at the deadline: run the same command again"
    else
        if [ -f "$rcfile" ]; then
            rc=$(cat "$rcfile")
            echo "== $name: the detached run ended with exit $rc"
        else
            rc=1
            echo "== $name: the detached run ended without an exit status (killed?): see detached-$name.log"
        fi
        rm -f "$pidfile"
    fi
    tail -5 "$eval_dir/detached-$name.log" 2>/dev/null
else
    setup
    seed_state
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
fi
for run in "${runs[@]}"; do
    tail -5 "$eval_dir/$run.log" 2>/dev/null
    [ -f "$eval_dir/$run/report.md" ] && sed -n 1,60p "$eval_dir/$run/report.md"
done
pack() {  # pack [tensors]: the runs' records; with "tensors", also the state tensors of the runs not finished
    (cd "$eval_dir" && for run in "${runs[@]}"; do
        [ -f "$run.log" ] && echo "$run.log"
        [ -d "$run" ] || continue
        find "$run" -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' -o -name per_image.safetensors \) \
            ! -name '.*.tmp.*' ! -name '*.progress.json'
        if [ "${1:-}" = tensors ] && [ ! -f "$run/report.json" ] && [ -d "$run/state" ]; then
            find "$run/state" -type f \( -name '*.safetensors' -o -name '*.progress.json' \) ! -name '.*.tmp.*'
        fi
    done | tar czf "$out/eval-$name.tar.gz" -T -)
}
# The device tool brings back at most 8 files of at most 16 MiB: an archive larger than a part comes back in
# parts (eval-<name>.tar.gz.part0, .part1, ...), at most max_parts of them; beyond that, without the tensors.
part_bytes=${FSMOOTH_EVAL_PART_BYTES:-$(( 15 * 1024 * 1024 ))}
max_parts=${FSMOOTH_EVAL_MAX_PARTS:-4}   # with setup/'s 3 files and a log of the call: 8
archive=$out/eval-$name.tar.gz
rm -f "$archive".part*   # parts of an earlier pack into the same folder
pack tensors
size=$(stat -c %s "$archive")
if [ "$size" -gt "$part_bytes" ]; then
    parts=$(( (size + part_bytes - 1) / part_bytes ))
    if [ "$parts" -le "$max_parts" ]; then
        split -b "$part_bytes" -d -a 1 "$archive" "$archive.part" && rm "$archive"
        echo "== the archive with the unfinished runs' state tensors is $(( size / 1024 / 1024 )) MiB: in $parts" \
            "parts; reassemble with: cat eval-$name.tar.gz.part* | tar xz -C results/eval"
    else
        echo "warning: with the unfinished runs' state tensors the archive is $(( size / 1024 / 1024 )) MiB," \
            "more than $max_parts parts: packed without them, so a later session redoes those chunks" >&2
        pack
    fi
fi
ls -l "$out"
exit "$rc"

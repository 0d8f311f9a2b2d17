#!/usr/bin/env bash
# The CPU reproduction's evaluations (issue 12), as queues of `fsmooth eval` runs, one queue per core.
#
#   bash results/run_evals.sh QUEUE        # QUEUE: a, b, c, ... (see below); run each with nohup, one per core
#
# Every run resumes from its finished chunks (results/eval/<run>/state): after an interruption, or on a
# fresh machine with the committed state, run the same queue again. Each run appends its log to
# results/eval/<run>.log; its report is results/eval/<run>/report.{json,md}, which a rerun of a finished run
# leaves as it was (times included). The order inside a queue is the
# issue's priority order; attack budgets are the published defaults (never lowered: n is lowered instead).
# FSMOOTH_NPROC=2 runs each evaluation on two ranks (torchrun, one core each; a rank that is free takes the next
# chunk, since 2026-11-27: before, rank r ran chunks r, r + 2, ...; since 2026-11-29 also the next run's chunk,
# when the runs need no other run's result: before, it waited for the other rank's last chunk of the run),
# reusing the chunks a one-rank run finished: fs-adaptive was finished that way once queue a was done.
# Image order: the reports without "-mixed" in their name (results/eval/fs-clean, fs-adaptive, ...) took the
# first n test images of the JPEG copy, which is sorted by class: all of them airplanes (class 0). Since
# 2026-11-26 `fsmooth eval` takes a class-sorted set in one fixed pseudo-random order
# (fsmooth.data.evaluation_order), so the same commands now evaluate every class; the queues write to new
# "-mixed" runs, whose state cannot mix with the old ones (the image checksum differs).
# The gpu-* queues are the runs for a GPU machine: results/gpu_eval.sh runs one there (FSMOOTH=fsmooth, the
# data from .carry/) and brings its reports back.
set -euo pipefail
cd "${FSMOOTH_ROOT:-$(dirname "$0")/..}"   # FSMOOTH_ROOT: the repository, for a copy of this script run elsewhere
DATA=${FSMOOTH_DATA:-../shared/datasets/cifar10-jpeg-q75.tar.gz}
FSMOOTH=${FSMOOTH:-.venv/bin/fsmooth}
NPROC=${FSMOOTH_NPROC:-1}
EVAL_DIR=${FSMOOTH_EVAL_DIR:-results/eval}
FS=wrn-16-1-cifar10-jpeg-fs36       # feature-smoothed (delta 0.02), calibrated
STD=wrn-16-1-cifar10-jpeg-std36     # plain CE: "Standard (using Active Defense)" with its own calibration
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

ev() {  # ev RUN MODEL ARGS...: one resumable evaluation
    local run=$1 model=$2
    shift 2
    mkdir -p "$EVAL_DIR"
    if command -v flock > /dev/null; then  # one process per run: two would write the same chunks
        exec 9> "$EVAL_DIR/.$run.lock"
        if ! flock -n 9; then
            echo "$run is already running in another process (lock $EVAL_DIR/.$run.lock): not starting it twice" >&2
            return 75
        fi
    fi
    echo "== $(date -u +%FT%TZ) start $run" >> "$EVAL_DIR/$run.log"
    local launch=("$FSMOOTH")
    [ "$NPROC" -gt 1 ] && launch=(.venv/bin/torchrun --nproc-per-node "$NPROC" "$FSMOOTH")
    "${launch[@]}" -v eval --pretrained "$model" --data "$DATA" --out "$EVAL_DIR/$run" --quiet "$@" \
        >> "$EVAL_DIR/$run.log" 2>&1
    echo "== $(date -u +%FT%TZ) done $run" >> "$EVAL_DIR/$run.log"
    exec 9>&-
}

case "${1:-}" in
    a)  # row 1 (feature-smoothed), row 2's transfer attack from the bare model (and row 6: the same points at
        # K = 10, re-using the bare model's attacks), row 7's transfer attack
        ev fs-clean-mixed "$FS" --protocol clean --num-images 1000 --eps 8 --outer-loops 1 10
        ev fs-transfer-mixed "$FS" --protocol transfer --num-images 500 --eps 8 16 --outer-loops 1 10
        ev std-transfer-mixed "$STD" --protocol transfer --num-images 200 --eps 8 16 --outer-loops 1
        ;;
    b)  # row 1 (standard), row 3's AutoAttack standard column.
        # AutoAttack's cost is set by the images that survive APGD-CE and APGD-T: chunks of 25 with none took
        # 3-10 minutes per core, one with a survivor 48 minutes; the last did not finish in 77 minutes, nor in a
        # second try of 2 h 6 min (Square on its one survivor, about 1.5 s a query: by that pace some 4 hours in all on a
        # shared core). With two ranks, the rank without the last chunk idles (queue e ran beside it). Since
        # 2026-11-27 a chunk saves its work after each attack and each batch, and inside Square and FAB-T (every
        # minute), and a rerun resumes there
        ev std-clean-mixed "$STD" --protocol clean --num-images 1000 --eps 8 --outer-loops 1 10
        ev fs-autoattack-mixed "$FS" --protocol autoattack --num-images 200 --eps 8 --outer-loops 1 --chunk-size 25 \
            --batch-size 25
        ;;
    c)  # row 3: the paper's protocol (AutoAttack standard, and its four attacks alone), n = 200. Queue b's finished
        # clean and AutoAttack-standard chunks (same images, chunks and fingerprint) are linked, not recomputed:
        # do not run this beside queue b, as both would write those chunks. FAB-T alone and Square alone take
        # many core-hours per chunk of 25; since 2026-11-27 they resume between target classes and queries
        mkdir -p "$EVAL_DIR/fs-paper-mixed/state"
        for d in clean_undefended_ol0 clean_defended_ol1 defended_ol1_eps8_aa-standard; do
            [ -e "$EVAL_DIR/fs-paper-mixed/state/$d" ] || [ ! -d "$EVAL_DIR/fs-autoattack-mixed/state/$d" ] \
                || ln -s "../../fs-autoattack-mixed/state/$d" "$EVAL_DIR/fs-paper-mixed/state/$d"
        done
        [ ! -f "$EVAL_DIR/fs-autoattack-mixed/state/fingerprint.json" ] \
            || cp -n "$EVAL_DIR/fs-autoattack-mixed/state/fingerprint.json" "$EVAL_DIR/fs-paper-mixed/state/"
        ev fs-paper-mixed "$FS" --protocol paper --num-images 200 --eps 8 --outer-loops 1 --chunk-size 25 --batch-size 25
        ;;
    d)  # row 4: AutoAttack rand (APGD-CE and APGD-DLR, 20 EOT draws each), n = 100, in chunks of 10 images:
        # about 2,000 defended gradients per image; APGD-CE alone took 1.2-3.5 h per chunk on one core (2026-11-26,
        # results/PLAN.md), so a session finishes at most one chunk per core (gpu-rand is the same row on a GPU);
        # a chunk stopped after its APGD-CE resumes at APGD-DLR (saved between attacks since 2026-11-27); the APGD
        # runs themselves cannot be interrupted
        ev fs-rand-mixed "$FS" --protocol rand --num-images 100 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        ;;
    e)  # row 5 (Table 3: lambda in {-10, -1, 0, 1, 10}): took 76 minutes on two ranks at low priority beside
        # queue b (2026-11-26), 11-23 s per image and lambda
        ev fs-adaptive-mixed "$FS" --protocol adaptive --lambdas 1 10 --num-images 100 --eps 8 --outer-loops 1 \
            --chunk-size 50 --batch-size 50
        ;;
    f)  # row 2's EOT-PGD (CE, and targeted DLR), eps 8, on CPU at n = 100 in chunks of 10 (a chunk saves its state
        # every minute since 2026-11-27 and resumes there): each restart is 101 defended passes of 20 copies (the
        # EOT draws) of every image; later restarts and targets attack only the images still robust
        ev fs-eot-mixed "$FS" --protocol eot --num-images 100 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        # row 6 within reach of a CPU: the same folder, its K = 1 points scored through the defense at K = 10 (a
        # transfer across K, which does not adapt to K: EOT-PGD through 10 defense runs costs 10 times the above)
        ev fs-eot-mixed "$FS" --protocol eot-transfer --num-images 100 --eps 8 --outer-loops 1 10 --chunk-size 10 \
            --batch-size 10
        ;;
    g)  # row 7's white-box part on CPU: the standard model with its own Active Defense (its calibration) under
        # queue f's EOT-PGD (CE, and targeted DLR), eps 8, n = 100 in chunks of 10 (the issue asks n >= 200, which
        # gpu-row7 runs on a GPU with Square and eps 16). Queue f's cost on the feature-smoothed model: 13-47
        # minutes per chunk of 10 for CE, 30-65 for targeted DLR, one core each: some 10-16 core-hours for n = 100
        # (an estimate from queue f; the standard model's defense stops sooner, 75 iterations on average against 88)
        ev std-eot-mixed "$STD" --protocol eot --num-images 100 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        ;;
    h)  # row 2's EOT-PGD at eps 16 too, on CPU, in queue f's folder: the state's fingerprint holds neither eps nor
        # protocol, so the eps-8 runs' finished chunks are read back and only the eps-16 runs are computed (queue
        # f's eps 8 took about 10 core-hours for n = 100; eps 16 should cost no more: later restarts and targets
        # attack only the images still robust). Then the eot-transfer line again, so that the folder's report
        # keeps row 6's K = 10 scoring, at both eps.
        ev fs-eot-mixed "$FS" --protocol eot --num-images 100 --eps 8 16 --outer-loops 1 --chunk-size 10 \
            --batch-size 10
        ev fs-eot-mixed "$FS" --protocol eot-transfer --num-images 100 --eps 8 16 --outer-loops 1 10 \
            --chunk-size 10 --batch-size 10
        ;;
    i)  # row 7 at the issue's n = 200 on CPU: std-eot-mixed's first 100 images are read back (since 2026-11-27
        # each chunk's stamp covers its own images, so a larger --num-images reuses every finished chunk) and
        # images 100-199 are attacked: some 9-10 core-hours (an estimate from queue g's first 100 images, 5.1
        # core-hours for CE and 4.2 for targeted DLR). Not needed since 2026-11-28: gpu-row7 ran the same
        # attacks at eps 8 on n = 200 on an H100 in 6 minutes (std-row7-gpu)
        ev std-eot-mixed "$STD" --protocol eot --num-images 200 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        ;;
    j)  # row 7's EOT-PGD at eps 16 on CPU (queue h's move for the standard model): std-eot-mixed's eps-8 chunks are
        # read back (the state's fingerprint holds neither eps nor protocol) and only eps 16 is computed, n = 100 in
        # chunks of 10, CE then targeted DLR. Estimate from queue h (the same attack on the feature-smoothed model at
        # eps 16: about 5.8 core-hours for CE and 6 for DLR) and queue g (the standard model at eps 8: 5.1 and 4.2):
        # some 8-12 core-hours, over several sessions; gpu-row7 runs it on a GPU at n = 200 with Square
        ev std-eot-mixed "$STD" --protocol eot --num-images 100 --eps 8 16 --outer-loops 1 --chunk-size 10 \
            --batch-size 10
        ;;
    r)  # 2026-11-28, after commit ff3e546 (re-scoring on an attack's point for every image; the transfer attack's
        # second set of points, APGD-CE's highest-loss point of every image on the bare model): the finished
        # evaluations again, their commands unchanged. Each reads its attack chunks back (adversarial images
        # restored from git where pruned: results/PLAN.md) and recomputes only its re-scoring chunks; the transfer
        # runs also compute apgd-ce-maxloss on the bare model and score its points through the defense
        ev fs-transfer-mixed "$FS" --protocol transfer --num-images 500 --eps 8 16 --outer-loops 1 10
        ev std-transfer-mixed "$STD" --protocol transfer --num-images 200 --eps 8 16 --outer-loops 1
        ev std-eot-mixed "$STD" --protocol eot --num-images 100 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        ev fs-eot-mixed "$FS" --protocol eot-transfer --num-images 100 --eps 8 --outer-loops 1 10 --chunk-size 10 \
            --batch-size 10
        ev fs-adaptive-mixed "$FS" --protocol adaptive --lambdas 1 10 --num-images 100 --eps 8 --outer-loops 1 \
            --chunk-size 50 --batch-size 50
        ev fs-rand-mixed "$FS" --protocol rand --num-images 100 --eps 8 --outer-loops 1 --chunk-size 10 --batch-size 10
        ev fs-autoattack-mixed "$FS" --protocol autoattack --num-images 200 --eps 8 --outer-loops 1 --chunk-size 25 \
            --batch-size 25
        ;;
    s)  # Square alone (AutoAttack's Square, 5,000 queries, p_init 0.8: the `paper` protocol's "Square alone" and
        # row 2's Square are this one attack), the feature-smoothed model at K = 1, eps 8 then 16, n = 200 in chunks
        # of 50. Its cost is set by the images that survive: each query is a defended forward of the chunk's images
        # not yet fooled (about 0.5 s a query for one survivor on one core, fs-autoattack-mixed's chunk 6); it saves
        # its state every minute and a rerun resumes between queries (2026-11-28)
        ev fs-square-mixed "$FS" --protocol square --num-images 200 --eps 8 16 --outer-loops 1 --chunk-size 50 \
            --batch-size 50
        ;;
    gpu-adaptive-200)  # the same at n = 200: measures the GPU's pace first (and fits one device call)
        ev fs-adaptive-gpu-200 "$FS" --protocol adaptive --lambdas 1 10 --num-images 200 --eps 8 --outer-loops 1 \
            --chunk-size 200 --batch-size 200
        ;;
    gpu-adaptive)  # issue 10's GPU evaluation: row 5 (Table 3) at n = 1000. On the H200 (2026-11-27) a chunk of 250
                   # took 27.7-30.6 s per lambda, 104-109 s per lambda in all: some 9-10 minutes with the
                   # re-scoring (estimate), one session's device time; its state (61 MB of images) cannot travel
        ev fs-adaptive-gpu "$FS" --protocol adaptive --lambdas 1 10 --num-images 1000 --eps 8 --outer-loops 1 \
            --chunk-size 250 --batch-size 250
        ;;
    gpu-row2)  # row 2: EOT-PGD (CE and DLR) and Square, eps 8 and 16, n = 500 (the transfer part ran on CPU);
               # each EOT-PGD restart is 101 defended passes of 20 copies (its EOT draws) of the chunk's images
        ev fs-row2-gpu "$FS" --protocol eot,square --num-images 500 --eps 8 16 --outer-loops 1 \
            --chunk-size 250 --batch-size 250
        ;;
    gpu-row7)  # row 7: the standard model with its own Active Defense (its calibration), row 2's white-box
               # attacks (EOT-PGD, CE and targeted DLR, and Square), eps 8 and 16, n = 200 (clean and the
               # transfer attack ran on CPU: std-clean-mixed, std-transfer-mixed)
        ev std-row7-gpu "$STD" --protocol eot,square --num-images 200 --eps 8 16 --outer-loops 1 \
            --chunk-size 200 --batch-size 200
        ;;
    gpu-row6)  # row 6 as an attack through K = 10 itself (queue f's eot-transfer only scored EOT-PGD's K = 1 points
               # at K = 10): EOT-PGD, CE and targeted DLR, 20 draws of the K = 10 defense per step, eps 8, n = 100,
               # one chunk. Each pass is 20 copies x 10 defense runs of every image, 10 times a K = 1 pass: about
               # 15 minutes per loss and restart on an H100 (an estimate from std-row7-gpu's 3 minutes per loss at
               # K = 1 on 200 images), so more than one session's device time; it resumes between steps
        ev fs-row6-gpu "$FS" --protocol eot --num-images 100 --eps 8 --outer-loops 10 --chunk-size 100 \
            --batch-size 100
        ;;
    gpu-eot-100)  # row 2's EOT-PGD (CE and targeted DLR) at eps 8 on n = 100: the slice of row 2 that may fit
                  # what a GPU session has left after issue 10's calls (one chunk; 101 passes of 20 x 100 images
                  # per restart)
        ev fs-eot-gpu-100 "$FS" --protocol eot --num-images 100 --eps 8 --outer-loops 1 --chunk-size 100 \
            --batch-size 100
        ;;
    gpu-rand)  # row 4 on a GPU: AutoAttack rand, n = 100, one chunk. A defended step costs about 0.33 s on the
               # H200 at batch 200 (the slowest image's 1000 defense iterations; fs-adaptive-gpu-200), and
               # APGD with 20 EOT draws takes some 2,000 steps in sequence: about 11 minutes per attack (estimate),
               # more than one device call, so smaller chunks would only multiply the time
        ev fs-rand-gpu "$FS" --protocol rand --num-images 100 --eps 8 --outer-loops 1 --chunk-size 100 \
            --batch-size 100
        ;;
    gpu-paper)  # row 3 on a GPU: queue c's protocol, whose FAB-T alone did not finish a chunk of 25 images in
                # 2 h 11 min per CPU core (2026-11-26); one chunk of 200 (Square alone needs some 27 minutes
                # of GPU time at 0.33 s per step, an estimate: see gpu_eval.sh, more than one device call)
        ev fs-paper-gpu "$FS" --protocol paper --num-images 200 --eps 8 --outer-loops 1 --chunk-size 200 \
            --batch-size 200
        ;;
    gpu-fabt)   # row 3's one attack not run anywhere yet: FAB-T alone (the `paper` protocol's run of it; APGD-CE, APGD-T
                # and AutoAttack standard ran on CPU in queue c, Square alone in queue s), n = 200, one chunk. Its
                # 9 target classes x 100 iterations, each a defended forward and backward and another forward,
                # at about 0.33 s per step at batch 200: some 10 minutes or more (an estimate, maybe two device
                # calls); it resumes between target classes
        ev fs-fabt-gpu "$FS" --protocol fab-t --num-images 200 --eps 8 --outer-loops 1 --chunk-size 200 \
            --batch-size 200
        ;;
    *)  echo "usage: bash results/run_evals.sh a|b|c|d|e|f|g|h|i|j|r|s|gpu-adaptive-200|gpu-adaptive|gpu-row2|gpu-row7|gpu-row6|gpu-eot-100|gpu-rand|gpu-paper|gpu-fabt" >&2
        exit 2 ;;
esac

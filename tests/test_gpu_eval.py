"""results/gpu_eval.sh: a gpu-* queue of results/run_evals.sh as one device call, with `fsmooth eval` stubbed.

The stub parses its arguments with fsmooth's own CLI parser (a typo in a queue fails here, not on a GPU
machine whose time is scarce) and writes what an evaluation writes: the script must bring back the reports,
the chunk records and the log in one archive, and leave the adversarial images behind.
"""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = textwrap.dedent("""\
    import json, os, sys, time
    from pathlib import Path
    from fsmooth.cli import build_parser
    from fsmooth.evaluation.protocols import parse_protocols
    argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    if os.environ.get("STUB_EXIT"):
        sys.exit(int(os.environ["STUB_EXIT"]))
    out = Path(args.out)
    seeded = sorted(p.name for p in (out / "state" / "run").glob("*")) if (out / "state").is_dir() else []
    print("found state:", " ".join(seeded) or "none")
    (out / "state" / "run").mkdir(parents=True, exist_ok=True)
    (out / "state" / "run" / "chunk00000.json").write_text("{}")
    (out / "state" / "run" / "chunk00000.safetensors").write_bytes(b"images")
    (out / "state" / "run" / ".chunk00001.k2j4.tmp.json").write_text("{")  # an atomic write cut by a kill
    (out / "state" / "run" / "chunk00001.progress.safetensors").write_bytes(b"points after apgd-ce")
    (out / "state" / "run" / "chunk00001.progress.json").write_text("{}")
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    if os.environ.get("STUB_EXIT_BEFORE_REPORT"):
        sys.exit(int(os.environ["STUB_EXIT_BEFORE_REPORT"]))
    (out / "state" / "run" / "chunk00001.progress.safetensors").unlink()  # a finished chunk keeps no progress
    (out / "state" / "run" / "chunk00001.progress.json").unlink()
    (out / "per_image.safetensors").write_bytes(b"per-image results")
    (out / "report.md").write_text("# report\\n")
    (out / "report.json").write_text(json.dumps({"argv": argv, "protocols": parse_protocols(args.protocol),
                                                 "n": args.n, "eps": args.eps, "data": args.data,
                                                 "outer_loops": args.outer_loops}))
    print("evaluated")
""")


def _stub_env(tmp_path, **extra):
    stub = tmp_path / "fsmooth-stub"
    (tmp_path / "stub.py").write_text(STUB)
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'stub.py'} \"$@\"\n")
    stub.chmod(0o755)
    (tmp_path / "carry" / "site").mkdir(parents=True)
    env = dict(os.environ, FSMOOTH=str(stub), FSMOOTH_SKIP_SETUP="1", FSMOOTH_CARRY=str(tmp_path / "carry"),
               OUT=str(tmp_path / "out"), FSMOOTH_EVAL_DIR=str(tmp_path / "eval"), **extra)
    env.pop("FSMOOTH_DATA", None)
    env.pop("FSMOOTH_NPROC", None)
    return env


@pytest.mark.parametrize("queue, run, protocols, n, eps, outer_loops", [
    ("gpu-adaptive-200", "fs-adaptive-gpu-200", ["adaptive"], 200, [8.0], [1]),
    ("gpu-adaptive", "fs-adaptive-gpu", ["adaptive"], 1000, [8.0], [1]),
    ("gpu-row2", "fs-row2-gpu", ["eot", "square"], 500, [8.0, 16.0], [1]),
    ("gpu-row7", "std-row7-gpu", ["eot", "square"], 200, [8.0, 16.0], [1]),
    ("gpu-row6", "fs-row6-gpu", ["eot"], 100, [8.0], [10]),
    ("gpu-paper", "fs-paper-gpu", ["paper"], 200, [8.0], [1]),
    ("gpu-fabt", "fs-fabt-gpu", ["fab-t"], 200, [8.0], [1]),
    ("gpu-rand", "fs-rand-gpu", ["rand"], 100, [8.0], [1]),
    ("gpu-eot-100", "fs-eot-gpu-100", ["eot"], 100, [8.0], [1]),
])
def test_gpu_eval_runs_its_queue_and_packs_the_reports(tmp_path, queue, run, protocols, n, eps, outer_loops):
    env = _stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "results" / "gpu_eval.sh"), queue], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "out" / f"eval-{queue}.tar.gz") as tar:
        names = set(tar.getnames())
        report = json.load(tar.extractfile(f"{run}/report.json"))
    assert {f"{run}.log", f"{run}/report.md", f"{run}/per_image.safetensors", f"{run}/state/run/chunk00000.json"} <= names
    assert not any("/state/" in name and name.endswith(".safetensors") for name in names)  # images stay there
    assert not any(".tmp." in name for name in names)  # nor the leftovers of cut atomic writes
    assert report["protocols"] == protocols and report["n"] == n and report["eps"] == eps
    assert report["outer_loops"] == outer_loops
    assert report["data"] == str(tmp_path / "carry" / "cifar10-jpeg-q75.tar.gz")
    model = report["argv"][report["argv"].index("--pretrained") + 1]
    assert model == ("wrn-16-1-cifar10-jpeg-std36" if run.startswith("std-") else "wrn-16-1-cifar10-jpeg-fs36")


def test_an_unfinished_run_brings_its_state_back_and_the_next_session_resumes_from_it(tmp_path):
    """A run cut before its report brings back its chunk tensors and AutoAttack progress; committed under
    results/eval (here FSMOOTH_RESUME_DIR), the next session's evaluation folder starts from them."""
    env = _stub_env(tmp_path, STUB_EXIT_BEFORE_REPORT="1", FSMOOTH_RESUME_DIR=str(tmp_path / "tree"))
    script = str(ROOT / "results" / "gpu_eval.sh")
    first = subprocess.run(["bash", script, "gpu-rand"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 1 and "found state: none" in (tmp_path / "eval" / "fs-rand-gpu.log").read_text()
    (tmp_path / "tree").mkdir()
    with tarfile.open(tmp_path / "out" / "eval-gpu-rand.tar.gz") as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "tree")                  # as committed here after the session
    state = "fs-rand-gpu/state/run/"
    assert {state + "chunk00000.safetensors", state + "chunk00001.progress.safetensors",
            state + "chunk00001.progress.json", "fs-rand-gpu.log"} <= names
    assert not any(".tmp." in name for name in names)
    # The next session: a fresh machine (an empty evaluation folder) with the tree's state.
    env.update(FSMOOTH_EVAL_DIR=str(tmp_path / "eval2"), OUT=str(tmp_path / "out2"))
    env.pop("STUB_EXIT_BEFORE_REPORT")
    second = subprocess.run(["bash", script, "gpu-rand"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "== fs-rand-gpu: resuming from" in second.stdout and "1 in progress" in second.stdout
    log = (tmp_path / "eval2" / "fs-rand-gpu.log").read_text()
    assert "found state: none" in log                      # the earlier session's log goes on
    assert "found state: chunk00000.json chunk00000.safetensors chunk00001.progress.json " \
           "chunk00001.progress.safetensors" in log
    with tarfile.open(tmp_path / "out2" / "eval-gpu-rand.tar.gz") as tar:
        names = set(tar.getnames())
    assert "fs-rand-gpu/report.json" in names               # finished: its images stay on the device
    assert not any("/state/" in name and (name.endswith(".safetensors") or ".progress." in name) for name in names)


def test_an_archive_larger_than_a_part_comes_back_in_parts_or_without_the_tensors(tmp_path):
    """The device tool brings back files of at most 16 MiB: an unfinished run's state that packs larger comes
    back in parts that reassemble into the whole archive; with more parts than allowed, without the tensors."""
    script = str(ROOT / "results" / "gpu_eval.sh")
    env = _stub_env(tmp_path, STUB_EXIT_BEFORE_REPORT="1", FSMOOTH_EVAL_PART_BYTES="200",
                    FSMOOTH_EVAL_MAX_PARTS="100")
    proc = subprocess.run(["bash", script, "gpu-rand"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = tmp_path / "out"
    parts = sorted(out.glob("eval-gpu-rand.tar.gz.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    assert len(parts) >= 2 and not (out / "eval-gpu-rand.tar.gz").exists()
    assert all(p.stat().st_size <= 200 for p in parts)
    assert f"in {len(parts)} parts" in proc.stdout and "cat eval-gpu-rand.tar.gz.part*" in proc.stdout
    whole = tmp_path / "whole.tar.gz"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(whole) as tar:
        names = set(tar.getnames())
    state = "fs-rand-gpu/state/run/"
    assert {state + "chunk00000.safetensors", state + "chunk00001.progress.safetensors", "fs-rand-gpu.log"} <= names

    env.update(FSMOOTH_EVAL_MAX_PARTS="1", OUT=str(tmp_path / "out2"), FSMOOTH_EVAL_DIR=str(tmp_path / "eval2"))
    proc = subprocess.run(["bash", script, "gpu-rand"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert "packed without them" in proc.stderr
    assert not list((tmp_path / "out2").glob("*.part*"))
    with tarfile.open(tmp_path / "out2" / "eval-gpu-rand.tar.gz") as tar:
        names = set(tar.getnames())
    assert state + "chunk00000.json" in names and state + "chunk00000.safetensors" not in names


def test_gpu_eval_runs_several_queues_in_turn_into_one_archive(tmp_path):
    env = _stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "results" / "gpu_eval.sh"), "gpu-rand", "gpu-paper"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.index("== queue gpu-rand: exit 0") < proc.stdout.index("== queue gpu-paper: exit 0")
    with tarfile.open(tmp_path / "out" / "eval-gpu-rand+gpu-paper.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"fs-rand-gpu/report.json", "fs-paper-gpu/report.json"} <= names
    # A bad name anywhere is refused before anything runs.
    bad = subprocess.run(["bash", str(ROOT / "results" / "gpu_eval.sh"), "gpu-rand", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown GPU queue nope" in bad.stderr


def test_gpu_eval_detached_run_outlives_the_call_and_is_packed_by_the_next(tmp_path):
    """FSMOOTH_EVAL_DETACH=1: the queue runs in its own process session; a call cut at its deadline leaves it
    running (exit 3), the next call with the same queue waits for it, not starting another, and packs it."""
    import time
    script = str(ROOT / "results" / "gpu_eval.sh")
    env = _stub_env(tmp_path, STUB_SLEEP="6", FSMOOTH_EVAL_DETACH="1", FSMOOTH_EVAL_DEADLINE_S="41")
    call = subprocess.Popen(["bash", script, "gpu-rand"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = call.communicate(timeout=60)
    assert call.returncode == 3, stdout + stderr
    assert "started detached" in stdout and "still running detached" in stdout
    try:  # as the device tool does when a command returns: whatever is left of the call's processes is killed
        os.killpg(call.pid, 9)
    except ProcessLookupError:
        pass
    pid = int((tmp_path / "eval" / "detached-gpu-rand.pid").read_text())
    os.kill(pid, 0)  # the detached run is alive after its call returned
    env["FSMOOTH_EVAL_DEADLINE_S"] = "100"
    second = subprocess.run(["bash", script, "gpu-rand"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "is still going: waiting for it" in second.stdout and "started detached" not in second.stdout
    assert "the detached run ended with exit 0" in second.stdout
    with tarfile.open(tmp_path / "out" / "eval-gpu-rand.tar.gz") as tar:
        report = json.load(tar.extractfile("fs-rand-gpu/report.json"))
    assert report["n"] == 100 and report["protocols"] == ["rand"]
    deadline = time.time() + 10
    while time.time() < deadline:  # the session's leader is gone once it has written its exit status
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the detached run is still alive")


def test_gpu_eval_detached_run_that_fails_reports_its_status(tmp_path):
    env = _stub_env(tmp_path, STUB_EXIT="5", FSMOOTH_EVAL_DETACH="1", FSMOOTH_EVAL_DEADLINE_S="100")
    proc = subprocess.run(["bash", str(ROOT / "results" / "gpu_eval.sh"), "gpu-eot-100"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "the detached run ended with exit 5" in proc.stdout
    assert (tmp_path / "eval" / "snapshot-gpu-eot-100" / "fsmooth" / "__init__.py").is_file()  # what it ran


@pytest.mark.parametrize("queue, runs", [
    ("a", ["fs-clean-mixed", "fs-transfer-mixed", "std-transfer-mixed"]),
    ("b", ["std-clean-mixed", "fs-autoattack-mixed"]),
    ("c", ["fs-paper-mixed"]),
    ("d", ["fs-rand-mixed"]),
    ("e", ["fs-adaptive-mixed"]),
    ("f", ["fs-eot-mixed"]),
    ("g", ["std-eot-mixed"]),
    ("h", ["fs-eot-mixed"]),
    ("i", ["std-eot-mixed"]),
    ("r", ["fs-transfer-mixed", "std-transfer-mixed", "std-eot-mixed", "fs-eot-mixed", "fs-adaptive-mixed",
           "fs-rand-mixed", "fs-autoattack-mixed"]),
])
def test_every_cpu_queue_parses_and_runs_each_of_its_evaluations(tmp_path, queue, runs):
    env = _stub_env(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "results" / "run_evals.sh"), queue], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for run in runs:
        report = json.loads((tmp_path / "eval" / run / "report.json").read_text())
        assert report["data"] == "../shared/datasets/cifar10-jpeg-q75.tar.gz"
        log = (tmp_path / "eval" / f"{run}.log").read_text()
        assert "start " + run in log and "done " + run in log and "evaluated" in log
    assert sorted(p.name for p in (tmp_path / "eval").iterdir() if p.is_dir()) == sorted(runs)


def test_a_run_is_never_started_twice(tmp_path):
    """run_evals.sh locks each run: a second process for the same run (a detached call beside a plain one, say)
    refuses instead of writing the same chunks."""
    import fcntl
    env = _stub_env(tmp_path)
    (tmp_path / "eval").mkdir(exist_ok=True)
    with open(tmp_path / "eval" / ".fs-rand-gpu.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(["bash", str(ROOT / "results" / "run_evals.sh"), "gpu-rand"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and "already running in another process" in proc.stderr
    assert not (tmp_path / "eval" / "fs-rand-gpu").exists()
    again = subprocess.run(["bash", str(ROOT / "results" / "run_evals.sh"), "gpu-rand"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / "eval" / "fs-rand-gpu" / "report.json").is_file()


def test_gpu_eval_refuses_an_unknown_queue_and_a_missing_carry(tmp_path):
    script = str(ROOT / "results" / "gpu_eval.sh")
    env = dict(os.environ, OUT=str(tmp_path / "out"), FSMOOTH_EVAL_DIR=str(tmp_path / "eval"),
               FSMOOTH_CARRY=str(tmp_path / "nowhere"))
    bad = subprocess.run(["bash", script, "a"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown GPU queue a" in bad.stderr
    none = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert none.returncode == 2 and "usage" in none.stderr
    missing = subprocess.run(["bash", script, "gpu-adaptive"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "prep-gpu-carry.sh" in missing.stderr


def test_gpu_eval_cut_at_its_deadline_still_packs_what_it_has(tmp_path):
    """The evaluation is interrupted before the deadline's packing margin: exit 3 (not 124, which the device
    tool reads as its own timeout), and the archive with the log and the chunks finished so far comes back."""
    env = _stub_env(tmp_path, STUB_SLEEP="120", FSMOOTH_EVAL_DEADLINE_S="72")
    proc = subprocess.run(["bash", str(ROOT / "results" / "gpu_eval.sh"), "gpu-adaptive-200"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "cut at the deadline" in proc.stdout
    with tarfile.open(tmp_path / "out" / "eval-gpu-adaptive-200.tar.gz") as tar:
        names = set(tar.getnames())
    assert "fs-adaptive-gpu-200.log" in names and "fs-adaptive-gpu-200/state/run/chunk00000.json" in names
    assert "fs-adaptive-gpu-200/report.md" not in names

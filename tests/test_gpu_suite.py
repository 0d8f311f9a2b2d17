"""The GPU suite on CPU: its calls and steps, the budget and skip logic, the install/rebuild decision,
the GPU test step (named files, per-test timeout, no pyautoattack at collection) and its result files."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture
def suite(monkeypatch):
    """bench/gpu_suite.py, imported as the scripts import each other (siblings in bench/)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_suite
    return gpu_suite


def _bench_steps(gpu_suite, call):
    return {s.name: s for s in gpu_suite.CALLS[call] if s.action == "bench"}


def _values(args, flag):
    """The values after ``flag`` in an argument tuple, up to the next ``--option``."""
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i])
        i += 1
    return out


def test_three_calls_in_order_each_starting_with_setup(suite):
    for call in ("first", "second", "third"):
        steps = suite.CALLS[call]
        assert [s.name for s in steps[:2]] == ["setup", "extension"]
        assert steps[0].fatal
    assert [s.name for s in suite.CALLS["first"]] == ["setup", "extension", "tests", "throughput"]
    assert set(_bench_steps(suite, "second")) == {"latency", "loss-kernel", "compile-512"}
    assert set(_bench_steps(suite, "third")) == {"early-exit", "workload", "early-exit-fp32"}


def test_first_call_is_the_trimmed_headline_table(suite):
    args = _bench_steps(suite, "first")["throughput"].bench_args
    assert _values(args, "--batches") == ["512", "64", "1"]  # the headline batch first
    assert _values(args, "--iters") == ["50"]
    providers = _values(args, "--providers")
    assert providers[0] == "eager"  # the baseline of every "x eager" in its batch
    assert {"graph-bf16", "chunked-bf16", "graph-fp32"} <= set(providers)
    assert providers.index("graph-bf16") < providers.index("graph-fp32")
    assert any(p.startswith("compile") for p in providers) and _values(args, "--compile-modes") == ["default"]


def test_second_and_third_calls_cover_the_rest(suite):
    second = _bench_steps(suite, "second")
    assert _values(second["latency"].bench_args, "--latency-batches") == ["1", "8"]
    assert _values(second["latency"].bench_args, "--latency-iters") == ["300"]
    assert _values(second["compile-512"].bench_args, "--compile-modes")[0] == "max-autotune"
    assert _values(second["compile-512"].bench_args, "--batches") == ["512"]
    third = _bench_steps(suite, "third")
    exit_providers = _values(third["early-exit"].bench_args, "--exit-providers")
    assert exit_providers[:2] == ["graph-bf16-nocompact", "graph-bf16"]  # masking then compaction: the saving
    assert _values(third["early-exit"].bench_args, "--exit-batches") == ["512"]
    assert _values(third["workload"].bench_args, "--workload-size") == ["10000"]


def test_fourth_call_reruns_the_tests_then_profiles(suite):
    steps = [s.name for s in suite.CALLS["fourth"]]
    assert steps[:5] == ["setup", "extension", "tests", "batchnorm", "profile"]
    ab = suite.CALLS["fourth"][3].bench_args
    # Baseline first at each engine: each A/B pair is measured back to back.
    assert _values(ab, "--providers") == ["graph-bf16-bn", "graph-bf16", "graph-bf16-compiled-bn",
                                          "graph-bf16-compiled", "chunked-bf16-bn", "chunked-bf16"]
    args = suite.CALLS["fourth"][4].bench_args
    assert _values(args, "--sections") == ["profile"] and _values(args, "--profile-batch") == ["512"]
    assert _values(args, "--profile-providers")[:2] == ["chunked-bf16", "graph-bf16"]
    compiled = _bench_steps(suite, "fourth")["compiled-prefix"].bench_args
    assert _values(compiled, "--providers") == ["graph-bf16", "graph-bf16-compiled", "compile-bf16"]


def test_fifth_call_profiles_the_headline_engine_then_max_autotune(suite):
    steps = _bench_steps(suite, "fifth")
    assert [s.name for s in suite.CALLS["fifth"]] == ["setup", "extension", "tests", "affine-kernel",
                                                      "profile-compiled", "latency-1", "compile-512-bf16"]
    # Baseline first at each engine: each A/B pair is measured back to back.
    assert _values(steps["affine-kernel"].bench_args, "--providers") == [
        "graph-bf16-addcmul", "graph-bf16", "chunked-bf16-addcmul", "chunked-bf16"]
    latency = steps["latency-1"].bench_args
    assert _values(latency, "--latency-batches") == ["1"] and _values(latency, "--latency-iters") == ["300"]
    assert _values(latency, "--providers")[0] == "eager"  # the baseline of "x lower than eager"
    profile = steps["profile-compiled"].bench_args
    assert _values(profile, "--profile-providers") == ["graph-bf16-compiled", "compile-bf16"]
    assert _values(profile, "--profile-batch") == ["512"]
    compiled = steps["compile-512-bf16"].bench_args
    # The ratio's numerator first, then the strongest torch.compile mode at the same precision.
    assert _values(compiled, "--providers") == ["graph-bf16-compiled", "compile-bf16"]
    assert _values(compiled, "--compile-modes")[0] == "max-autotune"
    assert _values(compiled, "--batches") == ["512"]


def test_sixth_call_takes_what_fifth_skipped_and_profiles_through_the_chunked_engine(suite):
    steps = _bench_steps(suite, "sixth")
    assert [s.name for s in suite.CALLS["sixth"]] == ["setup", "extension", "tests", "latency-1",
                                                      "profile-compiled-chunked", "compile-512-bf16"]
    assert steps["latency-1"] is _bench_steps(suite, "fifth")["latency-1"]
    assert steps["compile-512-bf16"] is _bench_steps(suite, "fifth")["compile-512-bf16"]
    profile = steps["profile-compiled-chunked"].bench_args
    # The compiled prefix without a WHILE loop first (every trip a host-side replay), then the comparison.
    assert _values(profile, "--profile-providers") == ["chunked-bf16-compiled", "compile-bf16"]
    assert _values(profile, "--profile-batch") == ["512"] and _values(profile, "--profile-iters") == ["20"]


def test_summary_puts_the_profile_in_its_own_table_and_headline(suite):
    rows = [{"section": "profile", "provider": "graph-bf16", "status": "ok", "batch": 512, "iters": 20,
             "category": "total", "device_ms": 100.0, "share": 1.0},
            {"section": "profile", "provider": "graph-bf16", "status": "ok", "batch": 512, "iters": 20,
             "category": "convolution", "device_ms": 70.0, "share": 0.7},
            {"section": "profile", "provider": "graph-bf16", "status": "ok", "batch": 512, "iters": 20,
             "category": "batch norm", "device_ms": 30.0, "share": 0.3},
            {"section": "profile", "provider": "eager-bf16", "status": "no_kernels", "batch": 512,
             "category": "total", "reason": "the profiler recorded no kernel of this provider"}]
    rows += [{**r, "provider": "chunked-bf16", "status": "partial", "reason": "missed some"} for r in rows[:2]]
    lines = suite.headlines(rows)
    assert lines[0] == ("profile, graph-bf16 at batch 512, 20 iterations: 100 ms of kernels; convolution 70%, "
                        "batch norm 30%")
    assert lines[1] == ("profile, chunked-bf16 at batch 512, 20 iterations: 100 ms of kernels; convolution 70% "
                        "(partial: missed some)")
    assert any("eager-bf16" in line and "no_kernels" in line for line in lines)


def test_every_bench_step_parses(suite, monkeypatch):
    """Provider names, sections and options of every step are valid iters_per_sec.py arguments."""
    import iters_per_sec
    for call, steps in suite.CALLS.items():
        for step in steps:
            if step.action == "bench":
                args = iters_per_sec.parse_args([*step.bench_args, "--budget-s", "100", "--tag", "x"])
                assert args.budget_s == 100.0, (call, step.name)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _run(suite, steps, durations, budget=480.0, statuses=None):
    now = FakeClock()
    clock = suite.Clock(budget, now(), now=now)
    seen, lines = [], []

    def act(step, limit):
        seen.append((step.name, round(limit)))
        now.t += durations.get(step.name, 0)
        return suite.StepResult(step.name, (statuses or {}).get(step.name, "ok"))

    results = suite.run_steps(steps, clock, act, announce=lines.append)
    return results, seen, lines


def test_steps_get_what_is_left_and_are_skipped_when_it_is_too_little(suite):
    Step = suite.Step
    steps = (Step("a", "bench", "a", cap_s=100), Step("b", "bench", "b"), Step("c", "bench", "c", min_s=60),
             Step("d", "bench", "d", min_s=10))
    results, seen, lines = _run(suite, steps, {"a": 100, "b": 330})
    assert seen == [("a", 100), ("b", 380), ("d", 50)]  # a: its cap; b: all that is left
    assert [r.status for r in results] == ["ok", "ok", "skipped", "ok"]
    assert "50 s left of the call's budget, the step needs at least 60 s" in results[2].reason
    assert any(line.startswith("== b:") and "limit 380 s" in line for line in lines)  # announced before running


def test_a_failed_fatal_step_skips_the_rest(suite):
    Step = suite.Step
    steps = (Step("setup", "setup", "s", fatal=True), Step("b", "bench", "b"))
    results, seen, _ = _run(suite, steps, {}, statuses={"setup": "failed"})
    assert [r.status for r in results] == ["failed", "skipped"] and seen == [("setup", 480)]
    assert results[1].reason.startswith("setup failed")


def test_gpu_test_files_are_complete(suite):
    marked = re.compile(r"^(@pytest\.mark\.cuda|pytestmark\s*=.*\bmark\.cuda\b)", re.M)
    with_cuda_tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                       if marked.search(p.read_text(encoding="utf-8"))}
    assert with_cuda_tests == set(suite.GPU_TEST_FILES)


def test_gpu_test_step_has_a_thread_timeout(suite):
    import pytest_timeout  # noqa: F401  (the test extra installs it; the GPU image has it)
    cmd = suite.gpu_test_command("python3", 120)
    assert cmd[cmd.index("--timeout") + 1] == "120" and cmd[cmd.index("--timeout-method") + 1] == "thread"
    assert cmd[cmd.index("-m", 2) + 1] == "cuda" and cmd[-len(suite.GPU_TEST_FILES):] == list(suite.GPU_TEST_FILES)


_BLOCKED_COLLECT = """
import sys
for name in ("pyautoattack", "torchattacks"):
    sys.modules[name] = None  # "import pyautoattack" now raises ImportError, as on the GPU machine
import pytest
code = pytest.main(sys.argv[1:])
loaded = [m for m in ("pyautoattack", "torchattacks") if sys.modules.get(m) is not None]
sys.exit(code or (3 if loaded else 0))
"""


def _collect_blocked(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _BLOCKED_COLLECT, "--collect-only", "-q", "-p", "no:cacheprovider",
                           *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_gpu_tests_collect_without_pyautoattack_or_torchattacks(suite):
    proc = _collect_blocked("-m", "cuda", *suite.GPU_TEST_FILES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests collected" in proc.stdout or "selected" in proc.stdout
    # The blocker works: an evaluation test module does fail to collect under it.
    control = _collect_blocked("tests/test_evaluation_attacks.py")
    assert control.returncode != 0 and "pyautoattack" in control.stdout + control.stderr


def test_run_process_kills_the_whole_group_at_its_limit(suite, tmp_path):
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n")
    started = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        rc, timed_out, out = suite.run_process([sys.executable, "-c", code], 3, log, echo=False)
    assert timed_out and rc is not None and time.monotonic() - started < 30
    grandchild = int(out.split()[0])
    for _ in range(50):  # the group got SIGKILL: the grandchild dies too (its zombie is reaped by init)
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/stat").exists() and ") Z " in Path(f"/proc/{grandchild}/stat").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived its step")


class _SetupSuite:
    """Suite._setup with the state check and pip replaced: which states lead to a (re)build."""

    def __init__(self, suite, tmp_path, states, pip_rc=0):
        self.obj = suite.Suite("setup", tmp_path, sys.executable, suite.Clock(480, time.time()))
        self.states, self.pip_calls = list(states), []
        self.obj._state = lambda limit: self.states.pop(0)

        def fake_run_process(cmd, limit, log, cwd=None, env=None, echo=True):
            self.pip_calls.append(cmd)
            return pip_rc, False, ""

        self.run_process = fake_run_process

    def run(self, monkeypatch, suite):
        monkeypatch.setattr(suite, "run_process", self.run_process)
        return self.obj._setup(suite.SETUP, 300)


def test_setup_rebuilds_only_when_missing_stale_or_installed_elsewhere(suite, tmp_path, monkeypatch):
    here = str(ROOT / "fsmooth" / "__init__.py")
    current = {"installed": True, "path": here, "stale": None}
    fake = _SetupSuite(suite, tmp_path, [current])
    assert fake.run(monkeypatch, suite).status == "ok" and fake.pip_calls == []

    stale = {"installed": True, "path": here, "stale": "fsmooth._C was built for torch 2.10.0, but torch 2.11.0"}
    for before in (stale, {"installed": False, "why": "No module named 'fsmooth'"},
                   {"installed": True, "path": "/elsewhere/fsmooth/__init__.py", "stale": None}):
        fake = _SetupSuite(suite, tmp_path, [before, current])
        result = fake.run(monkeypatch, suite)
        assert result.status == "ok" and "built" in result.reason
        (cmd,) = fake.pip_calls
        assert cmd[1:] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]

    fake = _SetupSuite(suite, tmp_path, [stale], pip_rc=1)
    result = fake.run(monkeypatch, suite)
    assert result.status == "failed" and "pip install exited 1" in result.reason

    fake = _SetupSuite(suite, tmp_path, [stale])
    fake.obj.install = False  # --no-install: report, never touch the environment
    result = fake.run(monkeypatch, suite)
    assert result.status == "ok" and "--no-install" in result.reason and fake.pip_calls == []


def test_headlines_from_rows(suite):
    rows = [
        {"section": "throughput", "provider": "eager", "batch": 512, "status": "ok", "useful_iters_per_s": 100.0},
        {"section": "throughput", "provider": "graph-bf16", "batch": 512, "status": "ok", "engine_used": "graph",
         "useful_iters_per_s": 500.0, "roofline_fraction": 0.4},
        {"section": "throughput", "provider": "compile-bf16", "batch": 512, "status": "ok", "compile_mode": "default",
         "useful_iters_per_s": 250.0},
        {"section": "latency", "provider": "eager", "batch": 1, "iters": 300, "status": "ok", "median_ms": 900.0},
        {"section": "latency", "provider": "graph-bf16", "batch": 1, "iters": 300, "status": "ok", "median_ms": 60.0},
        {"section": "early-exit", "provider": "graph-bf16-nocompact", "batch": 512, "status": "ok", "median_ms": 10.0},
        {"section": "early-exit", "provider": "graph-bf16", "batch": 512, "status": "ok", "median_ms": 7.0},
        {"section": "throughput", "provider": "graph-fp32", "batch": 64, "status": "error", "reason": "boom"},
        {"section": "throughput", "provider": "graph-bf16-compiled", "batch": 512, "status": "ok",
         "engine_used": "graph", "useful_iters_per_s": 800.0, "roofline_fraction": 0.64},
        {"section": "latency", "provider": "graph-bf16-compiled", "batch": 1, "iters": 300, "status": "ok",
         "median_ms": 45.0},
        {"section": "throughput", "provider": "graph-bf16-bn", "batch": 512, "status": "ok",
         "useful_iters_per_s": 400.0},
    ]
    text = "\n".join(suite.headlines(rows))
    assert "graph-bf16-compiled vs torch.compile bf16 (default) at batch 512: 3.20x" in text
    assert "graph-bf16 at batch 512, BatchNorms as affine maps vs kept: 500 vs 400 img-it/s (1.25x)" in text
    assert "graph-bf16-compiled 45 ms vs eager 900 ms: 20.0x lower" in text and "8.00x eager fp32" in text
    assert "5.00x eager fp32" in text and "40.0% of the measured bf16 rate" in text and "(graph)" in text
    assert "2.00x (target >= 1.3x)" in text
    assert "15.0x lower" in text
    assert "compaction saves 30.0%" in text
    assert "graph-fp32 batch 64: error: boom" in text
    assert suite.headlines([]) == ["none measured in this call (see the steps and the rows)"]


def test_headlines_compare_rows_of_one_step(suite):
    """fourth times graph-bf16 in two steps; the torch.compile ratio uses the one measured beside torch.compile."""
    def row(provider, rate, step):
        return {"section": "throughput", "provider": provider, "batch": 512, "status": "ok",
                "useful_iters_per_s": rate, "tag": f"fourth-x/{step}"}
    rows = [row("graph-bf16-bn", 400.0, "batchnorm"), row("graph-bf16", 600.0, "batchnorm"),
            row("graph-bf16", 500.0, "compiled-prefix"), row("compile-bf16", 250.0, "compiled-prefix")]
    text = "\n".join(suite.headlines(rows))
    assert "graph-bf16 vs torch.compile bf16 (None) at batch 512: 2.00x (target >= 1.3x)\n" in text + "\n"
    assert "BatchNorms as affine maps vs kept: 600 vs 400 img-it/s (1.50x)" in text
    # Only rows of different steps: compared, and said to be.
    text = "\n".join(suite.headlines([rows[1], rows[3]]))
    assert "2.40x (target >= 1.3x); measured in different steps (batchnorm, compiled-prefix), not back to back" in text
    text = "\n".join(suite.headlines([rows[0], rows[2]]))
    assert "500 vs 400 img-it/s (1.25x); measured in different steps (compiled-prefix, batchnorm)" in text


@pytest.mark.slow
def test_quick_call_writes_the_result_files(tmp_path):
    """The whole orchestration on CPU: setup check, extension check, a benchmark step with its plan."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "quick", "--no-install", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: the extension check fails without a GPU
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iters_per_sec.csv", "iters_per_sec.jsonl", "steps.jsonl",
                                                          "suite.log", "summary.md"]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["name"] for s in steps] == ["setup", "extension", "quick"]
    assert steps[0]["status"] == "ok" and steps[2]["status"] == "ok"
    call_id = steps[0]["call_id"]
    rows = [json.loads(line) for line in (tmp_path / "iters_per_sec.jsonl").read_text().splitlines()]
    assert rows and all(r["tag"] == f"{call_id}/quick" for r in rows)
    assert {r["section"] for r in rows} >= {"plan", "throughput"}  # the rate probe behind the plan
    assert any(r.get("planned_s") for r in rows)
    assert all(r.get("engine_used") for r in rows if r["status"] == "ok" and r["section"] == "throughput")
    assert "# plan throughput" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("(results:")
    assert "## Headline numbers" in (tmp_path / "summary.md").read_text()

"""The GPU suite: every GPU check of fsmooth and the benchmark, in at most three device calls.

GPU time comes rarely, in commands of at most 10 minutes and 30 minutes in all, so the suite is three
calls, each planned to end within ``--budget-s`` (480 s: 8 minutes, the first call's install and
extension build included), most important first::

    bash bench/gpu_suite.sh first    # install, fsmooth._C check, GPU tests, headline throughput table
    bash bench/gpu_suite.sh second   # latency (batch 1 and 8, 300 iterations), loss kernel, compile max-autotune
    bash bench/gpu_suite.sh third    # early exit (compaction vs masking) at 512, the 10,000-input workload
    bash bench/gpu_suite.sh fourth   # after a first run: GPU tests again, BatchNorm A/B, kernel profile,
                                     # compiled prefix, what was skipped
    bash bench/gpu_suite.sh fifth    # after fourth: GPU tests, the affine kernel's A/B, graph-bf16-compiled's
                                     # profile, batch-1 latency, torch.compile bf16 max-autotune at 512

``first`` is the one command that checks the whole GPU side of fsmooth and shows the headline numbers.
Also: ``setup`` (install, and rebuild ``fsmooth._C`` when ``csrc/`` changed or it was built for another
torch), ``tests`` (setup + GPU tests), ``quick`` (the CPU smoke benchmark on the GPU machine).

Each step gets what is left of the call's budget (or its own cap) and is skipped, with the reason, when
less than it needs is left. A benchmark step runs ``bench/iters_per_sec.py --budget-s``: it prints each
row's planned time (FLOPs over loop rates it measures first, ``bench/planner.py``) before running them,
headline rows first, and skips the rows that would overrun. Every step runs in its own process group,
killed at its limit, so a hung device cannot take the call past its budget; the GPU tests also have a
per-test timeout that interrupts a hang (pytest-timeout, thread method).

The GPU tests are the files in :data:`GPU_TEST_FILES`, named so that collecting them never imports the
evaluation tests (and with them pyautoattack / torchattacks, which the GPU machine does not have).

Results, in one folder (``--out-dir``; default ``$OUT`` when set, else ``bench/results/gpu-<call>-<time>/``):

* ``iters_per_sec.jsonl`` / ``.csv``: every benchmark row of the call (``tag`` = ``CALL_ID/STEP``), measured
  or skipped with its reason, with ``planned_s``, ``wall_s`` and ``engine_used``;
* ``steps.jsonl``: one line per step: limit, wall time, status, reason, details;
* ``summary.md``: the headline numbers, the steps, the rows' table, the GPU tests' outcome;
* ``suite.log``: everything else (install and pytest output, progress logs).

This script imports no torch: it only starts processes and reads their results.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

ROOT = Path(__file__).resolve().parents[1]
CALL_BUDGET_S = 480.0            # 8 minutes: a device command may run 10
BENCH_START_MARGIN_S = 20.0      # interpreter and torch start, model build, last writes of a benchmark step
TEST_TIMEOUT_S = 120             # per GPU test
# The test files that hold the GPU tests (``pytest.mark.cuda``); tests/test_gpu_suite.py checks the list
# is complete and that collecting it imports neither pyautoattack nor torchattacks.
GPU_TEST_FILES = ("tests/test_csrc.py", "tests/test_defense_cuda.py", "tests/test_feature_loss.py",
                  "tests/test_channel_affine.py")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a call: ``action`` is ``setup``, ``extension``, ``tests`` or ``bench``."""

    name: str
    action: str
    about: str
    bench_args: tuple[str, ...] = ()   # bench/iters_per_sec.py arguments of a ``bench`` step
    cap_s: float | None = None         # at most this long (None: all that is left of the call)
    min_s: float = 60.0                # skipped when less than this is left
    fatal: bool = False                # a failure skips the rest of the call

    def __post_init__(self):
        if self.action not in ("setup", "extension", "tests", "bench"):
            raise ValueError(f"action must be setup, extension, tests or bench, got {self.action!r}")


SETUP = Step("setup", "setup", "install fsmooth (editable, no index); build fsmooth._C when missing, built for "
             "another torch or from other csrc/ sources", cap_s=360, min_s=30, fatal=True)
EXTENSION = Step("extension", "extension", "import fsmooth._C built against the running torch; WHILE nodes "
                 "supported", cap_s=60, min_s=10)
TESTS = Step("tests", "tests", f"pytest -m cuda on {' '.join(GPU_TEST_FILES)}, {TEST_TIMEOUT_S} s per test "
             "(thread method)", cap_s=180, min_s=60)

# The headline engines: the captured eager prefix, and the prefix torch.compile-d inside the graphs (1.20x
# torch.compile at batch 512 on the H200, 2026-11-26, where the first alone ran 0.75x).
GRAPH_BF16 = ("graph-bf16", "graph-bf16-compiled")
_EXIT = ("--exit-batches", "512", "--exit-iters", "300", "--repeats", "3", "--warmup", "0")
# Throughput at the headline batch, 50 fixed iterations, rows in the order given; and the kernel profile there.
_AT_512 = ("--sections", "throughput", "--batches", "512", "--iters", "50")
_AT_512_TAIL = ("--max-batch-probe", "", "--repeats", "3", "--warmup", "0")
_COMPILE_DEFAULT = ("--compile-modes", "default", "--compile-allowance", "default=40")


def _profile_args(*providers: str) -> tuple[str, ...]:
    return ("--sections", "profile", "--profile-batch", "512", "--profile-iters", "20",
            "--profile-providers", *providers, *_COMPILE_DEFAULT)


# Benchmark steps. Within each, rows run in the order given: batch 512 first, eager first at each batch
# (the baseline of "x eager"), masking before compaction (the saving is computed on the compaction row).
THROUGHPUT = Step(
    "throughput", "bench", "useful image-iterations/s, 50 fixed iterations, batches 512 64 1: eager fp32, "
    "graph-bf16, graph-bf16-compiled, chunked-bf16, graph-fp32, torch.compile (default mode, bf16)",
    ("--sections", "throughput", "--batches", "512", "64", "1", "--iters", "50",
     "--providers", "eager", *GRAPH_BF16, "chunked-bf16", "graph-fp32", "compile-bf16",
     "--compile-modes", "default", "--compile-allowance", "default=40",
     "--max-batch-probe", "", "--repeats", "3", "--warmup", "0"))
LATENCY = Step(
    "latency", "bench", "ms per call at batch 1 and 8, 300 fixed iterations",
    ("--sections", "latency", "--latency-batches", "1", "8", "--latency-iters", "300",
     "--providers", "eager", *GRAPH_BF16, "chunked-bf16", "graph-fp32", "chunked-fp32", "fsmooth-eager",
     "--compile-allowance", "default=40", "--repeats", "5", "--warmup", "1"), cap_s=200)
LOSS_KERNEL = Step(
    "loss-kernel", "bench", "fused Triton L_F + gradient vs the eager reference, fp32 and bf16",
    ("--sections", "loss-kernel"), min_s=45)
COMPILE_512 = Step(
    "compile-512", "bench", "torch.compile max-autotune (falling back to default) vs graph-bf16 at batch 512",
    (*_AT_512, "--providers", "graph-bf16", "compile-bf16", "compile", "--compile-modes", "max-autotune", "default",
     *_AT_512_TAIL))
EARLY_EXIT = Step(
    "early-exit", "bench", "synthetic exit schedule at batch 512: masking vs compaction, bf16 engines",
    ("--sections", "early-exit", "--exit-providers", "graph-bf16-nocompact", "graph-bf16",
     "chunked-bf16-nocompact", "chunked-bf16", *_EXIT), cap_s=180)
WORKLOAD = Step(
    "workload", "bench", "10,000 inputs: masking vs compaction vs continuous batching (bf16)",
    ("--sections", "workload", "--workload-size", "10000", "--workload-batch", "512", "--exit-iters", "300"))
EARLY_EXIT_FP32 = Step(
    "early-exit-fp32", "bench", "the exit schedule with the fp32 engines and the eager loops",
    ("--sections", "early-exit", "--exit-providers", "graph-fp32-nocompact", "graph-fp32",
     "chunked-fp32-nocompact", "chunked-fp32", "fsmooth-eager", "eager", *_EXIT))
PROFILE = Step(
    "profile", "bench", "kernel breakdown at batch 512, 20 fixed iterations: chunked-bf16, graph-bf16, eager-bf16, "
    "torch.compile bf16 (default mode): which kernels dominate",
    _profile_args("chunked-bf16", "graph-bf16", "eager-bf16", "compile-bf16"), cap_s=200)
COMPILED_PREFIX = Step(
    "compiled-prefix", "bench", "graph-bf16 with its prefix torch.compile-d inside the graphs vs graph-bf16 and "
    "torch.compile bf16 at batch 512 (the lever the first run's 0.74x points to)",
    # compile-bf16 compiled in 8.6 s on the H200 (2026-11-26)
    (*_AT_512, "--providers", "graph-bf16", "graph-bf16-compiled", "compile-bf16", *_COMPILE_DEFAULT, *_AT_512_TAIL),
    cap_s=240)
BATCHNORM = Step(
    "batchnorm", "bench", "graph-bf16 (uncompiled and compiled prefix) and chunked-bf16 at batch 512 with the "
    "bf16 copy's BatchNorms run as affine maps (the default since 2026-11-26) vs kept as BatchNorms (-bn)",
    (*_AT_512, "--providers", "graph-bf16-bn", "graph-bf16", "graph-bf16-compiled-bn", "graph-bf16-compiled",
     "chunked-bf16-bn", "chunked-bf16", *_COMPILE_DEFAULT, *_AT_512_TAIL), cap_s=180)
AFFINE_KERNEL = Step(
    "affine-kernel", "bench", "graph-bf16 and chunked-bf16 at batch 512 with the affine BatchNorms run by the "
    "Triton channel-affine kernel (the default since 2026-11-27) vs addcmul (-addcmul), each pair back to back",
    (*_AT_512, "--providers", "graph-bf16-addcmul", "graph-bf16", "chunked-bf16-addcmul", "chunked-bf16",
     *_AT_512_TAIL), cap_s=120)
PROFILE_COMPILED = Step(
    "profile-compiled", "bench", "kernel breakdown at batch 512, 20 fixed iterations: graph-bf16-compiled (the "
    "headline engine, not profiled before) beside torch.compile bf16 (default mode): what is left between it and "
    "the bf16 matmul rate",
    _profile_args("graph-bf16-compiled", "compile-bf16"), cap_s=150)
PROFILE_COMPILED_CHUNKED = Step(
    "profile-compiled-chunked", "bench", "kernel breakdown at batch 512, 20 fixed iterations: the compiled prefix "
    "through the chunked engine (its graph replays start from the host, so the profiler sees every trip: "
    "graph-bf16-compiled's WHILE loop showed it one trip of 20 on the H100, 2026-11-27) beside torch.compile bf16",
    _profile_args("chunked-bf16-compiled", "compile-bf16"), cap_s=150)
LATENCY_1 = Step(
    "latency-1", "bench", "ms per call at batch 1, 300 fixed iterations: eager fp32, graph-bf16 and "
    "graph-bf16-compiled with the affine BatchNorms (the batch-1 target, 9.39x before them)",
    ("--sections", "latency", "--latency-batches", "1", "--latency-iters", "300",
     "--providers", "eager", *GRAPH_BF16, "--compile-allowance", "default=40", "--repeats", "5", "--warmup", "1"),
    cap_s=150)
COMPILE_512_BF16 = Step(
    "compile-512-bf16", "bench", "torch.compile bf16 in max-autotune mode (falling back to default) beside "
    "graph-bf16-compiled at batch 512: the strongest torch.compile at the headline precision (compile-512 without "
    "its fp32 rows, which never fitted a call)",
    (*_AT_512, "--providers", "graph-bf16-compiled", "compile-bf16", "--compile-modes", "max-autotune", "default",
     *_AT_512_TAIL))
QUICK = Step("quick", "bench", "the CPU smoke configuration, on the GPU machine", ("--quick",))

CALLS: dict[str, tuple[Step, ...]] = {
    "first": (SETUP, EXTENSION, TESTS, THROUGHPUT),
    "second": (SETUP, EXTENSION, LATENCY, LOSS_KERNEL, COMPILE_512),
    "third": (SETUP, EXTENSION, EARLY_EXIT, WORKLOAD, EARLY_EXIT_FP32),
    # After a first run: the GPU tests again (fixes since), the profile, and what the three calls skipped.
    "fourth": (SETUP, EXTENSION, TESTS, BATCHNORM, PROFILE, COMPILED_PREFIX, EARLY_EXIT_FP32, COMPILE_512),
    # After fourth (2026-11-27): the GPU tests (the channel-affine kernel's among them), its A/B, the headline
    # engine's own profile, batch-1 latency, then the max-autotune comparison fourth's budget never reached.
    "fifth": (SETUP, EXTENSION, TESTS, AFFINE_KERNEL, PROFILE_COMPILED, LATENCY_1, COMPILE_512_BF16),
    # After fifth (2026-11-27, H100): what its budget skipped, the batch-1 target (missed narrowly) first, and the
    # compiled prefix's whole profile, which graph-bf16-compiled's WHILE loop hid from the profiler.
    "sixth": (SETUP, EXTENSION, TESTS, LATENCY_1, PROFILE_COMPILED_CHUNKED, COMPILE_512_BF16),
    "setup": (SETUP, EXTENSION),
    "tests": (SETUP, EXTENSION, TESTS),
    "quick": (SETUP, EXTENSION, QUICK),
}


@dataclasses.dataclass
class StepResult:
    name: str
    status: str                       # ok, failed, timeout, skipped
    limit_s: float | None = None
    wall_s: float = 0.0
    reason: str = ""
    details: dict = dataclasses.field(default_factory=dict)


class Clock:
    """Seconds left of the call's budget, counted from ``started`` (epoch seconds)."""

    def __init__(self, budget_s: float, started: float, now: Callable[[], float] = time.time):
        self.budget_s, self.started, self._now = budget_s, started, now

    def elapsed(self) -> float:
        return self._now() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def step_limit(step: Step, left: float) -> tuple[float, str | None]:
    """``(seconds the step may take, None)``, or ``(0, why it is skipped)``."""
    limit = left if step.cap_s is None else min(step.cap_s, left)
    if limit < step.min_s:
        return 0.0, f"{max(left, 0):.0f} s left of the call's budget, the step needs at least {step.min_s:.0f} s"
    return limit, None


def run_steps(steps: Iterable[Step], clock: Clock, act: Callable[[Step, float], StepResult],
              announce: Callable[[str], None] = print,
              after_step: Callable[[StepResult], None] = lambda r: None) -> list[StepResult]:
    """Run ``steps`` in order, each within what is left (and its cap); skip what cannot fit."""
    results, stop = [], None
    for step in steps:
        limit, reason = step_limit(step, clock.left())
        if stop is not None:
            reason = stop
        if reason is not None:
            result = StepResult(step.name, "skipped", reason=reason)
            announce(f"== {step.name}: skipped: {reason}")
        else:
            announce(f"== {step.name}: {step.about}; limit {limit:.0f} s ({clock.left():.0f} s left of the "
                     f"call's {clock.budget_s:.0f} s)")
            started = time.monotonic()
            result = act(step, limit)
            result.limit_s, result.wall_s = round(limit), round(time.monotonic() - started, 1)
            announce(f"== {step.name}: {result.status} in {result.wall_s:.0f} s"
                     + (f": {result.reason}" if result.reason else ""))
            if step.fatal and result.status != "ok":
                stop = f"{step.name} failed: {result.reason}"
        results.append(result)
        after_step(result)
    return results


# ----------------------------------------------------------------------------------------------------------
# Processes

def run_process(cmd: list[str], limit_s: float, log, cwd: Path = ROOT, env: Mapping[str, str] | None = None,
                echo: bool = True) -> tuple[int | None, bool, str]:
    """Run ``cmd`` in its own process group; stdout to ``log`` (and our stdout), stderr to ``log``.

    Returns ``(exit code, timed out, stdout)``. At ``limit_s`` the whole group is killed (torch.compile's
    workers too), so nothing outlives the step.
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")  # lines as they come, up to a kill
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
    try:  # the group: at the limit the step itself, and in any case what it left running
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rc = proc.wait()
    reader.join(timeout=10)
    return rc, timed_out, "".join(lines)


_STATE_CODE = """
import json
try:
    import fsmooth, fsmooth.kernels, fsmooth.defense
except Exception as exc:
    print(json.dumps({"installed": False, "why": f"{type(exc).__name__}: {exc}"}))
else:
    from fsmooth._ext import stale_reason
    print(json.dumps({"installed": True, "path": fsmooth.__file__, "stale": stale_reason()}))
"""

_EXTENSION_CODE = """
import json, torch
from fsmooth import _ext
from fsmooth.defense import while_loop
cuda = torch.cuda.is_available()
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if cuda else "none",
       "build": _ext.build_info(), "stale": _ext.stale_reason(),
       "native_while": while_loop.native_while_available(),
       "while_unavailable": while_loop.while_loop_unavailable_reason(torch.device("cuda")) if cuda else "no CUDA"}
try:
    import triton
    out["triton"] = triton.__version__
except Exception as exc:
    out["triton"] = f"unavailable ({type(exc).__name__})"
print(json.dumps(out))
"""


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def pytest_timeout_args(per_test_s: float) -> list[str]:
    """pytest-timeout's thread method interrupts a test stuck in a device call (the signal method cannot);
    without the plugin, the step's own limit (a process-group kill) is the only bound."""
    if importlib.util.find_spec("pytest_timeout") is None:
        return []
    return ["--timeout", str(int(per_test_s)), "--timeout-method", "thread"]


def gpu_test_command(python: str, per_test_s: float) -> list[str]:
    return [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "cuda",
            *pytest_timeout_args(per_test_s), *GPU_TEST_FILES]


class Suite:
    """The actions of one call: processes, their logs and results in ``out_dir``."""

    def __init__(self, call: str, out_dir: Path, python: str, clock: Clock, install: bool = True):
        self.call, self.out_dir, self.python, self.clock = call, out_dir, python, clock
        self.install = install
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.call_id = f"{call}-{stamp}-{uuid.uuid4().hex[:6]}"
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(out_dir / "suite.log", "a", encoding="utf-8")
        self.environment: dict = {}
        self.results: list[StepResult] = []

    def act(self, step: Step, limit: float) -> StepResult:
        return getattr(self, f"_{step.action}")(step, limit)

    # ---------------------------------------------------------------------------------------- actions
    def _state(self, limit: float) -> dict:
        rc, timed_out, out = run_process([self.python, "-c", _STATE_CODE], min(limit, 120), self.log,
                                         cwd=Path(tempfile.gettempdir()), echo=False)
        return _last_json(out) or {"installed": False, "why": f"state check failed (exit {rc})"}

    def _setup(self, step: Step, limit: float) -> StepResult:
        started = time.monotonic()
        state = self._state(limit)
        installed_here = state.get("installed") and Path(state.get("path", "")).resolve().is_relative_to(ROOT)
        if installed_here and state.get("stale") is None:
            return StepResult(step.name, "ok", reason="installed; fsmooth._C current", details=state)
        why = (state.get("stale") if installed_here else
               state.get("why") or f"fsmooth is installed from {state.get('path')}, not {ROOT}")
        if not self.install:
            return StepResult(step.name, "ok" if state.get("installed") else "failed",
                              reason=f"not installing (--no-install): {why}", details=state)
        print(f"   installing (pip install --no-deps --no-build-isolation --no-index -e .): {why}", flush=True)
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
        left = limit - (time.monotonic() - started)
        rc, timed_out, _ = run_process([self.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                        "--no-index", "-e", str(ROOT)], left, self.log, env=env, echo=False)
        if timed_out or rc != 0:
            return StepResult(step.name, "timeout" if timed_out else "failed",
                              reason=f"pip install {'timed out' if timed_out else f'exited {rc}'}: see suite.log",
                              details={"before": why})
        state = self._state(limit)
        details = {"before": why, "after": state, "build_s": round(time.monotonic() - started, 1)}
        if not state.get("installed"):
            return StepResult(step.name, "failed", reason=f"fsmooth does not import: {state.get('why')}",
                              details=details)
        if state.get("stale") is not None:  # fsmooth runs without it (no graph engine): not fatal here
            return StepResult(step.name, "ok", reason=f"installed, but fsmooth._C: {state['stale']}",
                              details=details)
        return StepResult(step.name, "ok", reason=f"installed and built in {details['build_s']:.0f} s",
                          details=details)

    def _extension(self, step: Step, limit: float) -> StepResult:
        rc, timed_out, out = run_process([self.python, "-c", _EXTENSION_CODE], limit, self.log,
                                         cwd=Path(tempfile.gettempdir()), echo=False)
        info = _last_json(out)
        if info is None:
            return StepResult(step.name, "timeout" if timed_out else "failed",
                              reason=f"the check did not report (exit {rc}): see suite.log")
        self.environment = info
        problems = [p for p in (info.get("stale"), info.get("while_unavailable")) if p]
        return StepResult(step.name, "failed" if problems else "ok", reason="; ".join(problems), details=info)

    def _tests(self, step: Step, limit: float) -> StepResult:
        cmd = gpu_test_command(self.python, min(TEST_TIMEOUT_S, limit))
        if "--timeout" not in cmd:
            print("   pytest-timeout is not installed: a hung test is stopped only by the step's limit", flush=True)
        rc, timed_out, out = run_process(cmd, limit, self.log)
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
        return StepResult(step.name, status, reason=tail, details={"exit": rc, "output_tail": out[-4000:]})

    def _bench(self, step: Step, limit: float) -> StepResult:
        budget = max(limit - BENCH_START_MARGIN_S, 0.0)
        cmd = [self.python, "bench/iters_per_sec.py", "--out-dir", str(self.out_dir),
               "--tag", f"{self.call_id}/{step.name}", "--budget-s", f"{budget:.0f}", "-v", *step.bench_args]
        rc, timed_out, _ = run_process(cmd, limit, self.log)
        if timed_out:
            return StepResult(step.name, "timeout", reason=f"killed at its {limit:.0f} s limit; the rows it "
                              "finished are in iters_per_sec.jsonl", details={"exit": rc})
        return StepResult(step.name, "ok" if rc == 0 else "failed",
                          reason="" if rc == 0 else f"exited {rc}: see suite.log", details={"exit": rc})

    # ---------------------------------------------------------------------------------------- results
    def record(self, result: StepResult) -> None:
        self.results.append(result)
        with open(self.out_dir / "steps.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"call": self.call, "call_id": self.call_id, **dataclasses.asdict(result)},
                               default=str) + "\n")
        write_atomic(self.out_dir / "summary.md", self.summary())

    def rows(self) -> list[dict]:
        return [r for r in read_rows(self.out_dir / "iters_per_sec.jsonl")
                if str(r.get("tag")).split("/", 1)[0] == self.call_id]

    def summary(self) -> str:
        env = self.environment
        head = [f"# fsmooth GPU suite: `{self.call}`", "",
                f"- call id: {self.call_id}, started {self.date}, budget {self.clock.budget_s:.0f} s, "
                f"elapsed {self.clock.elapsed():.0f} s",
                f"- GPU: {env.get('gpu', 'unknown')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
                f"CUDA {env.get('cuda', '?')}; fsmooth._C build: {env.get('build')}",
                f"- command: bash bench/gpu_suite.sh {self.call}", ""]
        rows = self.rows()
        parts = head + ["## Headline numbers", ""] + [f"- {line}" for line in headlines(rows)] + [""]
        parts += ["## Steps", "", markdown_table(
            [dataclasses.asdict(r) for r in self.results],
            (("name", "step"), ("status", "status"), ("limit_s", "limit s"), ("wall_s", "wall s"),
             ("reason", "reason"))), ""]
        timed = [r for r in rows if r.get("section") != "profile"]
        if timed:
            parts += ["## Rows", "", markdown_table(timed, ROW_COLUMNS), ""]
        profile = [r for r in rows if r.get("section") == "profile"]
        if profile:
            parts += ["## Kernel profile", "", markdown_table(profile, PROFILE_COLUMNS), ""]
        tests = next((r for r in self.results if r.name == "tests" and r.details.get("output_tail")), None)
        if tests:
            parts += ["## GPU tests (end of output)", "", "```", tests.details["output_tail"][-2500:].strip(),
                      "```", ""]
        return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Summary

ROW_COLUMNS = (("section", "section"), ("provider", "provider"), ("engine_used", "engine that ran"),
               ("dtype", "prec"), ("batch", "batch"), ("iters", "iters"), ("status", "status"),
               ("median_ms", "median ms"), ("useful_iters_per_s", "img-it/s"), ("speedup_vs_eager", "x eager"),
               ("roofline_fraction", "roofline"), ("occupancy", "occup."), ("compaction_saving", "saving"),
               ("planned_s", "planned s"), ("wall_s", "wall s"), ("reason", "reason"))


PROFILE_COLUMNS = (("provider", "provider"), ("engine_used", "engine that ran"), ("dtype", "prec"),
                   ("batch", "batch"), ("iters", "iters"), ("status", "status"), ("category", "what"),
                   ("device_ms", "device ms"), ("share", "share"), ("calls", "calls"), ("kernel", "kernel"),
                   ("reason", "reason"))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut off by a kill
    return rows


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")[:160]


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _find_all(rows, section, provider, batch=None, status="ok") -> list[dict]:
    return [r for r in rows if r.get("section") == section and r.get("provider") == provider
            and r.get("status") == status and (batch is None or r.get("batch") == batch)]


def _find(rows, section, provider, batch=None, status="ok"):
    found = _find_all(rows, section, provider, batch, status)
    return found[0] if found else None


def _step_of(row: dict) -> str:
    """The suite step that measured ``row`` (its tag is ``CALL_ID/STEP``), or ``""`` for a bare tag."""
    tag = str(row.get("tag") or "")
    return tag.split("/", 1)[1] if "/" in tag else ""


def _apart(a: dict, b: dict) -> str:
    """What a headline comparing rows ``a`` and ``b`` adds when two steps measured them."""
    if _step_of(a) == _step_of(b):
        return ""
    return f"; measured in different steps ({_step_of(a) or '?'}, {_step_of(b) or '?'}), not back to back"


def _pair(firsts: list[dict], seconds: list[dict]) -> tuple[dict | None, dict | None]:
    """A row of each list from the same step (measured back to back) when there is one, else the first of each."""
    for a in firsts:
        for b in seconds:
            if _step_of(a) == _step_of(b):
                return a, b
    return (firsts[0] if firsts else None), (seconds[0] if seconds else None)


def headlines(rows: list[dict]) -> list[str]:
    """issue 6's targets, from this call's rows (goals of the benchmark, not assertions)."""
    out = []
    eager = _find(rows, "throughput", "eager", 512)
    compiles = _find_all(rows, "throughput", "compile-bf16", 512)
    slow = _find(rows, "latency", "eager", 1)
    for name in GRAPH_BF16:  # the captured engine, then with its prefix compiled inside the graphs
        # A call can time an engine in several steps: compare it with torch.compile from the same step.
        graph, compiled = _pair(_find_all(rows, "throughput", name, 512), compiles)
        if graph:
            line = (f"throughput, batch 512, 50 iterations: {name} ({graph.get('engine_used')}) "
                    f"{graph['useful_iters_per_s']:.4g} img-it/s")
            if graph.get("roofline_fraction") is not None:
                line += f", {graph['roofline_fraction']:.1%} of the measured bf16 rate (target >= 50 %)"
            if eager:
                line += (f"; {graph['useful_iters_per_s'] / eager['useful_iters_per_s']:.2f}x eager fp32 "
                         f"({eager['useful_iters_per_s']:.4g} img-it/s; target >= 4x)")
            out.append(line)
            if compiled:
                out.append(f"{name} vs torch.compile bf16 ({compiled.get('compile_mode')}) at batch 512: "
                           f"{graph['useful_iters_per_s'] / compiled['useful_iters_per_s']:.2f}x (target >= 1.3x)"
                           + _apart(graph, compiled))
        fast = _find(rows, "latency", name, 1)
        if fast and slow:
            out.append(f"latency, batch 1, {fast['iters']} iterations: {name} {fast['median_ms']:.4g} ms vs eager "
                       f"{slow['median_ms']:.4g} ms: {slow['median_ms'] / fast['median_ms']:.1f}x lower (target >= 10x)")
    for name in ("graph-bf16", "graph-bf16-compiled", "chunked-bf16"):
        kept, affine = _pair(_find_all(rows, "throughput", f"{name}-bn", 512), _find_all(rows, "throughput", name, 512))
        if affine and kept:
            out.append(f"{name} at batch 512, BatchNorms as affine maps vs kept: "
                       f"{affine['useful_iters_per_s']:.4g} vs {kept['useful_iters_per_s']:.4g} img-it/s "
                       f"({affine['useful_iters_per_s'] / kept['useful_iters_per_s']:.2f}x)" + _apart(affine, kept))
    compact, masked = _find(rows, "early-exit", "graph-bf16", 512), _find(rows, "early-exit", "graph-bf16-nocompact", 512)
    if compact and masked:
        out.append(f"early exit at batch 512: compaction saves {1 - compact['median_ms'] / masked['median_ms']:.1%} "
                   f"of graph-bf16's masked time (target >= 25 %; exit iterations p50 {compact.get('iters_p50')}, "
                   f"max {compact.get('iters_max')})")
    workload = [r for r in rows if r.get("section") == "workload" and r.get("status") == "ok"]
    if workload:
        out.append(f"{workload[0]['batch']}-input workload: " + "; ".join(
            f"{r['provider']} {r['median_ms'] / 1e3:.3g} s, occupancy {_cell(r.get('occupancy'))}" for r in workload))
    for provider in dict.fromkeys(r["provider"] for r in rows if r.get("section") == "profile"):
        mine = [r for r in rows if r.get("section") == "profile" and r.get("provider") == provider
                and r.get("status") in ("ok", "partial")]
        kinds = [r for r in mine if r.get("category") != "total" and not str(r.get("category", "")).startswith("kernel")]
        total = next((r for r in mine if r.get("category") == "total"), None)
        if total and kinds:
            out.append(f"profile, {provider} at batch {total['batch']}, {total['iters']} iterations: "
                       f"{total['device_ms']:.4g} ms of kernels; " + ", ".join(
                           f"{r['category']} {r['share']:.0%}" for r in kinds[:4])
                       + (f" (partial: {total['reason']})" if total["status"] == "partial" else ""))
    for r in rows:
        if r.get("status") in ("error", "oom", "check_failed", "no_kernels"):
            out.append(f"{r.get('section')}/{r.get('provider')} batch {r.get('batch')}: {r['status']}: "
                       f"{_cell(r.get('reason'))}")
    return out or ["none measured in this call (see the steps and the rows)"]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# CLI

def default_out_dir(call: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    return ROOT / "bench" / "results" / f"gpu-{call}-{stamp}"


def describe_calls() -> str:
    lines = []
    for call, steps in CALLS.items():
        lines.append(f"{call}:")
        for step in steps:
            cap = f"at most {step.cap_s:.0f} s" if step.cap_s else "what is left"
            lines.append(f"  {step.name:<16} {step.about} ({cap})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=describe_calls(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("call", nargs="?", choices=sorted(CALLS), help="which call to run (none: list them)")
    p.add_argument("--budget-s", type=float, default=CALL_BUDGET_S, help="the call's time budget")
    p.add_argument("--started", type=float, default=None,
                   help="epoch seconds the budget counts from (gpu_suite.sh passes its own start)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="result folder (default: $OUT, else bench/results/gpu-<call>-<time>/)")
    p.add_argument("--python", default=sys.executable, help="the Python that has torch")
    p.add_argument("--no-install", action="store_true",
                   help="setup only reports: never pip-installs or rebuilds (an environment you manage yourself)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.call is None:
        print(describe_calls())
        return 0
    clock = Clock(args.budget_s, args.started or time.time())
    out_dir = args.out_dir or default_out_dir(args.call)
    suite = Suite(args.call, out_dir, args.python, clock, install=not args.no_install)
    print(f"# fsmooth GPU suite `{args.call}` ({suite.call_id}): {args.budget_s:.0f} s budget; results in {out_dir}",
          flush=True)
    if shutil.which("nvidia-smi"):
        run_process(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                     "--format=csv,noheader"], 20, suite.log, echo=True)

    def announce(line: str) -> None:
        print(line, flush=True)
        suite.log.write(line + "\n")
        suite.log.flush()

    results = run_steps(CALLS[args.call], clock, suite.act, announce, suite.record)
    summary = suite.summary()
    write_atomic(out_dir / "summary.md", summary)
    # The device tool returns the end of the output: the headline numbers go last.
    print("\n" + summary.split("## Steps")[0].split("## Headline numbers")[0].strip())
    print("\n## Steps\n\n" + markdown_table([dataclasses.asdict(r) for r in results],
                                            (("name", "step"), ("status", "status"), ("wall_s", "wall s"),
                                             ("reason", "reason"))))
    print("\n## Headline numbers\n\n" + "\n".join(f"- {line}" for line in headlines(suite.rows())))
    print(f"\n(results: {out_dir})")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Smoke tests of the benchmark scripts in bench/ (CPU --quick runs; no speed assertions) and the FLOP counter."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"
REQUIRED = ("run_id", "date", "command", "device", "gpu_name", "torch", "triton", "cuda", "section", "provider",
            "status")


def run_script(script: str, out_dir: Path, *extra, interpret: bool = False) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1" if interpret else "0")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out-dir", str(out_dir), *extra],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def read_rows(out_dir: Path, stem: str) -> tuple[list[dict], list[dict]]:
    jsonl = [json.loads(line) for line in (out_dir / f"{stem}.jsonl").read_text().splitlines()]
    with open(out_dir / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return jsonl, rows


@pytest.fixture
def bench_modules(monkeypatch):
    """The bench scripts import each other as siblings (they run as ``python bench/x.py``)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import benchlib
    import iters_per_sec
    return benchlib, iters_per_sec


def test_iters_per_sec_quick_writes_rows(tmp_path):
    stdout = run_script("iters_per_sec.py", tmp_path)
    jsonl, rows = read_rows(tmp_path, "iters_per_sec")
    assert len(jsonl) == len(rows) > 0
    for row in jsonl:
        assert all(row.get(k) not in (None, "") for k in REQUIRED), row
        assert row["status"] in ("ok", "skipped", "error", "oom", "check_failed", "no_kernels")
        if row["status"] != "ok":
            assert row["reason"], row  # every provider that did not run says why
    # What the CPU can run runs: an error row here would be one on a GPU too (e.g. start points the defense
    # refuses); only providers the CPU lacks are skipped.
    assert not [(r["section"], r["provider"], r["reason"]) for r in jsonl if r["status"] not in ("ok", "skipped")]
    sections = {r["section"] for r in jsonl}
    assert sections == {"roofline", "throughput", "latency", "early-exit", "workload", "loss-kernel", "profile"}
    profile = [r for r in jsonl if r["section"] == "profile" and r["provider"] == "eager-bf16"]
    total = next(r for r in profile if r["category"] == "total")
    kinds = [r for r in profile if r["category"] not in ("total",) and not r["category"].startswith("kernel")]
    assert total["status"] == "ok" and total["device_ms"] > 0 and total["profiled_wall_ms"] > 0
    assert abs(sum(r["device_ms"] for r in kinds) - total["device_ms"]) < 1e-6 * total["device_ms"]
    assert any(r["category"] == "convolution" and r["share"] > 0.1 for r in kinds)
    eager = [r for r in jsonl if r["provider"] == "eager" and r["section"] == "throughput"]
    assert {r["batch"] for r in eager} == {1, 2}
    for r in eager:
        assert r["status"] == "ok"  # (its check compares eager with eager: see test_check_fails_a_wrong_provider)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["useful_iters"] == r["batch"] * r["iters"]
        assert r["useful_iters_per_s"] > 0 and r["roofline_fraction"] > 0
    flops = next(r for r in jsonl if r["provider"] == "flops-per-image-iteration")
    # WRN-10-1 to block1 on 32x32: conv1 3->16 and two 16->16 3x3 convs, times 2 for the input gradient.
    assert flops["forward_plus_input_grad_flops"] == 2 * (2 * 1024 * 16 * 27 + 2 * (2 * 1024 * 16 * 144))
    # A provider the CPU cannot run is listed as skipped with its reason, not silently dropped.
    assert any(r["provider"] == "graph-bf16" and r["status"] == "skipped" for r in jsonl)
    exit_rows = [r for r in jsonl if r["section"] == "early-exit" and r["status"] == "ok"]
    assert exit_rows and all(r["exit_delta"] > 0 for r in exit_rows)
    assert rows[0]["gpu_name"] and rows[0]["command"].endswith(f"--out-dir {tmp_path}")
    assert stdout.splitlines()[-1].strip()  # the table is printed last


def test_loss_kernel_quick_interpreted(tmp_path):
    run_script("loss_kernel.py", tmp_path, "--dtypes", "fp32", interpret=True)
    jsonl, rows = read_rows(tmp_path, "loss_kernel")
    assert len(jsonl) == len(rows)
    by = {(r["provider"], r["shape"]): r for r in jsonl}
    assert by.get(("copy", jsonl[0]["shape"]), {}).get("bytes_per_s", 0) > 0
    triton = [r for r in jsonl if r["provider"] == "triton"]
    assert triton and all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in triton), triton
    for r in jsonl[1:]:
        assert all(r.get(k) not in (None, "") for k in REQUIRED)
        assert r["median_ms"] > 0 and r["copy_bandwidth_fraction"] > 0


def test_flop_counter_matches_hand_count(bench_modules):
    benchlib, _ = bench_modules
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),            # 4x5x5 outputs x 3*3*3 MACs
        nn.ReLU(),
        nn.Conv2d(4, 6, 1, stride=2),             # 6x3x3 outputs x 4 MACs
        nn.Conv2d(6, 6, 3, padding=1, groups=3),  # 6x3x3 outputs x 2*3*3 MACs
        nn.Flatten(),
        nn.Linear(54, 5),                         # 5 outputs x 54 MACs
    )
    forward = 2 * (100 * 27 + 54 * 4 + 54 * 18 + 5 * 54)
    counted = benchlib.count_flops(net, torch.rand(3, 3, 5, 5))
    assert counted["forward_flops"] == forward == 8316
    assert counted["forward_plus_input_grad_flops"] == 2 * forward
    assert counted["layers_counted"] == 4  # one hook call per layer call (the batch is one call)


class _WrongProvider:
    """A provider whose defended inputs are off by 10% of the update: the check must refuse it."""

    name, precision = "wrong", "fp32"

    def __init__(self, reference, t0):
        self.reference, self.t0 = reference, t0

    def unavailable(self, device):
        return None

    def prepare(self, *args):
        pass

    def run(self, t0, schedule):
        from providers import RunOutput
        off = self.reference.inputs + 0.1 * (self.reference.inputs - self.t0)
        return RunOutput(off, self.reference.iterations + 1)

    def describe(self):
        return {}

    def close(self):
        pass


def test_check_fails_a_wrong_provider(bench_modules):
    from providers import RunOutput, Schedule
    _, ips = bench_modules
    torch.manual_seed(0)
    t0 = torch.rand(3, 4, dtype=torch.float64)
    ref = RunOutput(t0 + torch.randn(3, 4, dtype=torch.float64), torch.tensor([2, 3, 4]))
    wrong = _WrongProvider(ref, t0)
    checked = ips.compare(wrong.run(t0, None), ref, t0)
    assert checked["rel_err"] == pytest.approx(0.1, rel=1e-12) and checked["iters_mismatch"] == 3
    assert ips.compare(ref, ref, t0)["rel_err"] == 0.0
    row = ips.measure(wrong, None, None, Schedule(1.0, 0.0, 4), [t0], ref, repeats=1, warmup=0, device="cpu")
    assert row["status"] == "check_failed" and "rel_err 0.1" in row["reason"]


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_flop_counter_counts_reused_modules_per_call(bench_modules):
    benchlib, _ = bench_modules
    counted = benchlib.count_flops(_Twice(), torch.rand(1, 2, 4, 4))
    assert counted["forward_flops"] == 2 * (2 * 32 * 18)
    assert counted["layers_counted"] == 2


def test_first_exit_iterations(bench_modules):
    _, ips = bench_modules
    losses = torch.tensor([[0.5, 0.3, 0.1, 0.05], [0.5, 0.45, 0.4, 0.35], [0.1, 0.1, 0.1, 0.1]])
    hits = ips.first_exit_iterations(losses, delta=0.2, max_iters=3)
    assert hits.tolist() == [2, 3, 0]


def test_precision_agreement_quick_writes_row_and_table(tmp_path):
    stdout = run_script("precision_agreement.py", tmp_path)
    jsonl, rows = read_rows(tmp_path, "precision_agreement")
    assert len(jsonl) == len(rows) == 1
    row = jsonl[0]
    assert row["n"] == 8 and row["max_iters"] == 10
    for key in ("same_iterations", "same_prediction", "converged_fp32", "converged_bf16"):
        assert 0.0 <= row[key] <= 1.0
    assert all(row.get(k) not in (None, "") for k in ("date", "command", "device", "torch", "triton"))
    table = (tmp_path / "precision_agreement.md").read_text()
    assert "bf16" in table and table.strip() in stdout


@pytest.fixture
def planner_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import planner
    import providers
    return planner, providers


def test_loop_cost_fit_and_floor(planner_module):
    planner, _ = planner_module
    cost = planner.LoopCost.fit((1, 0.003), (129, 0.131))  # 2 ms fixed + 1 ms per image
    assert cost.fixed_s == pytest.approx(0.002) and cost.per_image_s == pytest.approx(0.001)
    assert cost.iteration_s(512) == pytest.approx(0.514)
    noisy = planner.LoopCost.fit((1, 0.005), (64, 0.004))  # the larger batch measured faster: noise
    assert noisy.per_image_s == pytest.approx(0.5 * 0.004 / 64)  # never free: half its own time per image
    for bad in (((1, 0.1), (1, 0.2)), ((0, 0.1), (8, 0.2)), ((1, 0.0), (8, 0.2))):
        with pytest.raises(ValueError):
            planner.LoopCost.fit(*bad)


def test_planned_seconds_per_provider(planner_module):
    planner, providers = planner_module
    fp32, bf16 = planner.LoopCost(0.001, 0.0001), planner.LoopCost(0.001, 0.00001)
    cost = planner.CostModel(6.7e9, {"fp32": fp32, "bf16": bf16}, {"default": 90.0, "max-autotune": 300.0},
                             row_setup_s=0.5)
    assert cost.flops_per_s("bf16") == pytest.approx(6.7e14) and cost.flops_per_s("tf32") == cost.flops_per_s("fp32")
    eager, graph, chunked, compiled = providers.build_providers(
        ["eager", "graph-bf16", "chunked-bf16", "compile-bf16"], ("max-autotune", "default"))
    loop = 4 * 50 * bf16.iteration_s(512)
    assert cost.provider_s(eager, 512, 50, 4) == pytest.approx(0.5 + 4 * 50 * fp32.iteration_s(512))
    # Graph engines also warm up (2 iterations) and record every bucket 1, 2, ..., 512.
    buckets = [2 ** k for k in range(10)]
    capture = sum(2 * bf16.iteration_s(b) + bf16.fixed_s for b in buckets)
    assert cost.provider_s(graph, 512, 50, 4) == pytest.approx(0.5 + loop + capture)
    assert cost.provider_s(chunked, 512, 50, 4) == pytest.approx(0.5 + loop + capture + 7 * 10 * bf16.fixed_s)
    assert cost.provider_s(compiled, 512, 50, 4) == pytest.approx(0.5 + loop + 300.0)  # the first mode's allowance
    (graph_compiled,) = providers.build_providers(["graph-bf16-compiled"])
    assert graph_compiled.options == {"compile_prefix": True}
    assert cost.provider_s(graph_compiled, 512, 50, 4) == pytest.approx(0.5 + loop + capture + 90.0)


def test_budget_skips_what_would_overrun(planner_module):
    planner, _ = planner_module
    now = [100.0]
    budget = planner.Budget(60, clock=lambda: now[0])
    assert budget.skip_reason(59) is None
    now[0] += 30
    assert budget.left() == 30 and budget.skip_reason(30) is None
    assert budget.skip_reason(31) == "planned 31 s > 30 s left of the 60 s budget"
    assert planner.Budget(None).skip_reason(1e9) is None
    with pytest.raises(ValueError):
        planner.Budget(-1)


def test_iters_per_sec_budget_plans_and_skips(tmp_path):
    stdout = run_script("iters_per_sec.py", tmp_path, "--sections", "throughput", "latency", "--budget-s", "0",
                        "--tag", "budget-test")
    jsonl, _ = read_rows(tmp_path, "iters_per_sec")
    assert all(r["tag"] == "budget-test" for r in jsonl)
    probes = [r for r in jsonl if r["section"] == "plan"]
    assert {r["provider"] for r in probes} == {"probe-fp32", "probe-bf16"} and all(r["flops_per_s"] > 0 for r in probes)
    timed = [r for r in jsonl if r["section"] in ("throughput", "latency") and not r["provider"].startswith("probe:")]
    assert timed and all(r["status"] == "skipped" for r in timed)
    planned = [r for r in timed if "planned_s" in r]  # the others cannot run on a CPU at all
    assert planned and all(r["reason"].startswith("planned ") and r["reason"].endswith("left of the 0 s budget")
                           for r in planned)
    assert stdout.index("# plan throughput") < stdout.index("# plan latency") < stdout.index("# Active Defense")


def test_csv_keeps_an_existing_header(bench_modules, tmp_path):
    benchlib, _ = bench_modules
    old = ("run_id", "section", "provider", "status", "extra")
    (tmp_path / "x.csv").write_text(",".join(old) + "\n")
    benchlib.append_results(tmp_path, "x", {"run_id": "r1"}, [{"section": "s", "provider": "p", "status": "ok",
                                                                "planned_s": 1.5}])
    with open(tmp_path / "x.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["provider"] == "p" and json.loads(row["extra"]) == {"planned_s": 1.5}


def test_exit_rows_are_planned_from_the_pilots_mean_exit(bench_modules, planner_module):
    _, ips = bench_modules
    planner, providers = planner_module
    schedule = providers.Schedule(2.0, 0.01, 300)
    info = {"pilot_iters_mean": 120.0}
    eager, fs_eager, graph, masked = providers.build_providers(
        ["eager", "fsmooth-eager", "graph-bf16", "graph-bf16-nocompact"])
    assert ips.exit_work_fraction(eager, info, schedule) == 1.0  # a masked batch runs to its slowest sample
    assert ips.exit_work_fraction(masked, info, schedule) == 1.0
    assert ips.exit_work_fraction(graph, info, schedule) == pytest.approx(0.5)  # 1.25 x 120 / 300
    assert ips.exit_work_fraction(fs_eager, info, schedule) == pytest.approx(0.5)
    assert ips.exit_work_fraction(graph, None, schedule) == 1.0  # no pilot: the upper bound
    cost = planner.CostModel(1e9, {"fp32": planner.LoopCost(0.0, 1e-4), "bf16": planner.LoopCost(0.0, 1e-5)})
    full = ips.workload_planned_s(cost, masked, 1000, 100, schedule, 1, info)
    half = ips.workload_planned_s(cost, graph, 1000, 100, schedule, 1, info)
    loop = 300 * 100 * 1e-5  # one call of 100 slots x 300 iterations
    assert full == pytest.approx(loop + cost.capture_s("bf16", 100) + 10 * loop)
    assert half == pytest.approx(0.5 * loop + cost.capture_s("bf16", 100) + 0.5 * 10 * loop)


def test_profile_categories_of_gpu_kernel_names(bench_modules):
    import section_profile

    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32_bf16_bf16_128x128x64_warpspecialized": "convolution",
        "void cudnn::bn_bw_1C11_singleread_specialized<__nv_bfloat16, 512, 1, 2, 0>": "batch norm",
        "triton_poi_fused__native_batch_norm_legit_no_training_relu_threshold_backward_0": "inductor fused (Triton)",
        "triton_red_fused_abs_mean_sub_1": "inductor fused (Triton)",
        "_absdev_sign_kernel": "fsmooth loss (Triton)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>":
            "reduction",
        "void nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, true, false, (cudnnKernelDataType_t)0>":
            "layout / copy",
        "some_unheard_of_kernel": "other",
    }
    for name, category in names.items():
        assert section_profile.categorize(name) == category, name


def test_profile_breakdown_rows_add_up(bench_modules):
    import section_profile

    kernels = [("sm90_xmma_fprop_implicit_gemm", 6.0, 10), ("cudnn::bn_fw_inf", 3.0, 5), ("mystery", 1.0, 2)]
    rows = section_profile.breakdown_rows({"provider": "p"}, kernels, top=2)
    assert [r["category"] for r in rows] == ["total", "convolution", "batch norm", "other",
                                             "kernel: convolution", "kernel: batch norm"]
    assert rows[0]["device_ms"] == 10.0 and rows[0]["calls"] == 17
    assert [round(r["share"], 3) for r in rows[1:4]] == [0.6, 0.3, 0.1]
    assert rows[4]["kernel"] == "sm90_xmma_fprop_implicit_gemm"


def test_copy_sources_lists_the_copies_of_one_iteration(monkeypatch, tmp_path):
    """CPU smoke run of bench/copy_sources.py: the input cast to bf16 is a copy it must see; the JSON is written."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("OUT", str(tmp_path))
    import copy_sources

    assert copy_sources.main(["--arch", "wrn-10-1", "--batch", "2", "--backend", "reference"]) == 0
    out = json.loads((tmp_path / "copy_sources.json").read_text())
    assert out["device"] == "cpu" and out["batch"] == 2
    casts = [c for c in out["copies"] if c["op"] == "aten::_to_copy" and c["shapes"].startswith("[[2, 3, 32, 32]")]
    assert casts and all(c["calls"] >= 1 and c["device_us"] == 0.0 for c in casts)


def test_bn_providers_keep_the_batchnorms_of_the_bf16_copy(planner_module):
    """``*-bn`` is the A/B baseline of the affine BatchNorms: its defense's prefix copy keeps BatchNorms."""
    from fsmooth.defense.prefix_state import runs_affine
    from fsmooth.models import WideResNet

    _, providers = planner_module
    graph_bn, compiled_bn = providers.build_providers(["graph-bf16-bn", "graph-bf16-compiled-bn"])
    assert (graph_bn.engine, graph_bn.precision, graph_bn.options) == ("graph", "bf16", {})
    assert compiled_bn.options == {"compile_prefix": True} and compiled_bn.prefix_attrs == graph_bn.prefix_attrs
    # The same switch on the engine that runs here (the graph engines need CUDA).
    provider = providers.EngineProvider("eager-bf16-bn", "eager", "bf16", prefix_attrs=graph_bn.prefix_attrs)
    schedule = providers.Schedule(2.0, 0.01, 3)
    t0 = torch.rand(2, 3, 8, 8)
    for p, kept in ((provider, True), (providers.EngineProvider("eager-bf16", "eager", "bf16"), False)):
        p.prepare(WideResNet(10, 1).eval(), "block1", schedule, t0)
        p.run(t0, schedule)
        assert any(runs_affine(m) for m in p._defense.prefix._shadow.modules()) is not kept
        assert p.describe().get("prefix_attrs") == ({"affine_batchnorms": False} if kept else None)


def test_roofline_probes_are_sized_for_the_device(bench_modules):
    """A CPU run without --quick probes a 1024^3 matrix product, not the GPU's 8192^3 (minutes on one core)."""
    _, iters_per_sec = bench_modules
    cpu = iters_per_sec.parse_args(["--device", "cpu", "--sections", "roofline"])
    assert (cpu.matmul_size, cpu.copy_bytes) == (1024, 256 << 20)
    gpu = iters_per_sec.parse_args(["--device", "cuda", "--sections", "roofline"])
    assert (gpu.matmul_size, gpu.copy_bytes) == (8192, 1 << 30)
    given = iters_per_sec.parse_args(["--device", "cpu", "--matmul-size", "4096"])
    assert given.matmul_size == 4096


def test_environment_labels_the_device_measured_not_the_one_present(bench_modules, monkeypatch):
    """A CPU run on a GPU machine (eval_plan, --device cpu) is labelled cpu, with no GPU name."""
    benchlib, _ = bench_modules
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    env = benchlib.environment("cpu")
    assert env["device"] == "cpu" and env["gpu_name"] == "none"
    assert benchlib.environment()["device"] == "cuda"  # default: the GPU where there is one


def test_engine_start_parts_sum_to_the_start_in_the_state_dtype(bench_modules):
    """The engine rows pass their start as an image in [0, 1] plus noise, which the defense adds in its state
    dtype: the sum must be the start as the other rows round it, above 1 too (no double rounding)."""
    import providers
    gen = torch.Generator().manual_seed(0)
    t0 = torch.rand(200_000, generator=gen) * 1.3 - 0.15  # below 0, inside [0, 1] and above 1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, noise = providers.start_parts(t0, dtype)
        assert x.dtype == noise.dtype == t0.dtype and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x.to(dtype) + noise.to(dtype), t0.to(dtype)), dtype


def test_kernel_timing_on_cuda_keeps_every_timed_call(bench_modules, monkeypatch):
    """bench_kernel_ms on a GPU reports do_bench's every timed call (repeats is their number), and falls back to
    its three quantiles on a triton without return_mode="all"."""
    triton_testing = pytest.importorskip("triton.testing")

    benchlib, _ = bench_modules
    calls = []

    def do_bench(fn, warmup, rep, quantiles=None, return_mode="mean"):
        calls.append((warmup, rep, quantiles, return_mode))
        return [0.5, 0.25, 0.75, 0.5, 1.0, 0.5, 0.5] if return_mode == "all" else [0.25, 0.5, 1.0]

    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    row = benchlib.bench_kernel_ms(lambda: None, "cuda", warmup_ms=7, rep_ms=11).as_row()
    assert row == {"median_ms": 0.5, "min_ms": 0.25, "max_ms": 1.0, "repeats": 7}
    assert calls == [(7, 11, None, "all")]

    def older(fn, warmup, rep, quantiles=None, return_mode="mean"):
        assert return_mode in ("min", "max", "mean", "median")
        return [0.25, 0.5, 1.0]

    monkeypatch.setattr(triton_testing, "do_bench", older)
    assert benchlib.bench_kernel_ms(lambda: None, "cuda").as_row()["repeats"] == 3

"""bench/eval_plan.py: defended-evaluation counts per attack and the measured cost of a defended step."""
from pathlib import Path

import pytest
import torch

from fsmooth.defense import DefenseConfig
from fsmooth.evaluation.protocols import Budget
from fsmooth.models import WideResNet

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def eval_plan(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench scripts import their siblings
    import eval_plan
    return eval_plan


def test_counts_follow_the_published_budgets(eval_plan):
    counts = eval_plan.defended_evaluations(Budget())
    assert counts["apgd-ce"] == (100, 100)
    assert counts["apgd-t"] == (900, 900)              # 9 target classes x 100 iterations
    assert counts["square"] == (5000, 5000)
    assert counts["aa-standard"] == (100, 100 + 900 + 1800 + 5000)
    assert counts["eot-pgd-ce"] == (4000, 4000)        # 100 steps x 20 draws x 2 restarts
    assert counts["eot-pgd-dlr-targeted"] == (4000, 12000)
    assert counts["aa-rand"] == (2000, 4000)
    small = eval_plan.defended_evaluations(Budget(apgd_iter=10, eot_draws=3), num_classes=4)
    assert small["apgd-t"] == (30, 30) and small["aa-rand"] == (30, 60)  # 3 targets for 4 classes


def test_rows_and_hours_scale_with_n_outer_loops_and_settings(eval_plan):
    rows = eval_plan.plan_table(eval_plan.issue12_rows(Budget()), s_step=2.0)
    assert [r["row"] for r in rows] == sorted(r["row"] for r in rows)
    ol10 = next(r for r in rows if r["row"] == 6)
    assert ol10["ol"] == 10 and ol10["n"] == 100
    assert ol10["core_hours"] == [4000 * 100 * 10 * 2.0 / 3600] * 2
    clean = rows[0]
    assert clean["core_hours"] == [1000 * 2 * 2.0 / 3600] * 2  # 1000 images, two models
    # Table 3 runs lambda = 0 and +-each budget lambda: 9 APGD runs for Budget()'s four
    adaptive = next(r for r in rows if r["row"] == 5)
    assert adaptive["evals"] == [100 * 9] * 2 and "9 lambdas" in adaptive["what"]
    assert eval_plan.plan_table(rows, s_step=2.0, threads=4)[0]["core_hours"] == [4 * c for c in clean["core_hours"]]
    assert "| 6 | outerloop 10" in eval_plan.markdown({
        "model": "m", "threads": 1, "rows": rows, "data": "synthetic",
        "environment": {"date": "d", "device": "cpu", "cpu": "x86", "torch": "t", "command": "c"},
        "defense": {"sigma": 0.075, "beta": 2.0, "delta": 0.02},
        "measured": {"probe": 2, "mean_iterations": 3.0, "median_iterations": 3.0, "s_forward": 1.0,
                     "s_step": 2.0}})


def test_measure_times_a_real_defended_step(eval_plan):
    torch.manual_seed(0)
    model = WideResNet(10, 1).eval()
    x = torch.rand(3, 3, 8, 8)
    config = DefenseConfig(beta=0.5, delta=1e-6, max_iters=4)  # never converges: exactly 4 iterations
    measured = eval_plan.measure(model, config, x, torch.tensor([0, 1, 2]))
    assert measured["probe"] == 3 and measured["mean_iterations"] == 4.0
    assert 0 < measured["s_forward"] and 0 < measured["s_step"]

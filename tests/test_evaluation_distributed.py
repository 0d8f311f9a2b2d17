"""torchrun-style sharding on CPU: 2 gloo processes, each a share of the chunks, one merged report."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation_helpers import TINY_DEFENSE, TinyNet, separable_data, tiny_budget, tiny_factory, trained_tiny_net
from fsmooth.evaluation import evaluate

KWARGS = dict(protocol="paper,eot", eps=(8 / 255,), outer_loops=(1,), defense=TINY_DEFENSE, chunk_size=4, quiet=True,
              defended_factory=tiny_factory, seed=3)


def _summary(report):
    return [(r["run_id"], r["correct"], r["seeds"]) for r in report["runs"]] + \
        [(s["target"], s["worst_case"]["correct"], s.get("rescore", {}).get("per_run")) for s in report["settings"]]


def _worker(rank, world, init_file, weights, out, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TinyNet()
        model.load_state_dict(torch.load(weights, weights_only=True))
        x, y = separable_data(n=12, seed=1)
        report = evaluate(model.eval(), x, y, out=out, budget=tiny_budget(), **KWARGS)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
            json.dump({"summary": _summary(report), "world": report["info"]["world_size"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_gloo_processes_merge_to_the_single_process_result(tmp_path):
    model = trained_tiny_net()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    x, y = separable_data(n=12, seed=1)
    single = evaluate(model, x, y, out=tmp_path / "single", budget=tiny_budget(), **KWARGS)

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(weights), str(tmp_path / "sharded"), str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = json.loads(json.dumps(_summary(single)))
    assert ranks[0]["world"] == 2
    assert ranks[0]["summary"] == expected and ranks[1]["summary"] == expected
    merged = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert merged["info"]["world_size"] == 2 and merged["info"]["n"] == 12
    # Each rank ran its own chunks: 3 chunks of 4 images -> rank 0 has chunks 0 and 2, rank 1 chunk 1.
    chunks = sorted(p.name for p in (tmp_path / "sharded" / "state").glob("defended_ol1_eps8_eot-pgd-ce/chunk*.json"))
    assert chunks == ["chunk00000.json", "chunk00001.json", "chunk00002.json"]

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


def _worker(rank, world, init_file, weights, out, results, name="rank", protocol=KWARGS["protocol"], slow_rank=-1):
    """One rank of an evaluation; ``slow_rank``'s chunks each start 1.5 s late (it sits in one while the other
    rank has nothing left of that run)."""
    import time
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TinyNet()
        model.load_state_dict(torch.load(weights, weights_only=True))
        import fsmooth.evaluation.runner as runner
        run_chunk, computed = runner._run_chunk, []

        def counted(*args, **kwargs):  # every chunk this rank computes
            computed.append(1)
            if rank == slow_rank:
                time.sleep(1.5)
            return run_chunk(*args, **kwargs)
        runner._run_chunk = counted
        x, y = separable_data(n=12, seed=1)
        report = evaluate(model.eval(), x, y, out=out, budget=tiny_budget(), **{**KWARGS, "protocol": protocol})
        with open(os.path.join(results, f"{name}{rank}.json"), "w") as f:
            json.dump({"summary": _summary(report), "world": report["info"]["world_size"], "computed": len(computed)},
                      f)
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
    # Every chunk was run once, by whichever rank was free: 3 chunks of 4 images.
    folder = tmp_path / "sharded" / "state" / "defended_ol1_eps8_eot-pgd-ce"
    chunks = sorted(p.name for p in folder.glob("chunk?????.json"))
    assert chunks == ["chunk00000.json", "chunk00001.json", "chunk00002.json"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_a_rank_free_of_one_runs_chunks_takes_the_next_runs(tmp_path, monkeypatch):
    """The chunks of the runs that need no other run's result are one list shared out over the ranks: while
    the slow rank is still in a chunk of one run, the fast rank finishes chunks of later runs (run by run, it
    would wait at the run's gather). Every chunk is computed once, and the results are the single process's."""
    import fsmooth.evaluation.runner as runner
    model = trained_tiny_net()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    x, y = separable_data(n=12, seed=1)
    run_chunk, computed = runner._run_chunk, []
    monkeypatch.setattr(runner, "_run_chunk", lambda *a, **k: computed.append(1) or run_chunk(*a, **k))
    single = evaluate(model, x, y, out=tmp_path / "single", budget=tiny_budget(), **{**KWARGS, "protocol": "eot"})
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(weights), str(tmp_path / "sharded"), str(tmp_path),
                            "slow", "eot", 1), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"slow{r}.json").read_text()) for r in range(2)]
    expected = json.loads(json.dumps(_summary(single)))
    assert [r["summary"] for r in ranks] == [expected] * 2
    assert ranks[0]["computed"] + ranks[1]["computed"] == len(computed) and ranks[1]["computed"] >= 1
    state = tmp_path / "sharded" / "state"
    folders = [state / run["run_id"].replace("/", "_") for run in single["runs"]
               if not run["run_id"].startswith("rescore")]  # in plan order
    finished_at = [sorted(p.stat().st_mtime_ns for p in folder.glob("chunk?????.json")) for folder in folders]
    assert len(finished_at) >= 3 and all(len(times) == 3 for times in finished_at)
    # Run by run, every chunk of a run would finish before any of the next run's.
    assert any(finished_at[i][-1] > finished_at[j][0] for i in range(len(finished_at))
               for j in range(i + 1, len(finished_at))), finished_at


def _late_rank_worker(rank, world, port, timeout_s, delay_s, results):
    """torchrun's environment, init_from_env's group, and a rank that reaches the gather ``delay_s`` late."""
    import time
    from fsmooth.distributed import all_gather_object, init_from_env
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.pop("FSMOOTH_DIST_TIMEOUT_S", None)
    try:
        init_from_env(timeout_s=timeout_s)
        dist.barrier()
    except RuntimeError as e:  # the rendezvous itself: not what this test is about
        outcome = f"init failed: {e}"
    else:
        try:
            if rank == 1:
                time.sleep(delay_s)
            outcome = "ok" if all_gather_object(rank) == [0, 1] else "wrong"
        except RuntimeError as e:
            outcome = f"gather failed: {e}"
        finally:
            dist.destroy_process_group()
    with open(os.path.join(results, f"late{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("timeout_s, survives", [(8.0, False), (90.0, True)])
def test_a_gather_waits_for_a_late_rank_as_long_as_the_timeout_says(tmp_path, timeout_s, survives):
    """One rank 20 s behind the other: an 8 s collective timeout gives up on it, 90 s waits (the evaluation
    passes 7 days: a rank whose chunk holds an image that survives to FAB-T can be hours behind)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_late_rank_worker, args=(2, port, timeout_s, 20.0, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessRaisedException:
        pass
    outcome = (tmp_path / "late0.txt").read_text()
    if outcome.startswith("init failed"):
        pytest.fail(f"the two processes did not meet (a loaded machine?), so the gather was not tested: {outcome}")
    assert outcome == "ok" if survives else outcome.startswith("gather failed"), outcome


def test_collective_timeout_reads_its_environment_variable(monkeypatch):
    from datetime import timedelta
    from fsmooth.distributed import collective_timeout
    monkeypatch.delenv("FSMOOTH_DIST_TIMEOUT_S", raising=False)
    assert collective_timeout() is None and collective_timeout(90) == timedelta(seconds=90)
    monkeypatch.setenv("FSMOOTH_DIST_TIMEOUT_S", "7.5")
    assert collective_timeout(90) == timedelta(seconds=7.5)
    for bad in ("soon", "0", "-3", "inf", "nan", str(30 * 24 * 3600)):
        monkeypatch.setenv("FSMOOTH_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="FSMOOTH_DIST_TIMEOUT_S"):
            collective_timeout()


def test_fsmooth_eval_waits_days_for_its_slowest_rank(monkeypatch):
    """`fsmooth eval` joins the group with a timeout far above gloo's 30 minutes."""
    from fsmooth.evaluation import cli

    class Joined(Exception):
        pass

    def init(timeout_s=None):
        raise Joined(timeout_s)

    monkeypatch.setattr(cli, "_check_options", lambda args: None)
    monkeypatch.setattr(cli, "init_from_env", init)
    with pytest.raises(Joined) as got:
        cli.run(object())
    assert got.value.args[0] >= 7 * 24 * 3600


def _claims_worker(rank, world, init_file, results):
    import time
    import warnings
    import torch.distributed.distributed_c10d as c10d
    from fsmooth.distributed import Claims
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = {}
        for round_ in ("first", "second"):
            claims, mine = Claims(12), []
            for item in claims:
                mine.append(item)
                time.sleep(0.01 if rank == 0 else 0.4)  # rank 1's items are slow ones
                claims.finish()
            dist.barrier()
            got[round_] = {"items": mine, "done": claims.done()}
        got["empty"] = list(Claims(0))

        def unusable():
            raise RuntimeError("no store here")
        c10d._get_default_store, kept = unusable, c10d._get_default_store
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got["fixed"] = list(Claims(5))
        c10d._get_default_store = kept
        got["warned"] = any("fixed share" in str(w.message) for w in caught)
        with open(os.path.join(results, f"claims{rank}.json"), "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_a_rank_that_is_free_takes_the_next_chunk(tmp_path):
    """Claims hands each item to exactly one rank, as the ranks become free: the fast rank takes most of
    them (fixed shares would give each rank 6 of 12). Each Claims has a counter of its own, so a second
    round starts again at item 0; where the group's store is unusable, the fixed shares, with a warning."""
    mp.spawn(_claims_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"claims{r}.json").read_text()) for r in range(2)]
    for round_ in ("first", "second"):
        fast, slow = ranks[0][round_]["items"], ranks[1][round_]["items"]
        assert sorted(fast + slow) == list(range(12)), (fast, slow)
        assert fast == sorted(fast) and slow == sorted(slow)
        assert len(fast) >= 9, (fast, slow)
        assert ranks[0][round_]["done"] == ranks[1][round_]["done"] == 12
    assert ranks[0]["empty"] == ranks[1]["empty"] == []
    assert ranks[0]["fixed"] == [0, 2, 4] and ranks[1]["fixed"] == [1, 3] and ranks[0]["warned"]


def test_claims_without_a_group_are_every_item_in_order():
    from fsmooth.distributed import Claims
    claims = Claims(4)
    assert list(claims) == [0, 1, 2, 3] and list(Claims(0)) == []
    claims.finish()
    assert claims.done() == 1
    with pytest.raises(ValueError, match="n must be"):
        Claims(-1)

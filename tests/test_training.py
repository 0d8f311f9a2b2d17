"""fsmooth.training: learning, exact resume, the schedule, and a 2-process gloo (torchrun) run."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fsmooth.checkpoint import latest_checkpoint, load_meta, load_model
from fsmooth.data import synthetic_dataset
from fsmooth.training import cosine_with_warmup, train

TINY = dict(arch="wrn-10-1", batch_size=16, lr=0.05, warmup_epochs=0.5, eval_batch_size=32, quiet=True,
            command="test")


def tiny_data(n_train=64, n_test=20, size=12, classes=10):
    return (synthetic_dataset(n_train, classes, seed=1, image_size=size),
            synthetic_dataset(n_test, classes, seed=2, image_size=size))


def test_two_epochs_lower_the_loss(tmp_path):
    train_data, test_data = tiny_data()
    result = train(tmp_path, epochs=2, train_data=train_data, test_data=test_data, **TINY)
    first, second = result.history
    assert second["train_loss"] < first["train_loss"]
    assert result.finished and result.checkpoint.name == "epoch-0002"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("train_acc", "test_acc", "train_feature_loss", "test_feature_loss", "lr", "seconds"):
        assert key in log[-1]
    assert log[-1]["test_n"] == 20 and 0 < log[-1]["test_feature_loss"]
    model, meta = load_model(tmp_path)
    assert meta["delta"] == 0.02 and meta["epoch"] == 2 and meta["command"] == "test"
    x = test_data[0][:4].float() / 255
    with torch.no_grad():
        assert torch.allclose(model(x), result.model.eval()(x), atol=1e-6)


def test_plain_cross_entropy_still_logs_feature_loss(tmp_path):
    train_data, test_data = tiny_data(n_train=32, classes=100)
    result = train(tmp_path, epochs=1, delta=None, dataset="cifar100", train_data=train_data,
                   test_data=test_data, **TINY)
    record = result.history[0]
    assert record["train_feature_loss"] > 0 and record["test_feature_loss"] > 0
    assert result.model.fc.out_features == 100


def assert_same_run(full, resumed):
    """A resumed 3-epoch run equals the uninterrupted one: every epoch logged, weights and metrics bitwise."""
    assert resumed.finished and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(full.history, resumed.history):
        assert x["train_loss"] == y["train_loss"] and x["test_acc"] == y["test_acc"]


def test_resume_equals_uninterrupted(tmp_path):
    train_data, test_data = tiny_data(n_train=48)
    full = train(tmp_path / "full", epochs=3, train_data=train_data, test_data=test_data, **TINY)
    part = train(tmp_path / "part", epochs=3, max_epochs_this_run=1, train_data=train_data, test_data=test_data,
                 **TINY)
    assert not part.finished and len(part.history) == 1
    # A kill after the log line but before the checkpoint: the resumed run drops the orphan line.
    with open(tmp_path / "part" / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": -1}) + "\n")
    torch.manual_seed(999)  # the resumed run restores its own RNG state
    resumed = train(tmp_path / "part", epochs=3, resume=True, train_data=train_data, test_data=test_data, **TINY)
    assert_same_run(full, resumed)


def test_resume_with_other_hyperparameters_is_refused_and_lists_them(tmp_path):
    train_data, test_data = tiny_data(n_train=48)
    train(tmp_path, epochs=3, max_epochs_this_run=1, train_data=train_data, test_data=test_data, **TINY)
    log = (tmp_path / "log.jsonl").read_bytes()
    changed = dict(TINY, lr=0.2, batch_size=8)
    with pytest.raises(ValueError, match=r"batch_size 16 -> 8; lr 0.05 -> 0.2") as info:
        train(tmp_path, epochs=3, resume=True, train_data=train_data, test_data=test_data, **changed)
    assert "epoch-0001" in str(info.value)
    with pytest.raises(ValueError, match=r"epochs 3 -> 4"):
        train(tmp_path, epochs=4, resume=True, train_data=train_data, test_data=test_data, **TINY)
    with pytest.raises(ValueError, match=r"n_train 48 -> 32"):  # other data: refused once it is loaded
        train(tmp_path, epochs=3, resume=True, train_data=tiny_data(n_train=32)[0], test_data=test_data, **TINY)
    # Another number of processes shards the data, seeds the augmentation and splits each batch otherwise.
    meta_path = latest_checkpoint(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ValueError, match=r"world_size 2 -> 1"):
        train(tmp_path, epochs=3, resume=True, train_data=train_data, test_data=test_data, **TINY)
    meta_path.write_text(json.dumps(meta))
    assert (tmp_path / "log.jsonl").read_bytes() == log
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    # The recorded values resume (the metadata of a checkpoint written before this check existed has them all).
    resumed = train(tmp_path, epochs=3, resume=True, train_data=train_data, test_data=test_data, **TINY)
    assert resumed.finished and load_meta(tmp_path)["lr"] == 0.05


def test_a_fresh_run_never_deletes_an_existing_one(tmp_path):
    train_data, test_data = tiny_data(n_train=32)
    train(tmp_path, epochs=1, train_data=train_data, test_data=test_data, **TINY)
    log = (tmp_path / "log.jsonl").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(tmp_path, epochs=1, train_data=train_data, test_data=test_data, **TINY)
    assert (tmp_path / "log.jsonl").read_bytes() == log
    with pytest.raises(ValueError, match="exclude each other"):
        train(tmp_path, epochs=1, resume=True, overwrite=True, train_data=train_data, test_data=test_data, **TINY)
    again = train(tmp_path, epochs=1, overwrite=True, seed=1, train_data=train_data, test_data=test_data, **TINY)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and log[0]["train_loss"] == again.history[0]["train_loss"]
    assert load_meta(tmp_path)["seed"] == 1


@pytest.mark.parametrize("damage", ["zero-byte weights", "truncated state", "torn meta", "empty pointer"])
def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, damage):
    train_data, test_data = tiny_data(n_train=48)
    full = train(tmp_path / "full", epochs=3, train_data=train_data, test_data=test_data, **TINY)
    out = tmp_path / "part"
    train(out, epochs=3, max_epochs_this_run=2, train_data=train_data, test_data=test_data, **TINY)
    latest = out / "checkpoints" / "epoch-0002"
    if damage == "zero-byte weights":
        (latest / "model.safetensors").write_bytes(b"")
    elif damage == "truncated state":
        data = (latest / "state.pt").read_bytes()
        (latest / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "torn meta":
        data = (latest / "meta.json").read_bytes()
        (latest / "meta.json").write_bytes(data[: len(data) // 2])
    else:
        (out / "checkpoints" / "latest").write_bytes(b"")
    # A torn last log line too (a crash in the middle of an append).
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    with pytest.warns(RuntimeWarning) as record:
        resumed = train(out, epochs=3, resume=True, train_data=train_data, test_data=test_data, **TINY)
    messages = [str(w.message) for w in record]
    named = "checkpoint pointer" if damage == "empty pointer" else "epoch-0002"
    assert any(named in m for m in messages), messages
    assert any("unreadable line 3 of" in m for m in messages), messages
    assert_same_run(full, resumed)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_log_lines_are_appended_with_one_write_each(tmp_path, monkeypatch):
    import fsmooth.checkpoint as checkpoint
    writes = []
    real_write = os.write

    def record(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint.os, "write", record)
    train_data, test_data = tiny_data(n_train=32)
    train(tmp_path, epochs=2, train_data=train_data, test_data=test_data, **TINY)
    lines = (tmp_path / "log.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and [w for w in writes if w.startswith(b'{"epoch"')] == lines


_KILLED_CHILD = """
import json, os, signal, sys
from fsmooth.data import synthetic_dataset
from fsmooth.training import train

import torch
out, kill_at, tiny = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # the parent's: bitwise-equal results need the same reduction order
real_replace, calls = os.replace, [0]

def replace(src, dst):
    # SIGKILL at the kill_at-th rename: in the middle of a checkpoint write, as a real crash would.
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
train(out, epochs=3, train_data=synthetic_dataset(48, 10, seed=1, image_size=12),
      test_data=synthetic_dataset(20, 10, seed=2, image_size=12), **tiny)
"""


# Each epoch renames 3 times: meta.json in the temp folder, the folder itself, the `latest` pointer.
# 5: epoch 2's complete folder is not yet renamed into place; 6: it is, but `latest` still names epoch 1.
@pytest.mark.parametrize("kill_at", [5, 6])
def test_sigkill_during_checkpoint_write_then_resume(tmp_path, kill_at):
    train_data, test_data = tiny_data(n_train=48)
    full = train(tmp_path / "full", epochs=3, train_data=train_data, test_data=test_data, **TINY)
    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(out), str(kill_at), json.dumps(TINY),
                            str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    resumed = train(out, epochs=3, resume=True, train_data=train_data, test_data=test_data, **TINY)
    assert_same_run(full, resumed)


def test_cosine_with_warmup_schedule():
    f = cosine_with_warmup(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_bad_arguments(tmp_path):
    train_data, test_data = tiny_data(n_train=8)
    with pytest.raises(ValueError, match="amp"):
        train(tmp_path, epochs=1, amp="fp8", train_data=train_data, test_data=test_data, **TINY)
    with pytest.raises(ValueError, match="no batch"):
        train(tmp_path, epochs=1, train_data=train_data, test_data=test_data, **dict(TINY, batch_size=32))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_gloo_two_processes(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 1)):  # a tiny ImageFolder tree: 40 train, 10 test images
        for c in range(10):
            (tmp_path / "data" / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / f"class{c}" / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", FSMOOTH_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "fsmooth", "train", "--out", str(tmp_path / "run"),
           "--data", str(tmp_path / "data"), "--arch", "wrn-10-1", "--epochs", "1", "--batch-size", "8",
           "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["test_n"] == 10  # both ranks' shards were reduced
    _, meta = load_model(tmp_path / "run")
    assert meta["world_size"] == 2 and meta["n_train"] == 40


def _fake_finished_run(run_dir):
    (run_dir / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch-0001" / "weights.safetensors").write_bytes(b"weights")
    (run_dir / "log.jsonl").write_text('{"epoch": 1}\n')
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.mark.parametrize("bad, error, name", [
    (dict(delta=-0.5), ValueError, "delta"), (dict(lr=0.0), ValueError, "lr"),
    (dict(momentum=-1.0), ValueError, "momentum"), (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(warmup_epochs=-1.0), ValueError, "warmup_epochs"), (dict(eval_batch_size=0), ValueError, "eval_batch_size"),
    (dict(limit_train=0), ValueError, "limit_train"), (dict(limit_test=-1), ValueError, "limit_test"),
    (dict(max_epochs_this_run=0), ValueError, "max_epochs_this_run"), (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**32), ValueError, "seed"), (dict(seed=-1), ValueError, "seed"),
    (dict(epochs=0), ValueError, "epochs"), (dict(compile="no"), TypeError, "compile"),
    (dict(arch="wrn-x-1"), ValueError, "arch"), (dict(layer="block9"), ValueError, "block9"),
    (dict(batch_size=64), ValueError, "no batch"),  # found once the data is read: still before any deletion
])
def test_overwrite_with_a_bad_argument_keeps_the_existing_run(tmp_path, bad, error, name):
    train_data, test_data = tiny_data(n_train=32, n_test=8)
    before = _fake_finished_run(tmp_path)
    with pytest.raises(error, match=name):
        train(tmp_path, **{**TINY, "epochs": 1, "overwrite": True, "train_data": train_data, "test_data": test_data,
                           **bad})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before

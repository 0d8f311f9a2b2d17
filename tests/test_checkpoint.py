"""fsmooth.checkpoint: round trips, atomic layout, safe loading; the embedded model."""
import json
import os
from pathlib import Path

import pytest
import torch

from fsmooth.checkpoint import (latest_checkpoint, load_meta, load_model, load_training_state, save_checkpoint,
                                save_run_checkpoint, update_meta)
from fsmooth.models import WideResNet, available_pretrained


def tiny_model(seed=0, num_classes=10):
    torch.manual_seed(seed)
    model = WideResNet(10, 1, num_classes)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_round_trip_fp32_and_fp16(tmp_path):
    model = tiny_model(num_classes=100)
    x = torch.rand(3, 3, 32, 32)
    save_checkpoint(tmp_path / "ck", model, {"arch": "wrn-10-1", "delta_test": 0.05})
    loaded, meta = load_model(tmp_path / "ck")
    assert meta["model_config"]["num_classes"] == 100 and meta["format"].startswith("fsmooth")
    assert loaded.defense_delta == 0.05 and not loaded.training
    assert torch.equal(loaded(x), model(x))
    save_checkpoint(tmp_path / "half", model, {"arch": "wrn-10-1"}, dtype=torch.float16)
    half, _ = load_model(tmp_path / "half" / "model.safetensors")
    assert next(half.parameters()).dtype == torch.float32 and not hasattr(half, "defense_delta")
    ref = model(x)
    assert (half(x) - ref).norm() / ref.norm() < 1e-2


def test_single_file_form_and_update_meta(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, {"arch": "wrn-10-1"})
    os.replace(tmp_path / "ck" / "model.safetensors", tmp_path / "named.safetensors")
    os.replace(tmp_path / "ck" / "meta.json", tmp_path / "named.json")
    update_meta(tmp_path / "named.safetensors", delta_test=0.0311)
    loaded, meta = load_model(tmp_path / "named.safetensors")
    assert meta["delta_test"] == 0.0311 and loaded.defense_delta == 0.0311


def test_run_checkpoints_pointer_pruning_and_state(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    for epoch in (1, 2, 3):
        save_run_checkpoint(tmp_path, epoch, model, {"epoch": epoch}, optimizer=opt,
                            extra_state={"epoch": epoch, "rng": torch.get_rng_state()})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-0002", "epoch-0003", "latest"]
    assert latest_checkpoint(tmp_path).name == "epoch-0003"
    assert load_meta(tmp_path)["epoch"] == 3
    state = load_training_state(tmp_path)
    opt2 = torch.optim.SGD(tiny_model(1).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    key = next(iter(opt.state))
    key2 = next(iter(opt2.state))
    assert torch.equal(opt.state[key]["momentum_buffer"], opt2.state[key2]["momentum_buffer"])


def test_untrusted_state_is_not_unpickled(tmp_path):
    save_run_checkpoint(tmp_path, 1, tiny_model(), {"epoch": 1}, extra_state={"epoch": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"payload": Evil()}, tmp_path / "checkpoints" / "epoch-0001" / "state.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_training_state(tmp_path)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_model(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", tiny_model(), {"arch": "wrn-10-1"})
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path / "ck")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    save_run_checkpoint(tmp_path, 1, model, {"epoch": 1})
    import fsmooth.checkpoint as ck

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        save_run_checkpoint(tmp_path, 2, model, {"epoch": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "epoch-0001"
    assert not (tmp_path / "checkpoints" / "epoch-0002").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["epoch"] == 1


def test_a_save_killed_before_its_cleanup_leaves_nothing_after_the_next_save(tmp_path):
    """A SIGKILL cannot run save_checkpoint's cleanup: its temporary folders (as large as a checkpoint) are
    removed by the next save of the run."""
    model = tiny_model()
    save_run_checkpoint(tmp_path, 1, model, {"epoch": 1})
    root = tmp_path / "checkpoints"
    for leftover in (".epoch-0002.acwmrs0q", ".epoch-0001.old.k2j4x9ab"):  # what the kill leaves
        (root / leftover).mkdir()
        (root / leftover / "model.safetensors").write_bytes(b"weights")
    save_run_checkpoint(tmp_path, 2, model, {"epoch": 2})
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0002", "latest"]


def test_pruning_orders_epochs_by_number_past_9999(tmp_path):
    model = tiny_model()
    for epoch in (9999, 10000, 10001):
        save_run_checkpoint(tmp_path, epoch, model, {"epoch": epoch}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-10000", "epoch-10001", "latest"]


def _data_source():
    for candidate in (os.environ.get("FSMOOTH_DATA"),
                      Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg-q75.tar.gz"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def test_the_default_model_is_embedded():
    from fsmooth.models import available_pretrained
    from fsmooth.models.zoo import DEFAULT_PRETRAINED
    assert DEFAULT_PRETRAINED in available_pretrained()


@pytest.mark.parametrize("name", available_pretrained())
def test_embedded_model_reproduces_recorded_accuracy(name):
    from fsmooth.models import pretrained
    model = pretrained(name)
    meta = model.pretrained_meta
    assert meta["arch"] == "wrn-16-1" and meta["device"] == "cpu" and meta["name"] == name
    assert 0 < meta["delta_test"] == meta["defense"]["delta"] and meta["defense"]["beta"] > 0
    assert model.defense_delta == meta["delta_test"]
    source = _data_source()
    if source is None:
        pytest.skip("no CIFAR-10 data (set FSMOOTH_DATA)")
    from fsmooth.data import load_dataset
    check = meta["subset_check"]
    images, labels = load_dataset(source, "test", "cifar10")
    index = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(check["seed"]))[:check["n"]]
    with torch.no_grad():
        pred = torch.cat([model(images[i].float() / 255).argmax(1) for i in index.split(250)])
    correct = int((pred == labels[index]).sum())
    assert abs(correct - check["correct"]) <= 1, (correct, check)


def test_export_pretrained_is_atomic_checks_its_weights_and_drops_a_stale_log(tmp_path, monkeypatch):
    from fsmooth.models import zoo
    out = tmp_path / "weights"
    save_checkpoint(tmp_path / "a", tiny_model(0), {"delta_test": 0.05})
    save_checkpoint(tmp_path / "b", tiny_model(1), {"delta_test": 0.07})
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n')
    meta = zoo.export_pretrained(tmp_path / "a", "m", out, log=log)
    assert (out / "m.log.jsonl").read_text() == log.read_text() and len(meta["weights_sha256"]) == 64
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(zoo, "load_dataset", fail)  # the export of b fails after staging its weights
    with pytest.raises(OSError, match="disk full"):
        zoo.export_pretrained(tmp_path / "b", "m", out, data=tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, nothing replaced
    monkeypatch.undo()
    # exported again in place (after a new calibration, say): its log stays
    zoo.export_pretrained(out / "m.safetensors", "m", out)
    assert (out / "m.log.jsonl").read_text() == log.read_text()
    # a cut-off between the metadata and the weights leaves a pair that is refused on load
    write = zoo.write_bytes_atomic
    monkeypatch.setattr(zoo, "write_bytes_atomic",
                        lambda path, data: fail() if str(path).endswith(".safetensors") else write(path, data))
    with pytest.raises(OSError, match="disk full"):
        zoo.export_pretrained(tmp_path / "b", "m", out, log=log)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="weights_sha256"):
        load_model(out / "m.safetensors")
    # exported again without a log: the old log would describe another model's training
    meta = zoo.export_pretrained(tmp_path / "b", "m", out)
    assert not (out / "m.log.jsonl").exists() and meta["delta_test"] == 0.07
    # weights that are not the ones the metadata names (an export cut off between its two files) are refused
    (out / "m.safetensors").write_bytes(before["m.safetensors"])
    with pytest.raises(ValueError, match="weights_sha256"):
        load_model(out / "m.safetensors")

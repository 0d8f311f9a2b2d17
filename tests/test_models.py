"""WRN presets, prefixes (direct and torch.fx) and layer-name errors."""
import pytest
import torch
import torchvision

from fsmooth.models import WideResNet, build, layer_module, prefix, resolve_layer, wrn16_4, wrn28_10


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def test_presets_have_the_papers_shapes():
    big = wrn28_10()
    assert 36.4e6 < count_params(big) < 36.6e6  # WRN-28-10 has 36.5M parameters
    assert 2.7e6 < count_params(wrn16_4()) < 2.8e6
    assert build("wrn-28-10", num_classes=100).fc.out_features == 100
    assert build("wrn-10-2").config == dict(depth=10, width=2, num_classes=10, dropout=0.0)
    with torch.no_grad():
        feats = big.eval().prefix("block1")(torch.rand(1, 3, 32, 32))
    assert feats.shape == (1, 160, 32, 32)  # the paper's layer l=0


@pytest.mark.parametrize("arch", ["wrn-27-10", "resnet", "wrn-x-1"])
def test_bad_arch_raises(arch):
    with pytest.raises(ValueError):
        build(arch)


def hooked_output(model, layer, x):
    store = {}
    handle = layer_module(model, layer).register_forward_hook(lambda m, i, o: store.setdefault("out", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return store["out"], logits


def assert_later_layers_do_not_run(pre, later_modules, x):
    ran = []
    handles = [m.register_forward_hook(lambda *a, name=n: ran.append(name)) for n, m in later_modules]
    with torch.no_grad():
        out = pre(x)
    for h in handles:
        h.remove()
    assert ran == []
    return out


@pytest.mark.parametrize("layer", ["conv1", "block1", "block2"])
def test_wrn_prefix_equals_hooked_output(layer):
    torch.manual_seed(0)
    model = WideResNet(10, 2, num_classes=7).eval()
    x = torch.rand(3, 3, 32, 32)
    ref, _ = hooked_output(model, layer, x)
    order = ["conv1", "block1", "block2", "block3", "bn", "fc"]
    later = [(n, getattr(model, n)) for n in order[order.index(layer) + 1:]]
    out = assert_later_layers_do_not_run(prefix(model, layer), later, x)
    assert torch.equal(out, ref)
    assert prefix(model).__len__() == 3  # default layer block1: normalize, conv1, block1


def test_resnet18_prefix_by_tracing():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 40, 36)
    ref, _ = hooked_output(model, "layer1", x)
    later = [(n, getattr(model, n)) for n in ("layer2", "layer3", "layer4", "fc")]
    pre = prefix(model, "layer1")
    out = assert_later_layers_do_not_run(pre, later, x)
    assert torch.equal(out, ref)
    assert pre.conv1 is model.conv1  # parameters are shared, not copied
    # A nested layer works too.
    ref_nested, _ = hooked_output(model, "layer2.0", x)
    assert torch.equal(prefix(model, "layer2.0")(x), ref_nested)


def test_unknown_layer_lists_close_names():
    model = WideResNet(10, 1)
    with pytest.raises(ValueError, match="block1"):
        prefix(model, "blok1")
    with pytest.raises(ValueError, match="layer1"):
        prefix(torchvision.models.resnet18(), "layer_1")
    with pytest.raises(TypeError, match="layer"):
        resolve_layer(model, 3)
    with pytest.raises(ValueError, match="layer must be given"):
        resolve_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
    with pytest.raises(TypeError, match="model"):
        prefix("not a model", "block1")


def test_layer_called_twice_is_ambiguous():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="2 times"):
        prefix(Twice(), "lin")


def test_model_normalises_inside():
    model = WideResNet(10, 1).eval()
    x = torch.rand(2, 3, 32, 32)
    norm = model.normalize(x)
    assert torch.allclose(norm, (x - model.normalize.mean) / model.normalize.std)
    assert not torch.allclose(norm, x)


class _TrainModeOps(torch.nn.Module):
    """No ``prefix()`` method (so it is traced); dropout and batch norm are functional calls on
    ``self.training``, and the normalisation and BatchNorm statistics are buffers of the root module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("running_mean", torch.linspace(-0.2, 0.2, 6))
        self.register_buffer("running_var", torch.linspace(0.5, 1.5, 6))
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)
        self.feat = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x - self.mu))
        h = torch.nn.functional.batch_norm(h, self.running_mean, self.running_var, training=self.training)
        h = self.drop(torch.nn.functional.dropout(h, 0.5, training=self.training))
        return self.fc(self.feat(h).mean((2, 3)))


def test_traced_prefix_is_the_eval_computation_whatever_mode_the_model_is_in():
    torch.manual_seed(0)
    model = _TrainModeOps().train()
    model.drop.eval()  # mixed modes: each module's own mode comes back
    stats = model.running_mean.clone()
    pre = prefix(model, "feat")  # built right after a training loop
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert "training = True" not in pre.code
    x = torch.rand(4, 3, 6, 6)
    model.eval()
    ref, _ = hooked_output(model, "feat", x)
    with torch.no_grad():
        assert torch.equal(pre(x), ref) and torch.equal(pre(x), ref)  # no dropout mask, no batch statistics
    assert torch.equal(model.running_mean, stats)


def test_traced_prefix_reads_the_models_current_root_buffers():
    torch.manual_seed(0)
    model = _TrainModeOps().eval()
    pre = prefix(model, "feat")
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    model.to(torch.float64)  # Module._apply replaces every buffer (as .cuda() does)
    assert len(list(pre.buffers())) == 3 and all(t.dtype == torch.float64 for t in pre.buffers())
    model.mu.fill_(0.0)  # in place
    assert torch.equal(pre(x), hooked_output(model, "feat", x)[0])
    model.running_var = torch.full((6,), 4.0, dtype=torch.float64)  # reassigned
    assert torch.equal(pre(x), hooked_output(model, "feat", x)[0])

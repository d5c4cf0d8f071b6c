"""Static depth pruning: exact closing of chosen blocks, counted FLOPs, the selector, to_static, the static twin."""

import pytest
import torch

import gateify
from gateify.static import seed_gates, static_flops_fraction

from conftest import mix_decisions

REMOVED = {"layer1.1": False, "layer2.2": False, "layer3.0": False}


def labelled(n=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))]


def test_static_mode_closes_exactly_the_chosen_blocks(resnet20, cifar_batch):
    gated = gateify.set_static(gateify.convert(resnet20).eval(), REMOVED)
    seen = {}
    hooks = [gated.get_submodule(name).conv1.register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, i[0].shape[0])) for name in gateify.gates(gated)]
    with torch.no_grad():
        out = gated(cifar_batch)
    for h in hooks:
        h.remove()
    assert set(seen) == set(gateify.gates(gated)) - set(REMOVED)  # removed branches never ran
    assert all(size == len(cifar_batch) for size in seen.values())
    report = gateify.flops(gated, cifar_batch)
    assert report.gate_flops == 0  # no controller runs in static mode
    assert report.executed_fraction == pytest.approx(static_flops_fraction(report, REMOVED))
    for b in report.blocks:
        assert b.keep_rate == (0.0 if b.name in REMOVED else 1.0)
    # the same as a hard gate that skips those blocks for everyone
    thresholds = {name: (2.0 if name in REMOVED else 0.0) for name in gateify.gates(gated)}
    gateify.set_mode(gated, "hard", threshold=thresholds)
    with torch.no_grad():
        assert torch.equal(gated(cifar_batch), out)


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_selector_hits_target_within_one_block(resnet20, target):
    gated = gateify.convert(resnet20)
    keep = gateify.select_blocks(gated, labelled(), target)
    report = gateify.flops(gated.eval(), labelled()[0][0])
    fraction = static_flops_fraction(report, keep)
    assert fraction <= target
    assert target - fraction <= max(b.branch_flops for b in report.blocks) / report.dense_flops
    assert all(g.mode == "auto" for g in gateify.gates(gated).values())  # selection leaves modes alone
    near = gateify.select_blocks(gated, labelled(), target, nearest=True)
    assert abs(static_flops_fraction(report, near) - target) <= abs(fraction - target)


def test_selector_by_keep_rate_removes_least_kept_blocks(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch)
    batches = [(cifar_batch, torch.zeros(len(cifar_batch), dtype=torch.long))]
    gateify.set_mode(gated.eval(), "hard")
    report = gateify.flops(gated, cifar_batch)
    rates = {b.name: b.keep_rate for b in report.blocks}
    keep = gateify.select_blocks(gated, batches, 0.8, criterion="keep_rate")
    removed = [name for name, k in keep.items() if not k]
    assert removed and max(rates[n] for n in removed) <= min(rates[n] for n, k in keep.items() if k)


def test_to_static_equals_static_mode_and_exports(resnet20, cifar_batch):
    gated = gateify.set_static(gateify.convert(resnet20).eval(), REMOVED)
    plain = gateify.to_static(gated).eval()
    assert not gateify.gates(plain)
    assert not any(k.startswith("layer1.1.conv") for k in plain.state_dict())  # removed branches are gone
    with torch.no_grad():
        expected = gated(cifar_batch)
        assert torch.equal(plain(cifar_batch), expected)
    program = torch.export.export(plain, (cifar_batch,))
    with torch.no_grad():
        assert (program.module()(cifar_batch) - expected).abs().max() <= 1e-5


def test_static_twin_is_the_majority_decision(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    with torch.no_grad(), gateify.record_decisions(gated):
        gated(cifar_batch)
    rates = {name: float(g.last.gate.float().mean()) for name, g in gateify.gates(gated).items()}
    twin = gateify.static_twin(gated, [cifar_batch])
    assert twin == {name: rate >= 0.5 for name, rate in rates.items()}
    # the twin is the gated model with every sample given its block's majority decision
    thresholds = {name: (0.0 if keep else 2.0) for name, keep in twin.items()}
    reference = gateify.set_mode(gated, "hard", threshold=thresholds)
    with torch.no_grad():
        majority = reference(cifar_batch)
        assert torch.equal(gateify.set_static(gated, twin)(cifar_batch), majority)


def test_seed_gates_starts_from_a_static_selection(resnet20, cifar_batch):
    gated = seed_gates(gateify.convert(resnet20), REMOVED, confidence=0.9).eval()
    gateify.set_mode(gated, "hard")
    with torch.no_grad():
        out = gated(cifar_batch)
    static = gateify.set_static(gateify.convert(resnet20).eval(), REMOVED)
    with torch.no_grad():
        assert torch.equal(out, static(cifar_batch))


def test_refusals(resnet20):
    gated = gateify.convert(resnet20)
    with pytest.raises(gateify.GateifyError, match="unknown blocks"):
        gateify.set_static(gated, {"layer9.0": False})
    with pytest.raises(gateify.GateifyError, match="below"):
        gateify.select_blocks(gated, labelled(), 0.01)
    with pytest.raises(gateify.NotConvertedError):
        gateify.set_static(resnet20, {})


class LayerScaleBlock(torch.nn.Module):
    """A branch that reads a parameter directly (layer scale), as in ConvNeXt-style blocks."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.full((1, 8, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


class LayerScaleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = LayerScaleBlock(), LayerScaleBlock()

    def forward(self, x):
        return self.b2(self.b1(self.stem(x)))


def test_to_static_and_to_dense_with_a_parameter_in_the_branch():
    torch.manual_seed(0)
    net, x = LayerScaleNet().eval(), torch.randn(2, 3, 8, 8)
    gated = gateify.set_static(gateify.convert(net, example_input=x), {"b1": False}).eval()
    plain = gateify.to_static(gated)
    assert sorted(plain.state_dict()) == ["b2.conv.bias", "b2.conv.weight", "b2.gamma", "stem.bias", "stem.weight"]
    dense = gateify.to_dense(gated)
    with torch.no_grad():
        assert torch.equal(plain(x), gated(x))
        assert torch.equal(dense(x), net(x))

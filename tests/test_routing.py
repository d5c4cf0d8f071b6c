"""Routing among static paths: each sample's output is its path's, a branch runs once per sample that needs it
(the deeper pass replays what they share), FLOPs and thresholds are what inference pays, training reaches every
path, files round-trip, bad plans are refused."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import gateify

from conftest import perturb_batchnorm

# ResNet-20's blocks: a cheap path keeps 3 (layer1.1, layer2.0, layer2.1), the deep one 3 more after them
CHEAP = {"layer1.0": False, "layer1.2": False, "layer2.2": False, "layer3.0": False, "layer3.1": False,
         "layer3.2": False}
DEEP = {"layer1.0": False, "layer1.2": False, "layer3.2": False}
# a cheap path that keeps a block after the point where the deep one departs from it (layer3.0)
CHEAP_LATE = {"layer1.0": False, "layer1.2": False, "layer2.1": False, "layer2.2": False, "layer3.1": False,
              "layer3.2": False}


def confident_model(seed: int = 0) -> nn.Module:
    """A ResNet-20 whose cheap path is sure of some samples and unsure of others (a large, spread-out head)."""
    torch.manual_seed(seed)
    model = perturb_batchnorm(timm.create_model("resnet20", num_classes=10), seed).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)
    return model


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def routed(batch) -> nn.Module:
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).eval()
    gateify.calibrate(model, batch, target=0.5 * (gateify.static_flops_fraction(gateify.flops(model, batch[:2]), CHEAP)
                                                   + gateify.static_flops_fraction(gateify.flops(model, batch[:2]),
                                                                                   DEEP)))
    return model


def levels_of(model: nn.Module) -> torch.Tensor:
    return next(iter(gateify.gates(model).values())).route_state.level.clone()


def test_each_sample_gets_exactly_the_output_of_its_path(routed, batch):
    with torch.no_grad():
        out = routed(batch)
        level = levels_of(routed)
        assert 0 < int(level.sum()) < len(batch)  # some samples went deeper, some did not
        for k, path in enumerate([CHEAP, DEEP]):
            alone = gateify.to_static(routed, keep=path).eval()(batch)
            assert torch.allclose(out[level == k], alone[level == k], atol=1e-5)


def test_the_unsure_samples_go_deeper(routed, batch):
    """The decision is the cheap path's own confidence: every escalated sample is less sure than every kept one."""
    with torch.no_grad():
        routed(batch)
        level = levels_of(routed)
        cheap = gateify.to_static(routed, keep=CHEAP).eval()(batch).softmax(1).amax(1)
    threshold = float(next(iter(gateify.gates(routed).values())).threshold)
    assert torch.equal(level == 1, 1 - cheap >= threshold)


def branch_runs(model, x):
    """Samples each block's branch ran for in one call, over every pass."""
    seen = {}
    hooks = [model.get_submodule(name).conv1.register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, seen.get(name, 0) + i[0].shape[0])) for name in
        gateify.gates(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_a_branch_runs_once_for_each_sample_whose_path_needs_it(routed, batch):
    seen = branch_runs(routed, batch)
    deeper = int(levels_of(routed).sum())
    assert 0 < deeper < len(batch)
    # the cheap path's blocks run for everyone, once (the deeper pass replays them); the deep path's own blocks only
    # for the samples sent deeper; a block on neither path never runs
    expected = {"layer1.1": 24, "layer2.0": 24, "layer2.1": 24, "layer2.2": deeper, "layer3.0": deeper,
                "layer3.1": deeper}
    assert seen == expected


def test_paths_that_part_early_replay_the_common_part_only(batch):
    model = gateify.route(gateify.convert(confident_model()), [CHEAP_LATE, DEEP]).eval()
    gateify.calibrate(model, batch, target=0.55)
    seen = branch_runs(model, batch)
    level = levels_of(model)
    deeper = int(level.sum())
    assert 0 < deeper < len(batch)
    # layer2.0 is the last block before the paths part: replayed; layer3.0 comes after: runs again for the deeper
    assert seen == {"layer1.1": 24, "layer2.0": 24, "layer3.0": 24 + deeper, "layer2.1": deeper,
                    "layer2.2": deeper, "layer3.1": deeper}
    with torch.no_grad():
        out = model(batch)
        for k, path in enumerate([CHEAP_LATE, DEEP]):
            alone = gateify.to_static(model, keep=path).eval()(batch)
            assert torch.allclose(out[level == k], alone[level == k], atol=1e-5)


# three nested paths where the deepest parts from the middle one earlier (layer1.2) than the middle one parts
# from the cheapest (layer3.0): the third pass replays what the first pass computed, not the second's leftovers
THREE = [CHEAP_LATE, {**CHEAP_LATE, "layer3.1": True}, {**CHEAP_LATE, "layer3.1": True, "layer1.2": True}]


def test_three_paths_that_part_in_any_order_give_each_sample_its_paths_output(batch):
    model = gateify.route(gateify.convert(confident_model()), THREE).eval()
    # each deeper level is decided by the threshold of the gate where its path departs
    gateify.set_mode(model, "route", threshold=0.3)
    gateify.gates(model)["layer1.2"].threshold.fill_(0.01)
    with torch.no_grad():
        out = model(batch)
        level = levels_of(model)
        assert all(int((level == k).sum()) > 0 for k in range(3)), level  # every path in use
        for k, path in enumerate(THREE):
            alone = gateify.to_static(model, keep=path).eval()(batch)
            assert torch.allclose(out[level == k], alone[level == k], atol=1e-5), k


def test_calibrate_counts_the_branches_a_deeper_pass_runs_again(batch):
    """CHEAP_LATE's layer3.0 runs again for every sample sent deeper: a cost the decisions alone do not show."""
    model = gateify.route(gateify.convert(confident_model()), [CHEAP_LATE, DEEP]).eval()
    for target in (0.45, 0.55):
        gateify.calibrate(model, batch, target=target, max_error=1.0)
        report = gateify.flops(model, batch)
        # one sample more or less moves the fraction by at most its deep remainder over 24 samples (< 0.03)
        assert report.executed_flops / report.dense_flops == pytest.approx(target, abs=0.015)


def test_a_routed_model_in_another_mode_runs_one_pass(routed, batch):
    source = gateify.flops(confident_model().eval(), batch[:1]).dense_flops
    gateify.set_mode(routed, "route", threshold=0.0)  # in route mode, every sample would go deeper
    with gateify.gate_mode(routed, "dense"):
        assert gateify.flops(routed, batch).executed_flops == pytest.approx(source, rel=1e-9)
        with torch.no_grad():
            assert torch.allclose(routed(batch), confident_model().eval()(batch), atol=1e-5)
    assert gateify.flops(routed, batch).dense_flops == pytest.approx(source, rel=1e-9)


def test_a_sample_routes_the_same_alone_and_in_a_batch(routed, batch):
    with torch.no_grad():
        together = routed(batch)
        level = levels_of(routed)
        for i in range(0, len(batch), 5):
            assert torch.allclose(routed(batch[i:i + 1])[0], together[i], atol=1e-5)
            assert levels_of(routed).item() == level[i].item()


def test_flops_are_the_cheap_path_for_all_and_the_rest_of_the_deep_one_for_the_unsure(routed, batch):
    report = gateify.flops(routed, batch)
    with torch.no_grad():
        routed(batch)
    share = levels_of(routed).float().mean().item()
    cheap = gateify.flops(gateify.to_static(routed, keep=CHEAP), batch[:1]).executed_flops
    deep = gateify.flops(gateify.to_static(routed, keep=DEEP), batch[:1]).executed_flops
    branch = {b.name: b.branch_flops for b in report.blocks}
    replayed = branch["layer1.1"] + branch["layer2.0"] + branch["layer2.1"]  # the deep pass does not redo them
    assert report.gate_flops == 0  # no controller runs in route mode
    assert report.executed_flops == pytest.approx(cheap + share * (deep - replayed), rel=1e-6)
    assert cheap < report.executed_flops < deep


def test_calibrate_meets_a_flops_target_by_the_routing_threshold(batch):
    model = gateify.route(gateify.convert(confident_model(1)), [CHEAP, DEEP]).eval()
    for target in (0.45, 0.55):
        gateify.calibrate(model, batch, target=target)
        assert abs(gateify.flops(model, batch).executed_fraction - target) <= 0.05
        assert all(g.mode == "route" for g in gateify.gates(model).values())


def test_route_loss_trains_every_path_and_teaches_the_cheap_one(batch):
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).train()
    y = torch.arange(len(batch)) % 10
    teacher = torch.randn(len(batch), 10, generator=torch.Generator().manual_seed(2))
    terms = gateify.RouteLoss(model, distill_weight=0.5, self_distill=0.25)(batch, y, teacher)
    terms.total.backward()
    # every block of the deepest path learns; a block on no path does not
    for name, gate in gateify.gates(model).items():
        grad = model.get_submodule(name).conv1.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == DEEP.get(name, True), name
    # the same numbers from the two static paths, computed independently (train-mode BatchNorm on the same batch)
    plain = [gateify.to_static(model, keep=p).train() for p in (CHEAP, DEEP)]
    cheap, deep = (m(batch) for m in plain)

    def kd(student, teach, t=2.0):
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teach / t, 1), log_target=True,
                        reduction="batchmean") * t * t

    expected = [F.cross_entropy(cheap, y) + 0.5 * kd(cheap, teacher) + 0.25 * kd(cheap, deep.detach()),
                F.cross_entropy(deep, y) + 0.5 * kd(deep, teacher)]
    assert terms.per_path == pytest.approx([float(e.detach()) for e in expected], rel=1e-4)


def test_a_routed_file_loads_routed_and_computes_the_same(routed, batch, tmp_path):
    gateify.save(routed, tmp_path / "routed.safetensors")
    loaded = gateify.load(tmp_path / "routed.safetensors").eval()
    assert gateify.is_routed(loaded) and gateify.routing_paths(loaded) == gateify.routing_paths(routed)
    with torch.no_grad():
        assert torch.equal(loaded(batch), routed(batch))
    copied = copy.deepcopy(routed)  # a copy routes with its own state, not the original's
    with torch.no_grad():
        assert torch.equal(copied(batch[:3]), routed(batch[:3]))
    assert levels_of(copied).shape == (3,) and levels_of(routed).shape == (3,)


def test_select_paths_gives_the_static_selections_of_one_greedy_run(batch):
    model = gateify.convert(confident_model())
    labels = torch.arange(len(batch)) % 10
    paths = gateify.select_paths(model, [(batch, labels)], [0.25, 0.45, 0.7])
    assert paths == gateify.select_blocks(model, [(batch, labels)], [0.25, 0.45, 0.7])
    costs = gateify.flops(model, batch[:2])
    for (cheap, deep), target in zip(zip(paths, paths[1:]), [0.25, 0.45, 0.7]):
        assert all(deep[n] for n, keep in cheap.items() if keep)  # nested
        assert gateify.static_flops_fraction(costs, cheap) <= target
    with pytest.raises(gateify.GateConfigError, match="increasing order"):
        gateify.select_paths(model, [(batch, labels)], [0.7, 0.25])


def test_bad_plans_are_refused_with_the_remedy():
    model = gateify.convert(confident_model())
    with pytest.raises(gateify.GateConfigError, match="at least 2"):
        gateify.route(model, [DEEP])
    with pytest.raises(gateify.GateConfigError, match="unknown blocks"):
        gateify.route(model, [{"layer9.9": False}, DEEP])
    with pytest.raises(gateify.GateConfigError, match="same blocks"):
        gateify.route(model, [DEEP, dict(DEEP)])
    assert not gateify.is_routed(model)  # nothing half-done
    gateify.route(model, [CHEAP, DEEP])
    with pytest.raises(gateify.GateConfigError, match="routes already"):
        gateify.route(model, [CHEAP, DEEP])
    with pytest.raises(gateify.GateConfigError, match="to_static"):
        torch.export.export(model.eval(), (torch.randn(2, 3, 32, 32),))
    plain = gateify.to_static(model, keep=CHEAP)
    assert not plain._forward_hooks and not plain._forward_pre_hooks  # the routing passes went with the gates


def test_a_model_that_does_not_return_logits_is_refused_at_its_first_call():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = confident_model()

        def forward(self, x):
            return {"features": self.net.forward_features(x)}

    model = gateify.convert(Features(), example_input=torch.randn(2, 3, 32, 32))
    gateify.route(model, [{f"net.{k}": v for k, v in CHEAP.items()}, {f"net.{k}": v for k, v in DEEP.items()}])
    with pytest.raises(gateify.GateConfigError, match="class logits"):
        model.eval()(torch.randn(2, 3, 32, 32))


def test_routing_needs_no_traceable_top_level():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = confident_model()

        def forward(self, x):
            if x.sum() > 0:  # control flow on the data: torch.fx could not trace this forward
                return self.net(x)
            return self.net(-x)

    model = gateify.convert(DataDependent(), example_input=torch.randn(2, 3, 32, 32))
    paths = [{f"net.{k}": v for k, v in p.items()} for p in (CHEAP, DEEP)]
    gateify.route(model, paths).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gateify.set_mode(model, "route", threshold=0.0)  # every sample to the deep path
    with torch.no_grad():
        assert torch.allclose(model(x), gateify.to_static(model, keep=paths[1]).eval()(x), atol=1e-5)

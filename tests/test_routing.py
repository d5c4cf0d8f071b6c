"""Routing among static paths: each sample's output is its path's, nothing before the departure point runs twice,
FLOPs and thresholds are what inference pays, training reaches every path (the prefix once), no state survives a
call, files round-trip, bad plans are refused. Export, ONNX and compile of routed models: tests/test_export.py."""

import copy
import sys
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.feature_extraction import create_feature_extractor

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


def static_fraction(paths, x):
    costs = gateify.flops(gateify.convert(confident_model()), x[:2])
    return [gateify.static_flops_fraction(costs, p) for p in paths]


@pytest.fixture
def routed(batch) -> gateify.RoutedModel:
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).eval()
    gateify.calibrate(model, batch, target=sum(static_fraction([CHEAP, DEEP], batch)) / 2)
    return model


def alone(model: gateify.RoutedModel, path: dict, x: torch.Tensor) -> torch.Tensor:
    """The output of one path as a plain pruned model, built independently of the routed model's code."""
    with torch.no_grad():
        return gateify.to_static(gateify.convert(confident_model()), keep=path).eval()(x)


def test_each_sample_gets_exactly_the_output_of_its_path(routed, batch):
    with torch.no_grad():
        out, level = routed.forward_routes(batch)
        assert torch.equal(out, routed(batch))
    assert 0 < int(level.sum()) < len(batch)  # some samples went deeper, some did not
    for k, path in enumerate([CHEAP, DEEP]):
        assert torch.allclose(out[level == k], alone(routed, path, batch)[level == k], atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(routed.path(k).eval()(batch), alone(routed, path, batch), atol=1e-5)


def test_the_unsure_samples_go_deeper(routed, batch):
    """The decision is the cheap path's own confidence: every escalated sample is less sure than every kept one."""
    with torch.no_grad():
        level = routed.forward_routes(batch).levels
    cheap = alone(routed, CHEAP, batch).softmax(1).amax(1)
    assert torch.equal(level == 1, 1 - cheap >= routed.threshold[0])


def module_runs(model, x, names):
    """Samples each named module ran for in one call, over every level."""
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, seen.get(name, 0) + i[0].shape[0])) for name in names]
    with torch.no_grad():
        out = model.forward_routes(x)
    for h in hooks:
        h.remove()
    return seen, out.levels


BLOCKS = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]


def test_nothing_before_the_departure_point_runs_twice(routed, batch):
    seen, level = module_runs(routed, batch, ["network.conv1", *[f"network.{b}.conv1" for b in BLOCKS]])
    deeper = int(level.sum())
    assert 0 < deeper < len(batch)
    # the stem and the cheap path's blocks run once for everyone, the deep path's own blocks for the samples sent
    # deeper only (from the activation path 0 left at layer2.2), a block on neither path never
    expected = {"conv1": 24, "layer1.1": 24, "layer2.0": 24, "layer2.1": 24, "layer2.2": deeper, "layer3.0": deeper,
                "layer3.1": deeper}
    assert {k.removeprefix("network.").removesuffix(".conv1"): v for k, v in seen.items()} == expected


class CountClones(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.clones = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.clones += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


def test_without_gradients_a_skipped_block_copies_only_what_is_read_again(routed, batch):
    """A skipped block's static form copies its input for its in-place activation; inlined into a segment that copy
    is dropped where nothing else reads the input (ResNet-20's cheap path skips 6 blocks: one input is also carried
    on for the deep path and stays copied). With gradients on, every copy stays: autograd needs them."""
    routed.threshold.fill_(1.0)  # nobody is unsure enough: path 0 alone
    with torch.no_grad(), CountClones() as counted:
        out = routed(batch)
    assert counted.clones == 1
    assert torch.allclose(out, alone(routed, CHEAP, batch), atol=1e-5)
    x = batch.clone().requires_grad_(True)
    routed(x).square().sum().backward()  # an in-place op on a value saved for backward would raise here
    x2 = batch.clone().requires_grad_(True)
    routed.path(0).eval()(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


class SiluBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class ReadsAgain(nn.Module):
    """The head reads the first block's output again after the others: a skipped block must not act on it in place
    (SiLU of a positive value is not the value, so a missing copy would show)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.b2, self.b3 = nn.Conv2d(3, 8, 3, padding=1), SiluBlock(8), SiluBlock(8), SiluBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.b1(self.stem(x))
        return self.fc((self.b3(self.b2(a)) + a).mean((2, 3)))


@pytest.mark.parametrize("threshold", [1.0, 0.0])  # every sample stays on path 0 / goes on to path 1
def test_a_skipped_blocks_input_read_again_later_keeps_its_copy(batch, threshold):
    torch.manual_seed(0)
    model = perturb_batchnorm(ReadsAgain().eval(), 0)
    cheap, deep = {"b2": False, "b3": False}, {"b3": False}
    routed = gateify.route(gateify.convert(copy.deepcopy(model)), [cheap, deep]).eval()
    routed.threshold.fill_(threshold)
    with torch.no_grad():
        out = routed(batch)
        expected = gateify.to_static(gateify.convert(model), keep=deep if threshold == 0.0 else cheap).eval()(batch)
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_segment_looks_each_module_up_once_per_call(routed, batch, monkeypatch):
    """Generated fx code reads ``getattr(self.network.layer1, "0").conv1`` for every op: a Python call per dot, which
    at batch 1 cost a routed ResNet-20 more than its plain path's module calls (issue 19). The segment's own code
    looks each module on the way up once per call."""
    segment = routed._plans[False].segments[0]
    targets = {n.target for n in segment.graph.nodes if n.op in ("call_module", "get_attr")}
    on_the_way = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
    lookups = []
    plain = nn.Module.__getattr__

    def counting(self, name):
        if sys._getframe(1).f_code.co_filename.startswith("<gateify route_segment"):  # the generated code's own
            lookups.append(name)
        return plain(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", counting)
    with torch.no_grad():
        segment(routed, batch)
    monkeypatch.undo()
    assert 0 < len(lookups) <= len(on_the_way)


def test_paths_that_part_early_start_where_they_part(batch):
    model = gateify.route(gateify.convert(confident_model()), [CHEAP_LATE, DEEP]).eval()
    gateify.calibrate(model, batch, target=0.55)
    seen, level = module_runs(model, batch, [f"network.{b}.conv1" for b in BLOCKS])
    deeper = int(level.sum())
    assert 0 < deeper < len(batch)
    # layer2.0 is the last block before the paths part: once; layer3.0 comes after: again for the deeper samples
    assert {k[len("network."):-len(".conv1")]: v for k, v in seen.items()} == {
        "layer1.1": 24, "layer2.0": 24, "layer3.0": 24 + deeper, "layer2.1": deeper, "layer2.2": deeper,
        "layer3.1": deeper}
    with torch.no_grad():
        out = model(batch)
    for k, path in enumerate([CHEAP_LATE, DEEP]):
        assert torch.allclose(out[level == k], alone(model, path, batch)[level == k], atol=1e-5)


# three nested paths where the deepest parts from the middle one earlier (layer1.2) than the middle one parts
# from the cheapest (layer3.1): the third level starts from what the first level computed, not the second's
THREE = [CHEAP_LATE, {**CHEAP_LATE, "layer3.1": True}, {**CHEAP_LATE, "layer3.1": True, "layer1.2": True}]


def test_three_paths_that_part_in_any_order_give_each_sample_its_paths_output(batch):
    model = gateify.route(gateify.convert(confident_model()), THREE).eval()
    model.threshold.copy_(torch.tensor([0.3, 0.01]))  # one threshold per deeper level
    with torch.no_grad():
        out, level = model.forward_routes(batch)
    assert all(int((level == k).sum()) > 0 for k in range(3)), level  # every path in use
    for k, path in enumerate(THREE):
        assert torch.allclose(out[level == k], alone(model, path, batch)[level == k], atol=1e-5), k
    # level 2 starts at layer1.2 from level 0's activation: layer1.1 before it ran once, layer2.0 after it again
    seen, _ = module_runs(model, batch, ["network.conv1", "network.layer1.1.conv1", "network.layer2.0.conv1"])
    assert seen == {"network.conv1": 24, "network.layer1.1.conv1": 24,
                    "network.layer2.0.conv1": 24 + int((level == 2).sum())}


def test_calibrate_meets_a_flops_target_counted_on_what_runs(batch):
    """CHEAP_LATE's layer3.0 runs again for every sample sent deeper: a cost the paths alone do not show."""
    model = gateify.route(gateify.convert(confident_model(1)), [CHEAP_LATE, DEEP]).eval()
    for target in (0.45, 0.55):
        threshold = gateify.calibrate(model, batch, target=target, max_error=1.0)
        report = gateify.flops(model, batch)
        # one sample more or less moves the fraction by its deep remainder over 24 samples (< 0.03)
        assert report.executed_fraction == pytest.approx(target, abs=0.015)
        assert threshold == pytest.approx(float(model.threshold[0]))
    with pytest.raises(gateify.GateifyError, match="out of reach"):
        gateify.calibrate(model, batch, target=0.05)


def test_flops_are_the_cheap_path_for_all_and_the_rest_of_the_deep_one_for_the_unsure(routed, batch):
    report = gateify.flops(routed, batch)
    share = report.level_shares[1]
    assert 0 < share < 1 and sum(report.level_shares) == pytest.approx(1)
    converted = gateify.convert(confident_model())
    blocks = {b.name: b.branch_flops for b in gateify.flops(converted, batch[:1]).blocks}
    cheap = gateify.flops(routed.path(0), batch[:1]).executed_flops
    deep = gateify.flops(routed.path(1), batch[:1]).executed_flops
    head = 2 * 64 * 10  # the classifier: the deep level pays it again; the stem and layer1.1..layer2.1 it does not
    assert report.executed_flops == pytest.approx(
        cheap + share * (blocks["layer2.2"] + blocks["layer3.0"] + blocks["layer3.1"] + head), rel=1e-6)
    assert cheap < report.executed_flops < deep
    assert report.dense_flops == pytest.approx(gateify.flops(confident_model(), batch[:1]).dense_flops)
    # an escalated sample costs the deep path alone plus the cheap path's own tail after the departure point
    dense, segments = routed.segment_flops(batch[:2])
    tail = cheap - (deep - segments[1])
    assert segments[0] + segments[1] == pytest.approx(deep + tail)
    assert tail == pytest.approx(head)  # here: the cheap path keeps nothing after layer2.1 but the classifier


def test_a_sample_routes_the_same_alone_and_in_a_batch(routed, batch):
    with torch.no_grad():
        together, level = routed.forward_routes(batch)
        for i in range(0, len(batch), 5):
            out, alone_level = routed.forward_routes(batch[i:i + 1])
            assert torch.allclose(out[0], together[i], atol=1e-5)
            assert alone_level.item() == level[i].item()


def test_route_loss_trains_every_path_sharing_the_prefix_and_teaches_the_cheap_one(batch):
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).train()
    plain = [model.path(k).train() for k in range(2)]  # copies of the same weights, before any update
    y = torch.arange(len(batch)) % 10
    teacher = torch.randn(len(batch), 10, generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = model.network.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", seen.get("stem", 0) + 1))
    terms = gateify.RouteLoss(model, distill_weight=0.5, self_distill=0.25)(batch, y, teacher)
    hook.remove()
    assert seen == {"stem": 1}  # the common prefix ran once for both paths
    terms.total.backward()
    for name in BLOCKS:  # every block of the deepest path learns; a block on no path does not
        grad = model.network.get_submodule(name).conv1.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == DEEP.get(name, True), name
    cheap, deep = (m(batch) for m in plain)  # train-mode BatchNorm on the same batch

    def kd(student, teach, t=2.0):
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teach / t, 1), log_target=True,
                        reduction="batchmean") * t * t

    expected = [F.cross_entropy(cheap, y) + 0.5 * kd(cheap, teacher) + 0.25 * kd(cheap, deep.detach()),
                F.cross_entropy(deep, y) + 0.5 * kd(deep, teacher)]
    assert terms.per_path == pytest.approx([float(e.detach()) for e in expected], rel=1e-4)


def test_fit_trains_a_routed_model_with_the_configs_smoothing_and_temperature(batch):
    """Issue 19, defect 6: fit() built no RouteLoss of its own and ignored TrainConfig's loss settings."""
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP])
    y = torch.arange(len(batch)) % 10
    teacher = confident_model(3)
    cfg = gateify.TrainConfig(epochs=1, lr=0.0, weight_decay=0.0, label_smoothing=0.3,
                              distill_weight=0.5, distill_temperature=4.0, self_distill=0.7, grad_clip=0.0)
    history = gateify.fit(model, [(batch, y)], cfg, torch.device("cpu"), teacher=teacher)
    model.train()  # lr 0: the weights did not move, and train-mode BatchNorm uses the batch's statistics
    with torch.no_grad():
        logits = teacher.eval()(batch)
        want = gateify.RouteLoss(model, distill_weight=0.5, temperature=4.0, self_distill=0.7,
                                 label_smoothing=0.3)(batch, y, logits)
        default = gateify.RouteLoss(model, distill_weight=0.5)(batch, y, logits)
    assert history[0]["task"] == pytest.approx(float(want.total), rel=1e-5)
    assert abs(float(default.total) - float(want.total)) > 1e-3  # the settings matter: the test can fail


def test_a_routed_file_loads_routed_and_computes_the_same(routed, batch, tmp_path):
    gateify.save(routed, tmp_path / "routed.safetensors")
    loaded = gateify.load(tmp_path / "routed.safetensors").eval()
    assert isinstance(loaded, gateify.RoutedModel) and gateify.routing_paths(loaded) == gateify.routing_paths(routed)
    assert torch.equal(loaded.threshold, routed.threshold)
    with torch.no_grad():
        assert torch.equal(loaded(batch), routed(batch))
        copied = copy.deepcopy(routed)
        assert torch.equal(copied(batch[:3]), routed(batch[:3]))
    # the network's tensors, the threshold, and path 1's own BatchNorm statistics (path norms, the default)
    own = {k for k in routed.state_dict() if k.startswith("path_norms.1.")}
    assert own and all(k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked") for k in own)
    assert set(routed.state_dict()) - own == ({f"network.{k}" for k in confident_model().state_dict()}
                                              | {"threshold_bits"})
    assert {k for k in loaded.state_dict() if k.startswith("path_norms.")} == own


def test_loading_into_a_model_routed_with_other_paths_is_refused(routed, batch, tmp_path):
    """Issue 19, defect 2: the path buffers were overwritten but the old replay points kept (outputs off by 19.8)."""
    gateify.save(routed, tmp_path / "routed.safetensors")
    other = gateify.route(gateify.convert(confident_model()), [CHEAP_LATE, DEEP]).eval()
    with pytest.raises(gateify.WeightsFileError, match="routes among paths"):
        gateify.load(tmp_path / "routed.safetensors", model=other)
    same = gateify.route(gateify.convert(confident_model(7)), [CHEAP, DEEP]).eval()
    assert gateify.load(tmp_path / "routed.safetensors", model=same) is same
    with torch.no_grad():
        assert torch.equal(same(batch), routed(batch))


def test_a_format_2_routed_file_still_loads(routed, batch, tmp_path):
    """gateify 0.1 stored a routed model as a converted one whose gates held the paths and the threshold."""
    converted = gateify.convert(confident_model())
    tensors = dict(converted.state_dict())
    for name in gateify.gates(converted):
        tensors[f"{name}.gate.threshold_bits"] = routed.threshold_bits[0].clone()
        tensors[f"{name}.gate.route_keep"] = torch.tensor([CHEAP.get(name, True), DEEP.get(name, True)])
    tensors = {k: v for k, v in tensors.items() if not k.endswith("route_keep")}  # format 2's buffers are not needed
    meta = {"gateify_format": "2", "architecture": '{"name": "resnet20", "kwargs": {"num_classes": 10}}',
            "gate_config": '{"gate": "controller", "hidden": 32, "init_keep": 0.95, "tau": 1.0, "noise": 1.0, '
                           '"threshold": 0.5}',
            "gates": "{" + ", ".join(f'"{n}": {{"mode": "route"}}' for n in gateify.gates(converted)) + "}",
            "routing": '{"paths": [' + ", ".join("[" + ", ".join(f'"{n}"' for n in sorted(p)) + "]"
                                                 for p in (CHEAP, DEEP)) + "]}"}
    gateify.io.atomic_save(tensors, str(tmp_path / "old.safetensors"), meta)
    loaded = gateify.load(tmp_path / "old.safetensors").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(batch), routed(batch), atol=1e-6)


def test_no_routing_state_leaks_from_one_call_into_the_next(routed, batch):
    """Issue 19, defect 1: after a call that escalated samples, forward_features(y) returned that call's deep-path
    activations (3 inputs gave 8 rows)."""
    fresh = confident_model().eval()
    y = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert routed.forward_routes(batch).levels.sum() > 0
        assert torch.equal(routed.network.forward_features(y), fresh.forward_features(y))
        assert torch.equal(routed.network(y), fresh(y))
        extractor = create_feature_extractor(routed.network, ["layer2.1", "layer3.1"])
        assert [f.shape[0] for f in extractor(y).values()] == [3, 3]
        out, level = routed.forward_routes(y)
    assert out.shape == (3, 10)
    for k, path in enumerate([CHEAP, DEEP]):
        assert torch.allclose(out[level == k], alone(routed, path, y)[level == k], atol=1e-5)


def test_gradients_flow_through_the_shared_prefix_of_every_escalated_sample(routed, batch):
    """Issue 19, defect 3: the replayed prefix was detached: d(output)/d(input) was 0 for escalated samples."""
    with torch.no_grad():
        level = routed.forward_routes(batch).levels
    i = int(level.nonzero()[0])  # a sample that goes deeper
    x = batch[i:i + 1].clone().requires_grad_(True)
    routed(x).max().backward()
    deep = routed.path(1).eval()
    x2 = batch[i:i + 1].clone().requires_grad_(True)
    deep(x2).max().backward()
    assert x.grad.abs().sum() > 0
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)  # exactly the deep path's saliency
    assert torch.allclose(routed.network.conv1.weight.grad, deep.conv1.weight.grad, atol=1e-5)


def test_gate_modes_do_not_apply_to_a_routed_model(routed):
    """Issue 19, defect 4: set_mode(routed, 'hard') swapped routing for the untrained controllers."""
    for mode in ("hard", "auto", "gumbel", "dense"):
        with pytest.raises(gateify.GateConfigError, match="routed model has none"):
            gateify.set_mode(routed, mode)
    with pytest.raises(gateify.GateConfigError, match="routes already"):
        gateify.route(routed, [CHEAP, DEEP])


def test_shares_need_no_earlier_call_and_training_mode_does_not_route(routed, batch):
    """Issue 19, defect 5: level_shares raised before the first call; a call in train() routed with an uncalibrated
    threshold and updated BatchNorm twice; one state was shared by threads."""
    fresh = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).eval()
    fresh.threshold.copy_(routed.threshold)
    shares = gateify.level_shares(fresh, batch)
    with torch.no_grad():
        level = routed.forward_routes(batch).levels
    assert shares == pytest.approx([float((level == 0).float().mean()), float((level == 1).float().mean())])
    stats = routed.network.bn1.running_mean.clone()
    with pytest.raises(gateify.GateConfigError, match="RouteLoss"):
        routed.train()(batch)
    assert torch.equal(routed.network.bn1.running_mean, stats)
    routed.eval()
    with torch.no_grad():
        expected = [routed(batch[i::4]) for i in range(4)]
    results = {}

    def call(i):
        with torch.no_grad():
            for _ in range(5):
                results[i] = routed(batch[i::4])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


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
    assert gateify.gates(model) and not gateify.is_routed(model)  # the converted model is left as it was
    with pytest.raises(gateify.NotConvertedError, match="convert"):
        gateify.route(confident_model(), [CHEAP, DEEP])
    routed = gateify.route(model, [CHEAP, DEEP]).eval()
    with pytest.raises(gateify.GateifyError, match="torch.export"):
        torch.jit.script(routed)
    with pytest.warns(Warning), pytest.raises(gateify.GateifyError, match="dynamo=True"):
        torch.jit.trace(routed, (torch.randn(2, 3, 32, 32),))


def test_a_model_that_does_not_return_logits_is_refused_when_routed():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = confident_model()

        def forward(self, x):
            return {"features": self.net.forward_features(x)}

    model = gateify.convert(Features(), example_input=torch.randn(2, 3, 32, 32))
    with pytest.raises(gateify.GateConfigError, match="class logits"):
        gateify.route(model, [{f"net.{k}": v for k, v in p.items()} for p in (CHEAP, DEEP)])


def test_a_network_whose_forward_cannot_be_traced_is_refused_with_the_way_out():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = confident_model()

        def forward(self, x):
            if x.sum() > 0:  # control flow on the data: torch.fx cannot trace this forward
                return self.net(x)
            return self.net(-x)

    model = gateify.convert(DataDependent(), example_input=torch.randn(2, 3, 32, 32))
    paths = [{f"net.{k}": v for k, v in p.items()} for p in (CHEAP, DEEP)]
    with pytest.raises(gateify.GateConfigError, match="route the submodule that holds the blocks"):
        gateify.route(model, paths)
    inner = gateify.route(model.net, [CHEAP, DEEP]).eval()  # the way out the message names
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    inner.threshold.fill_(0.0)  # every sample to the deep path
    with torch.no_grad():
        assert torch.allclose(inner(x), alone(inner, DEEP, x), atol=1e-5)


def test_a_dropout_head_trains_with_dropout_and_routes_without(batch):
    """The network is traced in eval() and in train(): F.dropout(training=self.training) is not frozen."""
    torch.manual_seed(0)
    net = perturb_batchnorm(timm.create_model("resnet20", num_classes=10, drop_rate=0.5)).eval()
    model = gateify.route(gateify.convert(net), [CHEAP, DEEP])
    torch.manual_seed(1)
    a = model.train()(batch, every_path=True)
    torch.manual_seed(2)
    b = model(batch, every_path=True)
    assert not torch.allclose(a, b)  # dropout drew different masks
    with torch.no_grad():
        assert torch.equal(model.eval()(batch, every_path=True), model(batch, every_path=True))


def test_path_norms_give_each_deeper_level_its_own_batchnorm_statistics(batch, tmp_path):
    """route(path_norms=True): after the departure point, path 1 keeps running statistics of its own activations;
    the weights stay shared. Without it, both paths' batches update one mixture."""
    shared = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP], path_norms=False).train()
    own = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).train()  # the default
    assert set(own.path_norms["1"]) == {f"{b.replace('.', '_')}_bn{i}" for b in ("layer2.2", "layer3.0", "layer3.1")
                                        for i in (1, 2)}  # the BatchNorms of path 1 after it departs, only
    assert len(list(own.parameters())) == len(list(shared.parameters()))  # no new weights
    with torch.no_grad():
        own(batch, every_path=True)
        shared(batch, every_path=True)
    # layer3.0 runs on path 1 only: with its own statistics it holds exactly what the shared model's BatchNorm holds
    # (one update from path 1's batch); layer2.1's BatchNorm lies before the departure: the network's, updated once
    assert torch.equal(own.path_norms["1"]["layer3_0_bn1"].running_mean, shared.network.layer3[0].bn1.running_mean)
    assert torch.equal(own.network.layer2[1].bn1.running_mean, shared.network.layer2[1].bn1.running_mean)
    assert torch.equal(own.network.layer3[0].bn1.running_mean, confident_model().layer3[0].bn1.running_mean)
    own.eval()
    own.threshold.fill_(0.0)  # every sample to path 1
    with torch.no_grad():
        out = own(batch)
        assert torch.allclose(out, own.path(1).eval()(batch), atol=1e-5)  # path(1) carries the path's statistics
    gateify.save(own, tmp_path / "own.safetensors")
    loaded = gateify.load(tmp_path / "own.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch), out)


def test_survivors_train_the_deeper_path_on_what_the_cheap_one_sends_on(batch):
    model = gateify.route(gateify.convert(confident_model()), [CHEAP, DEEP]).train()
    cheap_model, deep_model = (model.path(k).train() for k in range(2))
    y = torch.arange(len(batch)) % 10
    terms = gateify.RouteLoss(model, distill_weight=0.0, self_distill=0.0, survivors=0.25)(batch, y)
    with torch.no_grad():
        cheap, deep = cheap_model(batch), deep_model(batch)
    unsure = cheap.softmax(1).amax(1).argsort()[:6]  # a quarter of 24: the six the cheap path is least sure of
    assert terms.per_path[0] == pytest.approx(float(F.cross_entropy(cheap, y)), rel=1e-4)
    assert terms.per_path[1] == pytest.approx(float(F.cross_entropy(deep[unsure], y[unsure])), rel=1e-4)
    with pytest.raises(gateify.GateConfigError, match="survivors"):
        gateify.RouteLoss(model, survivors=0.0)


def test_fit_distils_a_self_teacher_as_a_cascade_s_cheap_model_would_be(batch):
    """A fair cascade: its cheap model learns from its deep one as a routed model's cheap path learns from its deep
    path (fit's self_teacher, weight TrainConfig.self_distill)."""
    student = gateify.to_static(gateify.convert(confident_model()), keep=CHEAP)
    deeper = gateify.to_static(gateify.convert(confident_model(4)), keep=DEEP).eval()
    teacher = confident_model(3).eval()
    y = torch.arange(len(batch)) % 10
    cfg = gateify.TrainConfig(epochs=1, lr=0.0, weight_decay=0.0, distill_weight=0.5, self_distill=0.7, grad_clip=0.0)
    history = gateify.fit(student, [(batch, y)], cfg, torch.device("cpu"), teacher=teacher, self_teacher=deeper)
    student.train()
    with torch.no_grad():
        logits = student(batch)
        want = (F.cross_entropy(logits, y) + 0.5 * gateify.distill_loss(logits, teacher(batch), 2.0)
                + 0.7 * gateify.distill_loss(logits, deeper(batch), 2.0))
    assert history[0]["task"] == pytest.approx(float(want), rel=1e-5)


def test_a_cascade_of_separate_models_runs_each_on_its_samples_and_pays_for_both(batch, tmp_path):
    """gateify.cascade: the same machinery with a network per level: nothing shared, every level from the input."""
    cheap_model = gateify.set_static(gateify.convert(confident_model(0)), CHEAP)
    deep_model = gateify.set_static(gateify.convert(confident_model(1)), DEEP)
    both = gateify.cascade([cheap_model, deep_model]).eval()
    assert both.is_cascade and set(both.state_dict()) == ({f"networks.{k}.{n}" for k in (0, 1)
                                                           for n in confident_model().state_dict()} | {"threshold_bits"})
    gateify.calibrate(both, batch, target=0.6, max_error=1.0)
    with torch.no_grad():
        out, level = both.forward_routes(batch)
        cheap = gateify.to_static(cheap_model).eval()(batch)
        deep = gateify.to_static(deep_model).eval()(batch)
    assert 0 < int(level.sum()) < len(batch)
    assert torch.equal(level == 1, 1 - cheap.softmax(1).amax(1) >= both.threshold[0])
    assert torch.allclose(out[level == 0], cheap[level == 0], atol=1e-5)
    assert torch.allclose(out[level == 1], deep[level == 1], atol=1e-5)
    report = gateify.flops(both, batch)
    cost = [gateify.flops(gateify.to_static(m), batch[:1]).executed_flops for m in (cheap_model, deep_model)]
    assert report.executed_flops == pytest.approx(cost[0] + report.level_shares[1] * cost[1], rel=1e-6)
    gateify.save(both, tmp_path / "cascade.safetensors")
    loaded = gateify.load(tmp_path / "cascade.safetensors").eval()
    assert loaded.is_cascade
    with torch.no_grad():
        assert torch.equal(loaded(batch), out)
        program = torch.export.export(both, (batch,))
        assert torch.allclose(program.module()(batch), out, atol=1e-5)
    with pytest.raises(gateify.GateConfigError, match="static"):
        gateify.cascade([gateify.convert(confident_model()), deep_model])


def test_route_keeps_every_modules_own_train_flag():
    """A deliberately frozen BatchNorm inside a model in train() stays frozen once routed (and with path norms)."""
    model = gateify.convert(confident_model()).train()
    model.bn1.eval()
    for path_norms in (False, True):
        routed = gateify.route(model, [CHEAP, DEEP], path_norms=path_norms)
        assert routed.training and routed.network.layer1[1].bn1.training and not routed.network.bn1.training

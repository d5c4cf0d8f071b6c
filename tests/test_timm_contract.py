"""gateify's CIFAR ResNets are timm citizens, and a converted timm model keeps its source's timm interface (issue 23).

The first part checks, on every model ``import gateify`` registers (``timm.list_models(module="cifar_resnet")``),
the conventions timm's own ``tests/test_models.py`` checks on its models: default cfgs and head shapes,
``reset_classifier``, ``forward_intermediates`` / ``prune_intermediate_layers`` / every ``features_only`` class,
grad checkpointing, TorchScript and FX + TorchScript. The assertions are written for gateify (timm's test file is
not copied here); ``scripts/timm_model_tests.py`` runs timm's real file on these models. The second part checks
converted models (a timm ResNet-18 at 64x64, ResNet-20) with hard gates that skip part of the batch, and in dense
mode.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import nullcontext

import pytest
import timm
import torch
from timm.models import FeatureGraphNet, get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import gateify

from conftest import perturb_batchnorm, split_decisions

CIFAR = timm.list_models(module="cifar_resnet")
FEATURE_CLASSES = ("list", "dict", "hook", "fx", "getter")

pytestmark = [  # torch's own notices about TorchScript, which these tests use on purpose
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level annotations"),
]


def create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def batch(n: int = 1, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_fx_model(model: nn.Module) -> nn.Module:
    """What timm's tests trace: torchvision's feature extractor with timm's notrace modules and functions as leaves,
    returning the last node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def test_the_five_cifar_resnets_are_checked():
    assert CIFAR == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


# --- default cfgs and the classifier head (defects 1, 2, 7) --------------------------------------------------------

@pytest.mark.parametrize("name", CIFAR)
def test_model_default_cfgs(name):
    """timm's test_model_default_cfgs: on the meta device, as timm runs it, feature and head shapes follow the cfg."""
    device = "meta"
    with torch.device(device):
        model = timm.create_model(name, device=device, dtype=torch.float32).eval()
    cfg = model.pretrained_cfg
    assert model.in_chans == cfg["input_size"][0] and model.num_classes == cfg["num_classes"]
    with pytest.raises(TypeError):  # unknown constructor arguments raise, not silently ignored
        timm.create_model(name, device=device, not_a_model_arg=1)
    assert len(set(timm.models.group_parameters(model, model.group_matcher(coarse=False), reverse=True).values())) > 1
    x = torch.randn(1, *cfg["input_size"], device=device)

    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1:] == (model.num_features, *cfg["pool_size"])
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)

    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre_logits.shape
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape
    model = timm.create_model(name, num_classes=0, device=device).eval()
    assert model(x).shape == pre_logits.shape
    model = timm.create_model(name, num_classes=0, global_pool="", device=device).eval()
    assert model(x).shape == features.shape

    state_dict = create(name).state_dict()
    assert f"{cfg['classifier']}.weight" in state_dict and f"{cfg['first_conv']}.weight" in state_dict
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device]
    assert not misplaced, f"created off the requested device: {misplaced[:3]}"


@pytest.mark.parametrize("name", CIFAR)
def test_reset_classifier_without_pool_returns_the_feature_map(name):
    model = create(name).eval()
    x = batch()
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)  # (1, 64, 8, 8), not pooled
    assert features.shape == (1, 64, 8, 8)


@pytest.mark.parametrize("name", CIFAR[:1])
def test_reset_classifier_keeps_the_pool_by_default(name):
    """timm's test_reset_classifier_keeps_pool."""
    model = create(name, global_pool="max").eval()
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    x = batch(2, 64)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(5)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)
        assert model(x).shape == (2, 5)
        model.reset_classifier(5, "avg")
        assert not torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), expected)


@pytest.mark.parametrize("name", CIFAR)
def test_reset_classifier_follows_the_models_dtype_device_and_mode(name):
    model = create(name).double()
    model.reset_classifier(5)
    assert model(batch().double()).dtype == torch.float64
    model.to(device="meta").eval()  # timm's check: a new head on the model's device and dtype, in its mode
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert {(p.device.type, p.dtype) for p in model.get_classifier().parameters()} == {("meta", torch.float64)}
    assert not any(m.training for m in model.modules())
    frozen = create(name).requires_grad_(False)
    frozen.reset_classifier(0)
    frozen.reset_classifier(0, "")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", CIFAR[:1])
@pytest.mark.parametrize("pool,width", [("avg", 64), ("catavgmax", 128)])
def test_head_hidden_size_follows_the_pool(name, pool, width):
    """timm's test_head_hidden_size: the pre-logits width, after reset_classifier and after pruning."""
    model = create(name, num_classes=0).eval()
    x = batch(2, 64)
    with torch.no_grad():
        model.reset_classifier(7, pool)
        assert model.head_hidden_size == width
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, width)
        assert model(x).shape == (2, 7)
        model.prune_intermediate_layers([2], prune_norm=True)  # up to layer2: the head shrinks to its 32 channels
        model.reset_classifier(7, "avg")
        assert model.head_hidden_size == model.feature_info[2]["num_chs"] == 32
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)


# --- TorchScript, FX + TorchScript (defects 3, 6, 7) ---------------------------------------------------------------

@pytest.mark.parametrize("name", [CIFAR[0], CIFAR[-1]])
def test_model_forward_torchscript(name):
    with timm.set_scriptable(True):
        model = create(name).eval()
    scripted = torch.jit.script(model)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", CIFAR)
def test_model_forward_fx_torchscript(name):
    """timm's test_model_forward_fx_torchscript, and the plain torch.fx.symbolic_trace a user would write."""
    with timm.set_scriptable(True):
        model = create(name).eval()
    x = batch()
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(x), expected)
        (out,) = torch.jit.script(timm_fx_model(model))(x).values()
    torch.testing.assert_close(out, expected)


def test_features_only_fx_with_feature_cfg_scripts():
    """timm's test_model_forward_torchscript_with_features_fx: feature_cfg passed by the caller, then scripted."""
    with timm.set_scriptable(True):
        model = create("resnet20", features_only=True, feature_cfg={"feature_cls": "fx"}).eval()
    assert isinstance(model, FeatureGraphNet)
    x = batch()
    with torch.inference_mode():
        expected = model(x)
        got = torch.jit.script(model)(x)
    assert isinstance(got, list) and len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_to_dense_of_a_converted_model_scripts(resnet20):
    dense = gateify.to_dense(gateify.convert(resnet20)).eval()
    x = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(dense)(x), resnet20(x))


class PEP563Block(nn.Module):
    """A user's residual block in a file with ``from __future__ import annotations`` (as this one is)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


def test_to_dense_of_a_model_with_string_annotations_scripts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PEP563Block(8), PEP563Block(8)).eval()
    x = batch(2, 16)
    dense = gateify.to_dense(gateify.convert(model, example_input=x))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(dense)(x), model(x))


# --- features: forward_intermediates, prune_intermediate_layers, every features_only class (defects 4, 6) ----------

@pytest.mark.parametrize("name", CIFAR)
def test_model_forward_intermediates(name):
    """timm's test_model_forward_intermediates: one tap per feature_info entry, final features == forward_features."""
    model = create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = batch()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == info.channels() == [16, 16, 32, 64]
        assert [32 // t.shape[-1] for t in intermediates] == info.reduction() == [1, 1, 2, 4]
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[2:]))
    assert torch.equal(early[0], intermediates[1])


@pytest.mark.parametrize("name", CIFAR[:2])
@pytest.mark.parametrize("feature_cls", FEATURE_CLASSES)
def test_features_only_with_every_feature_cls(name, feature_cls):
    model = create(name).eval()
    x = batch()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        features = create(name, features_only=True, feature_cls=feature_cls).eval()
        got = features(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert features.feature_info.channels() == [16, 16, 32, 64]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", CIFAR[:1])
def test_prune_intermediate_layers(name):
    """timm's test_prune_intermediate_layers_contract: pruned and stop_early taps equal the full model's, the pruned
    model still trains with every parameter used, and prune_head=False at the last index changes nothing."""
    model = create(name, drop_rate=0.5).eval()
    x = batch(2)
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected, taps = model(x), model.forward_intermediates(x, intermediates_only=True)
        unpruned_head = copy.deepcopy(model)
        unpruned_head.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(unpruned_head(x), expected)
    for i in range(last + 1):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i])
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       taps[i])
            if i < last:  # the features end at the tap
                torch.testing.assert_close(pruned.forward_features(x), taps[i])
                assert pruned(x).shape == taps[i].shape  # no pool, no classifier
        pruned.train()
        sum(f.sum() for f in pruned.forward_intermediates(x, indices=take, intermediates_only=True)).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None], f"unused parameters after prune {i}"


# --- grad checkpointing (defect 5) -------------------------------------------------------------------------------

def outputs_and_grads(model: nn.Module, x: torch.Tensor, run) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # drop_path / gumbel noise: the same draws with and without checkpointing
    outs = run(model, x)
    sum(o.pow(2).mean() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grad_checkpointing_changes_nothing(model: nn.Module, x: torch.Tensor, run) -> None:
    """timm's test_model_forward / test_features_only_grad_checkpointing_backward: equal outputs and gradients."""
    model.set_grad_checkpointing(False)
    outs, grads = outputs_and_grads(model, x, run)
    model.set_grad_checkpointing(True)
    outs_ckpt, grads_ckpt = outputs_and_grads(model, x, run)
    model.set_grad_checkpointing(False)
    assert grads and grads.keys() == grads_ckpt.keys()
    for a, b in zip(outs, outs_ckpt):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


RUNS = {
    "forward": lambda model, x: [model(x)],
    "forward_intermediates": lambda model, x: model.forward_intermediates(x, intermediates_only=True),
}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", CIFAR[:2])
def test_grad_checkpointing_same_outputs_and_gradients(name, run):
    model = create(name, drop_path_rate=0.1).train()  # with stochastic depth: recompute must draw the same masks
    assert_grad_checkpointing_changes_nothing(model, batch(2), RUNS[run])


def test_features_only_grad_checkpointing_backward():
    features = create("resnet20", features_only=True).train()
    assert_grad_checkpointing_changes_nothing(features, batch(2), lambda model, x: model(x))


def test_grad_checkpointing_after_pruning():
    """timm's test_resnet_pruned_grad_checkpointing: emptied stages are iterable by checkpoint_seq."""
    model = create("resnet20").train()
    take = model.prune_intermediate_layers((0, 1, 2))
    model.set_grad_checkpointing()
    final, intermediates = model.forward_intermediates(batch(2), indices=take)
    assert len(intermediates) == 3
    (final.sum() + model.forward_features(batch(2)).sum()).backward()


# --- converted models keep the source's timm interface ------------------------------------------------------------

CONVERTED = {"resnet20": 32, "resnet18": 64}  # gateify's CIFAR net, and a timm ResNet at 64x64


@pytest.fixture(scope="module", params=list(CONVERTED))
def converted(request):
    """(source, converted) with hard gates placed so that every block keeps part of a batch of 4 and skips the rest."""
    name = request.param
    torch.manual_seed(0)
    source = perturb_batchnorm(timm.create_model(name)).eval()
    x = batch(4, CONVERTED[name])
    gated = split_decisions(gateify.convert(source), x).eval()
    return source, gated, x


def gate_modes(model: nn.Module, mode: str):
    return gateify.gate_mode(model, mode) if mode != "hard" else nullcontext()


def test_converted_keeps_pretrained_cfg(converted):
    source, gated, _ = converted
    assert gated.pretrained_cfg == source.pretrained_cfg and gated.default_cfg == source.default_cfg
    assert timm.data.resolve_data_config(model=gated) == timm.data.resolve_data_config(model=source)


@pytest.mark.parametrize("mode", ["hard", "dense"])
def test_converted_forward_intermediates(converted, mode):
    source, gated, x = converted
    with torch.no_grad(), gate_modes(gated, mode):
        final, intermediates = gated.forward_intermediates(x)
        torch.testing.assert_close(final, gated.forward_features(x), rtol=0, atol=0)
        if mode == "dense":  # every gate open: the source model's intermediates
            ref_final, ref_intermediates = source.forward_intermediates(x)
            torch.testing.assert_close(final, ref_final)
            for a, b in zip(intermediates, ref_intermediates):
                torch.testing.assert_close(a, b)
        getter = FeatureGetterNet(copy.deepcopy(gated), out_indices=(1, 2))  # prunes its copy: timm's 'getter'
        for a, b in zip(getter(x), intermediates[1:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if mode == "hard":  # the hard gates did skip: otherwise this would only test the dense model again
        with torch.no_grad():
            assert not torch.allclose(final, source.forward_features(x))


@pytest.mark.parametrize("mode", ["hard", "dense"])
@pytest.mark.parametrize("run", RUNS)
def test_converted_grad_checkpointing(converted, mode, run):
    _, gated, x = converted
    with gate_modes(gated, mode):
        assert_grad_checkpointing_changes_nothing(gated, x, RUNS[run])


def test_converted_grad_checkpointing_while_training_the_gates(resnet20, cifar_batch):
    """Gumbel-mode training with the gate regulariser: checkpointing recomputes the same noise and decisions."""
    gated = gateify.convert(resnet20)
    report = gateify.flops(gated, cifar_batch[:4])
    gated.train()
    y = torch.arange(4) % 10

    def run(model, x):
        loss = gateify.GateRegularizer(model, report, "balanced")(nn.functional.cross_entropy(model(x), y)).total
        return [loss]

    assert_grad_checkpointing_changes_nothing(gated, cifar_batch[:4], run)


def test_converted_reset_classifier(converted):
    source, gated, x = converted
    gated = copy.deepcopy(gated)
    gates_before = list(gateify.gates(gated))
    with torch.no_grad(), gateify.gate_mode(gated, "dense"):
        pooled = gated.forward_head(gated.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, source.forward_head(source.forward_features(x), pre_logits=True))
        gated.reset_classifier(5)
        assert gated(x).shape == (4, 5)
        gated.reset_classifier(0)
        torch.testing.assert_close(gated(x), pooled)
        gated.reset_classifier(0, "")
        assert gated(x).shape == source.forward_features(x).shape
    assert list(gateify.gates(gated)) == gates_before


# --- refusals that say what to do instead (defects 8, 9) ----------------------------------------------------------

def test_torchscript_of_a_converted_model_is_refused(converted):
    _, gated, x = converted
    with pytest.raises(gateify.GateifyError, match=r"TorchScript is not supported.*torch\.export"):
        torch.jit.script(gated)
    with pytest.raises(gateify.GateifyError, match="torch.export"):  # a gated backbone extracted with FX, too
        torch.jit.script(FeatureGraphNet(gated, out_indices=(1, 2)))
    with torch.no_grad():
        gated(x)  # refusing changed nothing


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_converting_a_feature_graph_net_says_convert_first(name):
    backbone = timm.create_model(name, features_only=True, feature_cls="fx")
    with pytest.raises(gateify.NoResidualBlocksError) as info:
        gateify.convert(backbone)
    message = str(info.value)
    assert "FeatureGraphNet" in message and "Convert first, then extract features" in message
    assert "VGG" not in message
    # what the message says to do works
    gated = gateify.convert(timm.create_model(name)).eval()
    size = 32 if name == "resnet20" else 64
    with torch.no_grad():
        features = FeatureGraphNet(gated, out_indices=(1, 2))(batch(2, size))
    assert len(features) == 2

"""gateify.convert: finds every residual block of timm/torchvision ResNets, keeps names, matches in dense mode."""

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import gateify
from gateify import (
    AlreadyConvertedError,
    GateifyError,
    InputShapeError,
    MetaDeviceError,
    NoResidualBlocksError,
    NotConvertedError,
    UntraceableModelError,
)

from conftest import perturb_batchnorm

# one model per family (timm, then torchvision), with the number of residual blocks it has
FAMILIES = {
    "resnet20": 9, "resnet18": 8, "resnet50": 16, "resnext26ts": 8, "wide_resnet50_2": 16, "seresnet18": 8,
    "seresnext26d_32x4d": 8, "ecaresnet26t": 8, "resnetblur18": 8, "resnetaa34d": 16, "resnetrs50": 16,
    "resnetv2_18": 8, "skresnet18": 8, "resnest14d": 4, "res2net50_14w_8s": 16,
    "tv:resnet18": 8, "tv:resnext50_32x4d": 16, "tv:wide_resnet50_2": 16,
}


def create(name: str, **kwargs) -> nn.Module:
    if name.startswith("tv:"):
        return getattr(torchvision.models, name[3:])(**kwargs)
    return timm.create_model(name, **kwargs)


def example(name: str) -> torch.Tensor:
    size = 32 if name == "resnet20" else 64  # small inputs keep the suite fast; every model takes 64x64
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,blocks", FAMILIES.items())
def test_family_converts_and_matches_in_dense_mode(name, blocks):
    torch.manual_seed(0)
    model = perturb_batchnorm(create(name)).eval()
    x = example(name)
    gated = gateify.convert(model, example_input=x)
    assert len(gateify.gates(gated)) == blocks
    gateify.set_mode(gated, "dense")
    with torch.no_grad():
        expected = model(x)
        assert (gated(x) - expected).abs().max().item() <= 1e-5
        gateify.set_mode(gated, "hard", threshold=0.0)  # real-skip code path, everyone kept
        assert (gated(x) - expected).abs().max().item() <= 1e-5


def test_names_kept_so_dense_checkpoints_load(resnet20):
    gated = gateify.convert(timm.create_model("resnet20"))  # different random init
    missing, unexpected = gated.load_state_dict(resnet20.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".gate." in k for k in missing)
    assert set(resnet20.state_dict()) <= set(gated.state_dict())
    gateify.set_mode(gated.eval(), "dense")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(x), resnet20(x))


def test_top_level_class_and_timm_interface_kept(resnet20):
    gated = gateify.convert(resnet20)
    assert type(gated) is type(resnet20)
    assert gated.pretrained_cfg == resnet20.pretrained_cfg
    x = torch.randn(2, 3, 32, 32)
    gateify.set_mode(gated, "dense")
    with torch.no_grad():
        assert torch.equal(gated.forward_head(gated.forward_features(x)), resnet20(x))


def test_original_model_untouched(resnet20):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    modules = list(resnet20.modules())
    gateify.convert(resnet20)
    assert list(resnet20.modules()) == modules and not gateify.gates(resnet20)
    assert all(torch.equal(before[k], v) for k, v in resnet20.state_dict().items())


def test_gates_in_execution_order(resnet20):
    names = list(gateify.gates(gateify.convert(resnet20)))
    assert names == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def test_train_mode_identical_with_drop_path_and_batchnorm():
    torch.manual_seed(0)
    model = perturb_batchnorm(timm.create_model("resnet18", drop_path_rate=0.3))
    gated = gateify.convert(model, example_input=torch.randn(2, 3, 64, 64))
    gateify.set_mode(gated, "dense")
    model.train(), gated.train()
    x = torch.randn(8, 3, 64, 64)
    outs = []
    for m in (model, gated):
        torch.manual_seed(123)
        outs.append(m(x))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5  # the converted model drops the same paths...
    for name, bn in model.named_modules():  # ...and updates BatchNorm statistics the same way
        if isinstance(bn, nn.BatchNorm2d):
            assert torch.allclose(bn.running_mean, gated.get_submodule(name).running_mean, atol=1e-6)
    torch.manual_seed(321)
    assert not torch.allclose(outs[0], model(x))  # drop-path really is active in train mode


def test_skipped_block_yields_activation_of_shortcut(resnet20):
    gated = gateify.set_mode(gateify.convert(resnet20), "hard", threshold=1.5)  # > 1: skip everything
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h = resnet20.act1(resnet20.bn1(resnet20.conv1(x)))
        for layer in (resnet20.layer1, resnet20.layer2, resnet20.layer3):
            for block in layer:
                shortcut = block.downsample(h) if block.downsample is not None else h
                h = block.act2(shortcut.clone())
        assert torch.equal(gated(x), resnet20.forward_head(h))


def test_config_keywords_reach_every_gate(resnet20):
    gated = gateify.convert(resnet20, hidden=8, tau=0.5, threshold=0.3)
    for gate in gateify.gates(gated).values():
        assert gate.controller.fc1.out_features == 8 and gate.tau == 0.5
        assert float(gate.threshold) == pytest.approx(0.3)
    with pytest.raises(GateifyError, match="gate kind"):
        gateify.convert(resnet20, gate="sometimes")


# ---------------------------------------------------------------- refusals: clear, and nothing half-changed


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)) + 1.0)


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # fx cannot trace control flow on values


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.odd = DataDependent()

    def forward(self, x):
        return x + self.odd(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()

    def forward(self, x):
        return self.block(self.stem(x))


def test_no_residual_additions_refused():
    with pytest.raises(NoResidualBlocksError, match="no residual addition"):
        gateify.convert(Plain(), example_input=torch.randn(2, 3, 16, 16))


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return x + y if y.mean() > 0 else y  # the block's own forward branches on values


class OddNet(Net):
    def __init__(self):
        super().__init__()
        self.block = OddBlock()


def test_untraceable_submodule_becomes_a_leaf_with_a_warning():
    net = Net()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(gateify.GateifyWarning) as record:
        gated = gateify.convert(net, example_input=x)
    message = str(record[0].message)
    assert "'block.odd'" in message and "DataDependent" in message and "leaf_modules" in message
    assert list(gateify.gates(gated)) == ["block"]  # the block is gated, its untraceable part called whole
    gateify.set_mode(gated, "dense")
    with torch.no_grad():
        assert torch.equal(gated(x), net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming it a leaf is the documented way to silence the warning
        gateify.convert(net, example_input=x, leaf_modules=[DataDependent])


def test_untraceable_block_refused_with_leaf_remedy_and_nothing_changed():
    net = OddNet()
    modules = list(net.modules())
    with pytest.raises(UntraceableModelError) as info:
        gateify.convert(net, example_input=torch.randn(2, 3, 8, 8), inplace=True)
    message = str(info.value)
    assert "'block'" in message and "OddBlock" in message and "leaf_modules" in message
    assert list(net.modules()) == modules and not gateify.gates(net)


def test_converting_twice_refused(resnet20):
    gated = gateify.convert(resnet20)
    with pytest.raises(AlreadyConvertedError, match="already converted"):
        gateify.convert(gated)


def test_meta_device_refused():
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    with pytest.raises(MetaDeviceError, match="to_empty"):
        gateify.convert(model)


def test_wrong_example_input_names_the_fix(resnet20):
    with pytest.raises(InputShapeError, match="example_input"):
        gateify.convert(resnet20, example_input=torch.randn(2, 5, 32, 32))


def test_set_mode_refusals(resnet20):
    with pytest.raises(NotConvertedError, match="convert"):
        gateify.set_mode(resnet20, "hard")
    gated = gateify.convert(resnet20)
    with pytest.raises(GateifyError, match="mode"):
        gateify.set_mode(gated, "sometimes")
    with pytest.raises(GateifyError, match="unknown blocks"):
        gateify.set_mode(gated, "hard", threshold={"layer1.0": 0.2, "nope": 0.1})
    with pytest.raises(GateifyError, match=">= 0"):
        gateify.set_mode(gated, "hard", threshold={"layer1.0": 0.2, "layer1.1": -1.0})
    assert all(g.mode == "auto" and float(g.threshold) == 0.5 for g in gateify.gates(gated).values())
    gateify.set_mode(gated, "hard", threshold={"layer1.0": 0.2})
    assert float(gateify.gates(gated)["layer1.0"].threshold) == pytest.approx(0.2)
    assert float(gateify.gates(gated)["layer1.1"].threshold) == 0.5


def test_deepcopy_and_module_replacement_stay_consistent(resnet20):
    gated = gateify.set_mode(gateify.convert(resnet20), "dense")
    clone = copy.deepcopy(gated)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clone(x), gated(x))
        # the branch fetches modules from the block at every call: replacing one (as SyncBatchNorm conversion or
        # BatchNorm freezing do) takes effect in the gated computation
        clone.layer1[0].bn1 = nn.Identity()
        assert not torch.equal(clone(x), gated(x))


def test_own_train_eval_flags_of_submodules_are_kept(resnet20):
    resnet20.train()
    frozen = [m for m in resnet20.modules() if isinstance(m, nn.BatchNorm2d)][:5]
    for m in frozen:
        m.eval()  # deliberately frozen BatchNorm, as in fine-tuning recipes
    flags = {name: m.training for name, m in resnet20.named_modules()}
    gated = gateify.convert(resnet20, inplace=True)
    kept = dict(gated.named_modules())  # modules traced through (option-A shortcuts) no longer exist as modules
    assert {name: kept[name].training for name in flags if name in kept} == {
        name: flag for name, flag in flags.items() if name in kept}
    assert sum(not m.training for m in gated.modules() if isinstance(m, nn.BatchNorm2d)) == 5


def test_identity_shortcut_never_overwrites_the_block_input():
    """An nn.Identity shortcut returns the block input itself: skipping must not write into it (a caller that
    kept the input, e.g. a feature hook, would see it change)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    gated = gateify.convert(timm.create_model("resnext26ts"), example_input=x).eval()
    identity = [name for name, g in gateify.gates(gated).items() if not g.owns_shortcut]
    assert identity
    seen = {}
    block = gated.get_submodule(identity[0])
    def keep_input(module, args):
        seen.setdefault("input", (args[0], args[0].clone()))

    block.register_forward_pre_hook(keep_input)
    for threshold in (1.5, 0.0):  # everyone skipped, everyone kept
        gateify.set_mode(gated, "hard", threshold=threshold)
        seen.clear()
        with torch.no_grad():
            gated(x)
        kept_ref, copy_before = seen["input"]
        assert torch.equal(kept_ref, copy_before)


# ---------------------------------------------------------------- residual blocks the forward pass hides


class Residual(nn.Module):
    """relu(x + conv(x)): an 8-channel 3x3 convolution, 8*8*9 MACs per output pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class Outer(nn.Module):
    """A residual block whose branch holds another residual block."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.inner = Residual()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(x + self.conv2(self.inner(self.conv1(x))))


class NestedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1, self.b2 = Outer(), Residual()
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_nested_residual_is_skipped_with_its_outer_block():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    net = NestedNet().eval()
    with pytest.warns(gateify.GateifyWarning, match="'b1.inner' is a residual block inside the branch of 'b1'"):
        gated = gateify.convert(net, example_input=x[:2]).eval()
    assert list(gateify.gates(gated)) == ["b1", "b2"]  # one gate per block that can actually be skipped
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), net(x))
    gateify.set_mode(gated, "hard", threshold={"b1": 1.5, "b2": 0.0})  # b1 (and with it b1.inner) skipped
    report = gateify.flops(gated, x)
    conv = 8 * 8 * 9 * 8 * 8  # MACs of one 8-channel 3x3 convolution on 8x8
    assert [(b.name, b.keep_rate, b.branch_flops / 2) for b in report.blocks] == [("b1", 0.0, 3 * conv),
                                                                                 ("b2", 1.0, conv)]
    stem, fc = 3 * 8 * 9 * 8 * 8, 8 * 4
    assert report.dense_macs == stem + 4 * conv + fc  # b1's three convolutions, b2's one
    assert report.executed_macs - report.gate_macs == stem + conv + fc
    # static pruning of the outer block
    assert gateify.static_twin(gated, [x]) == {"b1": False, "b2": True}
    with torch.no_grad():
        skipped = gated(x)
        gateify.set_static(gated, {"b1": False})
        assert torch.equal(gated(x), skipped)
        plain = gateify.to_static(gated).eval()
        assert torch.equal(plain(x), skipped)
        assert torch.equal(skipped, net.fc(net.b2(torch.relu(net.stem(x))).mean((2, 3))))
    assert not any(k.startswith("b1.") for k in plain.state_dict())


class TwiceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1, self.b2 = Residual(), Residual()

    def forward(self, x):
        return self.b2(self.b2(self.b1(self.stem(x)))).mean((2, 3))


def test_a_module_called_from_several_places_is_named_and_left_ungated():
    """CoaT holds one positional encoding (a residual ``x + conv(x)``) per stage and hands it to each block of the
    stage, which calls it under its own name: the gate swapped in under the stage's name was never reached. A
    block called twice under one name would record and count only its last call. Both now run as they were."""
    x = torch.randn(2, 3, 64, 64)
    coat = timm.create_model("coat_lite_tiny", img_size=64).eval()
    with pytest.warns(gateify.GateifyWarning, match=r"'cpe1' is called 2 times per forward, also held as "
                                                    r"'serial_blocks1.0.cpe', 'serial_blocks1.1.cpe'"):
        gated = gateify.convert(coat, example_input=x)
    names = list(gateify.gates(gated))
    assert len(names) == 8 and not any("cpe" in n for n in names)
    assert gated.serial_blocks1[0].cpe.proj is gated.cpe1.proj  # one set of weights, as before
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), coat(x))
        with gateify.record_decisions(gated):
            gateify.set_mode(gated, "hard", threshold=0.0)(x)
            assert all(g.last is not None for g in gateify.gates(gated).values())  # every gate is reached
    with pytest.warns(gateify.GateifyWarning, match=r"'b2' is called 2 times per forward\. "):
        assert list(gateify.gates(gateify.convert(TwiceNet(), example_input=x[:, :, :8, :8]))) == ["b1"]


class TrainOnlyNet(nn.Module):
    """A block that only training runs (an auxiliary path, say): an eval-mode forward never reaches it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = Residual()
        self.extra = nn.Sequential(Residual(), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.b1(self.stem(x))
        if self.training:
            x = self.extra(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("train", [True, False], ids=["converted-in-train", "converted-in-eval"])
def test_block_reached_only_in_training_is_gated(train):
    torch.manual_seed(0)
    net = TrainOnlyNet().train(train)
    x = torch.randn(4, 3, 8, 8)
    gated = gateify.convert(net, example_input=x[:2])
    assert list(gateify.gates(gated)) == ["b1", "extra.0"]
    gateify.set_mode(gated, "dense")
    net.train(), gated.train()
    expected = net(x)
    assert torch.equal(gated(x), expected)
    assert torch.equal(gated.extra[1].running_mean, net.extra[1].running_mean)  # BatchNorm updated alike


def test_to_dense_and_to_static_keep_a_frozen_batchnorm_frozen(resnet20, cifar_batch):
    gated = gateify.convert(resnet20).train()
    gated.layer1[0].bn1.eval()  # deliberately frozen, as in fine-tuning recipes
    for plain in (gateify.to_dense(gated), gateify.to_static(gateify.set_static(gated, {"layer2.0": False}))):
        assert plain.training and plain.layer1[0].training and plain.layer1[0].bn2.training
        assert not plain.layer1[0].bn1.training
        before = plain.layer1[0].bn1.running_mean.clone()
        plain(cifar_batch)  # a training step's forward must not move the frozen statistics
        assert torch.equal(plain.layer1[0].bn1.running_mean, before)
        assert not torch.equal(plain.layer1[0].bn2.running_mean, gated.layer1[0].bn2.running_mean)

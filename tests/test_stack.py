"""A converted model in the tools a timm/torchvision user already has (issue 15): FX feature extraction, EMA,
autocast, to_static and flops() used the way users call them, file permissions, and the training pieces that are
public for one's own loop."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import gateify
import gateify.training
from gateify.cli import main as cli

from conftest import mix_decisions, perturb_batchnorm

STAGES = ("layer1", "layer2", "layer3", "layer4")


def decisions(model: nn.Module) -> torch.Tensor:
    """``(gates, B)`` bool: which samples the last forward pass kept, per block."""
    return torch.stack([g.last.gate.bool() for g in gateify.gates(model).values()])


def eager_stages(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of ``layer1..layer4`` in an ordinary forward pass of the converted model."""
    out, handles = {}, []
    for name in STAGES:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: out.__setitem__(name, o.clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def branch_batch_sizes(model: nn.Module) -> tuple[dict[str, list[int]], list]:
    """Forward pre-hooks on each gated block's first branch convolution: the batch sizes its branch ran on."""
    seen: dict[str, list[int]] = {name: [] for name in gateify.gates(model)}
    handles = [model.get_submodule(f"{name}.conv1").register_forward_pre_hook(
        lambda m, args, name=name: seen[name].append(args[0].shape[0])) for name in seen]
    return seen, handles


# --- 1. feature extraction: FX tracers that do not know gates treat a gate as one call ----------------------------

@pytest.fixture(scope="module", params=["torchvision:resnet18", "resnet50"])
def backbone(request):
    """A hard-gated backbone whose gates split the batch at every block, and that batch."""
    torch.manual_seed(0)
    model = gateify.convert(perturb_batchnorm(gateify.create_model(request.param))).eval()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mix_decisions(model, x)
    gateify.record_decisions(model)  # decisions() reads the eager forward's records
    return gateify.set_mode(model, "hard"), x


def assert_detection_features(model, x, features, names):
    expected = eager_stages(model, x)
    eager_kept = decisions(model)
    seen, handles = branch_batch_sizes(model)
    try:
        with torch.no_grad():
            got = features(x)
    finally:
        for h in handles:
            h.remove()
    got = dict(zip(names, got.values() if isinstance(got, dict) else got))
    assert list(got) == list(STAGES)
    for name in STAGES:
        assert torch.equal(got[name], expected[name]), name  # the same computation, not an approximation
    assert torch.equal(decisions(model), eager_kept)
    # real skipping survives extraction: each branch ran once, on exactly the samples its gate kept
    kept = {name: int(k.sum()) for name, k in zip(gateify.gates(model), eager_kept)}
    assert seen == {name: [n] if n else [] for name, n in kept.items()}  # a block nobody kept never ran
    assert sum(0 < n < x.shape[0] for n in kept.values()) >= len(kept) // 2  # mostly true sub-batches


def test_torchvision_feature_extractor_equals_eager(backbone):
    model, x = backbone
    train_nodes, eval_nodes = get_graph_node_names(model)
    gate_nodes = [n for n in eval_nodes if n.endswith(".gate")]
    assert gate_nodes == [f"{name}.gate" for name in gateify.gates(model)]  # one leaf call per gate
    extractor = create_feature_extractor(model, {name: name for name in STAGES})
    assert_detection_features(model, x, extractor, STAGES)


@pytest.mark.parametrize("backbone", ["resnet50"], indirect=True)
def test_timm_fx_feature_extraction_equals_eager(backbone):
    """timm's FX feature path (what features_only=True, feature_cls="fx" builds) on an already converted model."""
    from timm.models import FeatureGraphNet

    model, x = backbone
    extractor = FeatureGraphNet(model, out_indices=(1, 2, 3, 4))
    assert_detection_features(model, x, extractor, STAGES)


# --- 2. EMA: thresholds are decisions, copied; weights are averaged ------------------------------------------------

def test_model_ema_v3_copies_thresholds_and_modes(resnet20, cifar_batch):
    from timm.utils import ModelEmaV3

    student = gateify.convert(resnet20)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gateify.gates(student).values():  # stand-in for trained controllers
            gate.controller.fc2.weight.copy_(torch.randn(gate.controller.fc2.weight.shape, generator=g))
    names = list(gateify.gates(student))
    gateify.set_mode(student, "hard")
    gateify.gates(student)[names[4]].mode = "static"
    ema = ModelEmaV3(student, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    # the student moves on: calibrated to a threshold, one block switched off, weights changed
    threshold = gateify.calibrate(student, torch.randn(32, 3, 32, 32, generator=g), target=0.7)
    gateify.gates(student)[names[4]].static_keep.fill_(False)
    with torch.no_grad():
        student.fc.weight.add_(1.0)
    ema.update(student)
    ema_gates, student_gates = gateify.gates(ema.module), gateify.gates(student)
    assert list(ema_gates) == names
    for name in names:
        assert float(ema_gates[name].threshold) == float(student_gates[name].threshold) == threshold, name
        assert ema_gates[name].mode == student_gates[name].mode
        assert bool(ema_gates[name].static_keep) == bool(student_gates[name].static_keep)
    assert 0.55 < threshold < 0.95 and not bool(ema_gates[names[4]].static_keep)
    # float parameters are averaged as usual
    expected = torch.lerp(before["fc.weight"], student.fc.weight.detach(), 0.1)
    assert torch.allclose(ema.module.fc.weight, expected, rtol=0, atol=1e-6)
    assert not torch.equal(ema.module.fc.weight, student.fc.weight)


# --- 3. autocast: controllers decide in float32 -----------------------------------------------------------------

def _fp32_controller(controller):
    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            pooled = x.float().mean((2, 3))
            hidden = F.relu(F.linear(pooled, controller.fc1.weight.float(), controller.fc1.bias.float()))
            return F.linear(hidden, controller.fc2.weight.float(), controller.fc2.bias.float()).view(-1)
    return forward


def test_bfloat16_autocast_flips_no_more_decisions_than_fp32_controllers_allow(resnet20):
    # on this batch bfloat16 controllers (gateify 3dcf377) flipped 39 of 576 decisions, float32 controllers 12
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    model = gateify.set_mode(mix_decisions(gateify.convert(resnet20), x).eval(), "hard")
    gateify.record_decisions(model)
    with torch.no_grad():
        model(x)
        fp32 = decisions(model)
        assert (fp32.any(1) & ~fp32.all(1)).all()  # every block splits the batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # the features really are bfloat16
            amp = decisions(model)
            # the reference: the same bfloat16 features, every controller and threshold comparison in float32
            controllers = [g.controller for g in gateify.gates(model).values()]
            for c in controllers:
                c.forward = _fp32_controller(c)
            try:
                model(x)
            finally:
                for c in controllers:
                    del c.forward
            reference = decisions(model)
    flips, allowed = int((amp != fp32).sum()), int((reference != fp32).sum())
    assert flips <= allowed, f"{flips} of {fp32.numel()} decisions flip under autocast; fp32 controllers: {allowed}"


# --- 5. to_static needs a fixed decision per block -------------------------------------------------------------

def test_to_static_refuses_a_model_not_in_static_mode(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    with pytest.raises(gateify.GateifyError, match="static"):
        gateify.to_static(gated)
    assert all(g.mode == "auto" for g in gateify.gates(gated).values())  # nothing changed


def test_to_static_with_keep_bakes_the_selection_in(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    keep = {name: i not in (1, 4, 7) for i, name in enumerate(gateify.gates(gated))}
    plain = gateify.to_static(gated, keep=keep).eval()
    assert not gateify.gates(plain)
    removed = [name for name, k in keep.items() if not k]
    assert not any(key.startswith(f"{name}.conv") for name in removed for key in plain.state_dict())
    reference = gateify.set_static(gated, keep)  # the same selection in static mode
    with torch.no_grad():
        assert torch.equal(plain(cifar_batch), reference(cifar_batch))


# --- 6. flops() counts inference, whatever mode the model was left in ----------------------------------------------

def test_flops_of_a_model_left_in_train_counts_inference(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch)
    gated.train()
    gated.get_submodule("layer1.0.bn1").eval()  # a deliberately frozen BatchNorm
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    report = gateify.flops(gated, cifar_batch)
    assert gated.training and not gated.get_submodule("layer1.0.bn1").training
    assert sum(m.training for m in gated.modules()) == len(list(gated.modules())) - 1
    assert all(g.mode == "auto" for g in gateify.gates(gated).values())
    assert all(torch.equal(v, state[k]) for k, v in gated.state_dict().items())  # no BatchNorm statistics moved
    expected = gateify.flops(gated.eval(), cifar_batch)
    assert report.executed_flops == expected.executed_flops and report.dense_flops == expected.dense_flops
    assert [b.keep_rate for b in report.blocks] == [b.keep_rate for b in expected.blocks]
    assert report.saved > 0.2  # hard gates skip: a soft-mode count would say about 0


# --- 7. files get the mode the umask gives a new file ------------------------------------------------------------

@pytest.fixture(params=[(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def umask(request):
    mask, mode = request.param
    old = os.umask(mask)
    try:
        yield mode
    finally:
        os.umask(old)


def file_mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_follow_the_umask(resnet20, tmp_path, umask, capsys):
    gated = gateify.convert(resnet20)
    gateify.save(gated, tmp_path / "gated.safetensors")
    assert file_mode(tmp_path / "gated.safetensors") == umask
    gateify.save(gated, tmp_path / "gated.safetensors")  # over an existing file: the same
    assert file_mode(tmp_path / "gated.safetensors") == umask
    from gateify.training import Checkpoint, TrainConfig, make_optimizer  # the training checkpoint

    Checkpoint(str(tmp_path / "last.safetensors")).save(gated, make_optimizer(gated, TrainConfig(epochs=1)), 1, {})
    assert file_mode(tmp_path / "last.safetensors") == umask
    assert cli(["convert", "resnet20", "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert file_mode(tmp_path / "cli.safetensors") == umask
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary left behind
    capsys.readouterr()


# --- 9. one's own loop: the training pieces are public ---------------------------------------------------------

def test_training_pieces_for_ones_own_loop_are_public(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    cfg = gateify.TrainConfig(epochs=1, lr=0.02)
    optimizer = gateify.make_optimizer(gated, cfg)
    controllers = {id(p) for g in gateify.gates(gated).values() for p in g.controller.parameters()}
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert cfg.controller_lr_mult == 10.0
    assert all(lrs[i] == pytest.approx(0.2) for i in controllers)  # 10x the learning rate
    assert all(lr == 0.02 for i, lr in lrs.items() if i not in controllers)
    assert len(lrs) == sum(1 for _ in gated.parameters())  # every parameter trained, once
    logits = torch.randn(4, 10)
    assert float(gateify.distill_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(gateify.distill_loss(logits, -logits, 2.0)) > 0
    for name in ("fit", "evaluate", "Checkpoint", "EvalResult"):
        assert getattr(gateify, name) is getattr(gateify.training, name)
    for error in ("GateConfigError", "DatasetError", "TrainingError", "WeightsFileError"):
        assert getattr(gateify, error) is getattr(gateify.errors, error)
        assert issubclass(getattr(gateify, error), gateify.GateifyError)
    assert gateify.data.DatasetError is gateify.DatasetError and gateify.training.TrainingError is gateify.TrainingError


def test_ema_and_copies_of_a_model_that_has_trained(resnet20, cifar_batch):
    """An EMA made after training started (resume, warm-up), a best-model snapshot, to_dense of the student."""
    import copy

    from timm.utils import ModelEmaV3

    student = gateify.convert(resnet20).train()
    F.cross_entropy(student(cifar_batch), torch.zeros(16, dtype=torch.long)).backward()
    ema = ModelEmaV3(student, decay=0.9)
    snapshot = copy.deepcopy(student).eval()
    plain = gateify.to_dense(student).eval()
    with torch.no_grad():
        assert torch.equal(ema.module.eval()(cifar_batch), snapshot(cifar_batch))
        assert torch.equal(plain(cifar_batch), gateify.set_mode(snapshot, "dense")(cifar_batch))

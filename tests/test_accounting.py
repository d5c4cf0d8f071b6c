"""FLOPs counted on the actual run (skipped work is not counted), and calibration to a FLOPs target."""

import pytest
import timm
import torch

import gateify

from conftest import mix_decisions


def test_resnet20_dense_is_40_6_mmacs(resnet20, cifar_batch):
    report = gateify.flops(gateify.convert(resnet20).eval(), cifar_batch)
    assert round(report.dense_macs / 1e6, 1) == 40.6
    assert round(report.dense_flops / 1e6, 1) == 81.1
    assert report.dense_flops == 2 * report.dense_macs
    assert [b.keep_rate for b in report.blocks] == [1.0] * 9  # a fresh conversion keeps everyone
    assert 0 < report.gate_flops < 0.01 * report.dense_flops  # the controllers cost < 1% of the model
    assert report.executed_flops == pytest.approx(report.dense_flops + report.gate_flops)


def test_plain_model_counts_as_dense(resnet20, cifar_batch):
    report = gateify.flops(resnet20, cifar_batch)
    assert report.blocks == [] and report.executed_flops == report.dense_flops and report.saved == 0


def test_executed_flops_drop_with_keep_rate(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    report = gateify.flops(gated, cifar_batch)
    assert any(0 < b.keep_rate < 1 for b in report.blocks)
    for b in report.blocks:  # a branch's cost is per sample, so executed = keep rate x branch
        assert b.executed_flops == pytest.approx(b.keep_rate * b.branch_flops, rel=1e-6)
    skipped = sum((1 - b.keep_rate) * b.branch_flops for b in report.blocks)
    assert report.executed_flops == pytest.approx(report.dense_flops - skipped + report.gate_flops, rel=1e-6)
    assert report.saved == pytest.approx(skipped / report.dense_flops - report.gate_flops / report.dense_flops)


def test_counts_over_a_loader_weight_every_sample(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    loader = [(cifar_batch[:10], torch.zeros(10)), (cifar_batch[10:], torch.zeros(6))]
    whole, parts = gateify.flops(gated, cifar_batch), gateify.flops(gated, loader)
    assert parts.samples == 16
    assert parts.executed_flops == pytest.approx(whole.executed_flops, rel=1e-6)
    assert gateify.flops(gated, loader, max_batches=1).samples == 10


def test_table_states_units(resnet20, cifar_batch):
    table = gateify.flops(gateify.convert(resnet20).eval(), cifar_batch).table()
    assert "MACs" in table and "FLOPs" in table and "layer3.2" in table and "40.551 MMACs" in table


def test_resnet50_dense_macs():
    gated = gateify.convert(timm.create_model("resnet50")).eval()
    report = gateify.flops(gated, torch.randn(1, 3, 224, 224))
    assert round(report.dense_macs / 1e9, 2) == 4.09 and len(report.blocks) == 16


@pytest.mark.parametrize("target", [0.5, 0.7, 0.85])
def test_calibrate_hits_target_on_fixed_batch(resnet20, target):
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gated = gateify.convert(resnet20)
    with torch.no_grad():  # smooth, input-dependent controllers (a trained model's are like this)
        for gate in gateify.gates(gated).values():
            gate.controller.fc2.weight.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    threshold = gateify.calibrate(gated, x, target=target)
    report = gateify.flops(gated.eval(), x)
    assert abs(report.executed_fraction - target) <= 0.02
    assert all(float(g.threshold) == threshold for g in gateify.gates(gated).values())
    # saved with the weights, as the float32's bits
    assert gated.state_dict()["layer1.0.gate.threshold_bits"].view(torch.float32) == threshold


def test_calibrate_refuses_unreachable_target(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    gateify.set_mode(gated, "auto", threshold={"layer2.0": 0.3})
    with pytest.raises(gateify.GateifyError, match="out of reach"):
        gateify.calibrate(gated, cifar_batch, target=0.01)
    # a refusal leaves the thresholds as they were
    assert [float(g.threshold) for g in gateify.gates(gated).values()] == pytest.approx([0.5] * 3 + [0.3] + [0.5] * 5)
    with pytest.raises(gateify.GateifyError, match="convert"):
        gateify.calibrate(resnet20, cifar_batch)


def test_counting_in_train_mode_leaves_batchnorm_statistics_alone(resnet20, cifar_batch):
    gated = gateify.convert(resnet20).train()
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    gateify.flops(gated, cifar_batch)
    assert all(torch.equal(before[k], v) for k, v in gated.state_dict().items())


def test_calibrate_refuses_cir_gates_that_run_every_branch(resnet20, cifar_batch):
    gated = gateify.convert(resnet20, gate="cir")
    with pytest.raises(gateify.GateifyError, match="CIR") as info:
        gateify.calibrate(gated, cifar_batch, target=0.7)
    assert isinstance(info.value, gateify.GateConfigError)
    assert all(float(g.threshold) == 0.5 for g in gateify.gates(gated).values())  # nothing half-set
    # why: whatever the threshold, a CIR gate computed F(x) for every sample before deciding
    gateify.set_mode(gated, "hard", threshold=1.5)
    report = gateify.flops(gated, cifar_batch)
    assert [b.keep_rate for b in report.blocks] == [0.0] * 9
    assert report.executed_flops == report.dense_flops + report.gate_flops


def test_calibrate_says_when_one_threshold_cannot_reach_the_target(resnet20, cifar_batch):
    """A fresh conversion gives every sample the same keep probability, so a threshold switches whole blocks:
    asked for 0.5 of dense, the nearest reachable fraction is far off, and the caller must hear it."""
    gated = gateify.convert(resnet20)
    with pytest.warns(gateify.GateifyWarning, match="not the target 0.5") as record:
        gateify.calibrate(gated, cifar_batch, target=0.5)
    reached = gateify.flops(gated, cifar_batch).executed_fraction
    assert abs(reached - 0.5) > 0.02
    assert f"reached {reached:.3f} of dense" in str(record[0].message)


def test_a_model_with_its_own_levels_attribute_is_counted_as_a_network():
    """timm's NesT keeps its stages in ``self.levels`` (a Sequential); counting took it for a routed model's number
    of paths and failed with a TypeError."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)

        def forward(self, x):
            return x + self.conv(x)

    class Levels(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.levels = nn.Sequential(Residual(), Residual())

        def forward(self, x):
            return self.levels(self.stem(x)).mean((2, 3))

    x = torch.randn(2, 3, 8, 8)
    gated = gateify.convert(Levels().eval(), example_input=x)
    report = gateify.flops(gated, x)
    conv = 8 * 8 * 9 * 8 * 8
    assert report.dense_macs == 3 * 8 * 9 * 8 * 8 + 2 * conv
    assert [b.name for b in report.blocks] == ["levels.0", "levels.1"] and report.level_shares is None

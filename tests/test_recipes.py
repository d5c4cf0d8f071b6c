"""Recipes of issue 21 that live outside the regulariser: BatchNorm recalibration on the gated decisions, and the
example's flags that carry the recipes to the loss."""

import json
import sys
from pathlib import Path

import pytest
import torch

import gateify
from gateify.training import recalibrate_batchnorm

from conftest import split_decisions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune_cifar  # noqa: E402


def test_recalibration_gives_each_branch_the_statistics_of_the_samples_it_runs(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    split_decisions(gated, cifar_batch)  # every block keeps some samples and skips the others (hard mode)
    found = gateify.gates(gated)
    gateify.set_mode(gated, "auto")
    found["layer3.0"].threshold.fill_(2.0)  # this block now skips every sample
    gated.train()
    seen = {}

    def remember(module, inputs, output, name):  # the last input each BatchNorm saw (the training-mode pass)
        seen[name] = inputs[0].detach()

    names = ["bn1", "layer2.1.bn1", "layer3.0.bn1"]  # the stem's, a routing branch's, a branch nobody enters
    hooks = [gated.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: remember(m, i, o, n)) for n in names]
    old = gated.get_submodule("layer3.0.bn1").running_mean.clone()
    counts = recalibrate_batchnorm(gated, [(cifar_batch, torch.zeros(16))], torch.device("cpu"))
    for h in hooks:
        h.remove()
    assert seen["bn1"].shape[0] == 16  # the stem runs on every sample
    kept = seen["layer2.1.bn1"].shape[0]
    assert 0 < kept < 16  # the branch's BatchNorm saw only the samples its gate keeps
    for name in ("bn1", "layer2.1.bn1"):
        bn, x = gated.get_submodule(name), seen[name]
        assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
        assert counts[name] == 1 and bn.momentum == 0.1  # one batch seen; the momentum is restored
    assert "layer3.0.bn1" not in seen and counts["layer3.0.bn1"] == 0
    assert torch.equal(gated.get_submodule("layer3.0.bn1").running_mean, old)  # untouched, not reset
    assert gated.training and all(g.mode == "auto" for g in found.values())  # flags and modes restored


def test_recalibration_changes_the_gated_models_eval_output_only_through_batchnorm(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    split_decisions(gated, cifar_batch)
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    recalibrate_batchnorm(gated, [cifar_batch], torch.device("cpu"))
    after = gated.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                           for k in changed)


def test_pinned_gates_keep_or_skip_every_sample_and_stay_untrained(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    split_decisions(gated, cifar_batch)  # every gate keeps some samples and skips others before pinning
    gated.train()
    reshaping = gateify.reshaping_gates(gated, cifar_batch[:2])
    assert reshaping == ["layer2.0", "layer3.0"]  # the stages' first blocks: their shortcut is a padded subsample
    assert gated.training  # the detection pass in eval mode leaves the flags as they were
    pinned = {**{name: True for name in reshaping}, "layer1.2": False}
    gateify.pin_gates(gated, pinned)
    found = gateify.gates(gated)
    gateify.set_mode(gated, "gumbel")
    with gateify.record_decisions(gated):
        gated(cifar_batch).sum().backward()
    for name, gate in found.items():
        params = list(gate.controller.parameters())
        if name in pinned:
            assert bool(gate.last.gate.eq(float(pinned[name])).all())  # sampled decisions: all kept / all skipped
            assert all(not p.requires_grad and p.grad is None for p in params)
        else:
            assert all(p.requires_grad for p in params)
    gateify.set_mode(gated, "hard")
    gated.eval()
    with torch.no_grad(), gateify.record_decisions(gated):
        gated(cifar_batch)
    assert all(bool(found[n].last.gate.eq(float(keep)).all()) for n, keep in pinned.items())
    assert not all(bool(g.last.gate.eq(1).all()) for n, g in found.items() if n not in pinned)
    with pytest.raises(gateify.GateifyError, match="unknown blocks"):
        gateify.pin_gates(gated, {"layer9.0": True})
    with pytest.raises(gateify.GateifyError, match="CIR gates"):
        gateify.pin_gates(gateify.convert(resnet20, gate="cir"), {"layer1.0": True})


@pytest.mark.slow
def test_recipe_flags_reach_the_gated_run(tmp_path):
    """--reg bounds/shaping_weight reach the regulariser (metrics.json records them), --gate-init static starts from
    the static selection, --recal-bn reports the accuracy before and after recalibration, --no-gate-downsampling
    keeps every sample in the downsampling blocks and --static-floor removes its blocks for every sample."""
    out = tmp_path / "gated"
    finetune_cifar.main(["--dataset", "digits", "--dense-epochs", "1", "--epochs", "1", "--workers", "0", "--device",
                         "cpu", "--method", "gated", "--no-plots", "--eval-every", "0", "--out", str(out),
                         "--reg", "bounds=0.3", "--reg", "shaping_weight=0.5", "--reg", "min_keep=0",
                         "--gate-init", "static", "--recal-bn", "--no-gate-downsampling", "--static-floor", "0.75"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["regularizer"]["bounds"] == 0.3 and m["regularizer"]["shaping_weight"] == 0.5
    assert m["regularizer"]["min_keep"] == 0
    assert set(m["gate_init_blocks"]) == set(m["keep_rate_per_block"]) and not all(m["gate_init_blocks"].values())
    assert set(m["before_recal_bn"]) == {"test_acc", "flops_saved"}
    assert m["pinned_gates"] and all(m["keep_rate_per_block"][name] == 1.0 for name in m["pinned_gates"])
    assert m["pinned_closed"] == [n for n, kept in m["static_floor_blocks"].items() if not kept]
    assert m["pinned_closed"] and all(m["keep_rate_per_block"][name] == 0.0 for name in m["pinned_closed"])


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5", "most"])
def test_a_static_floor_outside_0_1_is_refused_before_anything_runs(value, capsys):
    # refused while parsing the flags: no data loaded, no dense phase trained and then thrown away
    with pytest.raises(SystemExit) as refused:
        finetune_cifar.build_parser().parse_args(["--static-floor", value])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--static-floor" in err and "[0, 1)" in err and "e.g. 0.75" in err
    assert finetune_cifar.build_parser().parse_args(["--static-floor", "0"]).static_floor == 0.0

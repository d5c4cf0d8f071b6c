"""The gate: CIR signal, Gumbel training gates, deterministic hard gates that really skip."""

import math

import pytest
import timm
import torch

import gateify
from gateify import cosine_incompatibility

from conftest import mix_decisions, perturb_batchnorm, split_decisions


def test_cir_values():
    x = torch.randn(3, 4, 5, 5)
    orthogonal = torch.zeros(3, 4, 5, 5)
    orthogonal[:, 0], orthogonal[:, 1] = 1.0, 0.0
    base = torch.zeros(3, 4, 5, 5)
    base[:, 1] = 1.0
    assert torch.allclose(cosine_incompatibility(x, 2.5 * x), torch.zeros(3), atol=1e-6)  # a rescale: redundant
    assert torch.allclose(cosine_incompatibility(x, -x), torch.full((3,), 2.0), atol=1e-6)
    assert torch.allclose(cosine_incompatibility(base, orthogonal), torch.ones(3))
    assert torch.equal(cosine_incompatibility(x, torch.zeros_like(x)), torch.ones(3))  # eps-guarded F(x) = 0


def test_zero_init_last_gives_cir_one_everywhere():
    gated = gateify.convert(timm.create_model("resnet18"), example_input=torch.randn(2, 3, 64, 64))
    gateify.set_mode(gated.eval(), "gumbel")
    with torch.no_grad():
        gated(torch.randn(4, 3, 64, 64))
    for gate in gateify.gates(gated).values():
        assert torch.equal(gate.last.cir, torch.ones(4))


@pytest.mark.parametrize("bias", [0.3, -0.7], ids=["kept", "skipped"])
def test_gumbel_gate_passes_the_straight_through_gradient_to_the_controller(bias):
    """Forward: the hard decision 1[z >= 0] multiplies the branch. Backward: the gradient of sigmoid(z / tau), so
    d loss / d z = sigmoid'(z / tau) / tau * <d loss / d g> for a kept and a skipped sample alike (a hard step
    would pass 0). Here z is the controller's output bias b for every sample (its output weights are zero)."""
    torch.manual_seed(0)
    tau = 0.5
    branch = torch.nn.Conv2d(4, 4, 3, padding=1)
    gate = gateify.ResidualGate(branch, 4, [True], gateify.GateConfig(tau=tau, noise=0.0))
    with torch.no_grad():
        gate.controller.fc2.weight.zero_()
        gate.controller.fc2.bias.fill_(bias)
    gate.mode = "gumbel"
    x = torch.randn(3, 4, 5, 5)
    shortcut = torch.randn(3, 4, 5, 5)
    out = gate(shortcut, (x,), ())
    with torch.no_grad():
        f = branch(x)
    assert torch.equal(out, shortcut + f if bias >= 0 else shortcut)
    out.sum().backward()
    s = 1 / (1 + math.exp(-bias / tau))
    expected = s * (1 - s) / tau * float(f.double().sum())  # d loss / d g_i = sum of sample i's branch output
    grad = gate.controller.fc2.bias.grad
    assert grad is not None and float(grad) == pytest.approx(expected, rel=1e-5)


def test_gumbel_without_noise_decides_like_hard(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    gateify.record_decisions(gated)
    with torch.no_grad():
        gateify.set_mode(gated, "hard", threshold=0.4)
        hard = gated(cifar_batch)
        hard_decisions = [g.last.gate.clone() for g in gateify.gates(gated).values()]
        gateify.set_mode(gated, "gumbel", noise=0.0)
        soft = gated(cifar_batch)
        assert all(torch.equal(g.last.gate.bool(), d) for g, d in zip(gateify.gates(gated).values(), hard_decisions))
        assert (soft - hard).abs().max().item() <= 1e-5


def test_hard_mode_is_deterministic(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    with torch.no_grad():
        assert torch.equal(gated(cifar_batch), gated(cifar_batch))


def branch_batch_sizes(gated):
    """Batch size that each block's first branch convolution sees in the next forward."""
    seen, handles = {}, []

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0].shape[0])
        return hook

    for name in gateify.gates(gated):
        handles.append(gated.get_submodule(name).conv1.register_forward_hook(record(name)))
    return seen, handles


def masked_reference(gated, x, decisions):
    """The same decisions applied by masking a full-batch branch: what older dynamic-depth code computes."""
    gates = gateify.gates(gated)
    originals = {}
    for name, gate in gates.items():
        originals[name] = gate.forward
        gate.forward = lambda s, inputs, params, gate=gate, d=decisions[name]: (
            s + d.view(-1, 1, 1, 1).to(s.dtype) * gate.branch(*inputs, *params))
    try:
        return gated(x)
    finally:
        for name, gate in gates.items():
            del gate.forward


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_skipped_samples_never_enter_the_branch(resnet20, batch):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    gated = mix_decisions(gateify.convert(resnet20), x if batch > 1 else torch.randn(16, 3, 32, 32)).eval()
    gateify.record_decisions(gated)
    seen, handles = branch_batch_sizes(gated)
    with torch.no_grad():
        out = gated(x)
    for h in handles:
        h.remove()
    decisions = {name: g.last.gate.clone() for name, g in gateify.gates(gated).items()}
    kept = {name: int(d.sum()) for name, d in decisions.items()}
    assert {name: seen.get(name, 0) for name in kept} == kept  # a skipped sample is never computed
    if batch > 1:
        assert any(0 < k < batch for k in kept.values())  # the test really mixes decisions
    with torch.no_grad():
        assert (out - masked_reference(gated, x, decisions)).abs().max().item() <= 1e-5


def test_real_skip_under_inference_mode_and_channels_last(resnet20, cifar_batch):
    gated = mix_decisions(gateify.convert(resnet20), cifar_batch).eval()
    x = cifar_batch.contiguous(memory_format=torch.channels_last)
    gated = gated.to(memory_format=torch.channels_last)
    gateify.record_decisions(gated)
    with torch.inference_mode():
        out = gated(x)
    decisions = {name: g.last.gate.clone() for name, g in gateify.gates(gated).items()}
    assert any(0 < int(d.sum()) < len(x) for d in decisions.values())
    with torch.no_grad():
        assert (out - masked_reference(gated, x, decisions)).abs().max().item() <= 1e-5


def test_cir_gate_decides_from_cir_and_saves_nothing(resnet20, cifar_batch):
    gated = gateify.convert(resnet20, gate="cir").eval()
    gateify.record_decisions(gated)
    seen, handles = branch_batch_sizes(gated)
    with torch.no_grad():
        gated(cifar_batch)
    for h in handles:
        h.remove()
    assert set(seen.values()) == {len(cifar_batch)}  # F(x) runs for every sample: the decision needs it
    for gate in gateify.gates(gated).values():
        assert torch.equal(gate.last.gate.bool(), gate.last.keep_prob >= gate.threshold)
        assert not hasattr(gate, "controller")  # nothing unused for DDP to wait on


def test_cir_scorer_keeps_branches_that_add_information():
    scorer = gateify.CIRScorer(8, gateify.GateConfig(gate="cir"))
    with torch.no_grad():
        scorer.scale.fill_(4.0)
        scorer.offset.fill_(0.5)
    s = torch.randn(3, 8, 4, 4)
    # a rescaling branch (CIR 0) -> 4 * (0 - 0.5); a reversing one (CIR 2) -> 4 * (2 - 0.5)
    assert torch.allclose(scorer.keep_logit(s, s, 2.5 * s), torch.full((3,), -2.0), atol=1e-5)
    assert torch.allclose(scorer.keep_logit(s, s, -s), torch.full((3,), 6.0), atol=1e-5)


# one model per family whose blocks differ in how the branch and shortcut are built: bottleneck, pre-activation,
# hierarchical (Res2Net), squeeze-excitation with grouped convs, wide, timm's ByobNet, torchvision, CIFAR option A
BATCH_FAMILIES = [("resnet50", 64), ("resnetv2_50", 64), ("res2net50_14w_8s", 64), ("seresnext26d_32x4d", 64),
                  ("wide_resnet50_2", 32), ("resnext26ts", 64), ("torchvision:resnet18", 64),
                  ("torchvision:resnext50_32x4d", 64), ("resnet20", 32), ("resnet56", 32)]


@pytest.mark.parametrize("name,size", BATCH_FAMILIES, ids=[name for name, _ in BATCH_FAMILIES])
def test_a_sample_computes_the_same_in_a_mixed_batch_as_alone(name, size):
    """Real skipping gathers the kept samples and scatters their branch output back: a sample's result must not
    depend on which other samples share its batch or on what they decided."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = perturb_batchnorm(gateify.create_model(name)).eval()
    gated = split_decisions(gateify.convert(model, example_input=x[:2]), x)
    gateify.record_decisions(gated)
    with torch.no_grad():
        together = gated(x)
        scale = together.abs().max().item()
        kept = torch.stack([g.last.gate for g in gateify.gates(gated).values()])  # (blocks, samples)
        assert ((kept.sum(1) > 0) & (kept.sum(1) < len(x))).all()  # every block keeps some and skips some
        for i in range(len(x)):
            alone = gated(x[i:i + 1])
            assert torch.equal(torch.stack([g.last.gate[0] for g in gateify.gates(gated).values()]), kept[:, i])
            # to float32 rounding, which batch-size-dependent kernels change (~1e-7 of the output scale; the
            # perturbed BatchNorms grow activations to ~1e3): a sample given another's branch would be off by O(1)
            assert (alone[0] - together[i]).abs().max().item() <= 1e-5 * scale, f"sample {i}"

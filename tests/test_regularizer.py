"""The gate regulariser: schedules, FLOPs term consistent with the accounting, gradients, CIR consistency."""

import math

import pytest
import torch
import torch.nn.functional as F

import gateify
from gateify import GateRegularizer, RegularizerConfig
from gateify.regularizer import PRESETS, config_with, ramp

from conftest import mix_decisions


def test_ramp_shapes():
    assert ramp(0.05, 0.1, 0.4) == 0.0 and ramp(0.1, 0.1, 0.4) == 0.0
    assert ramp(0.3, 0.1, 0.4, "linear") == pytest.approx(0.5)
    assert ramp(0.3, 0.1, 0.4, "cosine") == pytest.approx(0.5)
    assert ramp(0.2, 0.1, 0.4, "cosine") == pytest.approx((1 - math.cos(math.pi * 0.25)) / 2)
    assert ramp(0.5, 0.1, 0.4) == 1.0 and ramp(0.9, 0.1, 0.4) == 1.0
    assert ramp(0.3, 0.0, 0.0) == 1.0


def test_presets_are_ordered_operating_points():
    assert list(PRESETS) == ["aggressive", "balanced", "conservative"]
    targets = [PRESETS[name].target for name in PRESETS]
    assert targets == sorted(targets) and all(0 < t < 1 for t in targets)
    assert config_with("balanced", target=0.65).target == 0.65
    with pytest.raises(gateify.GateifyError, match="unknown regulariser fields"):
        config_with("balanced", targte=0.65)
    with pytest.raises(gateify.GateifyError, match="granularity"):
        RegularizerConfig(granularity="layer")


@pytest.fixture
def setup(resnet20, cifar_batch):
    gated = gateify.convert(resnet20)
    report = gateify.flops(gated.eval(), cifar_batch)
    return gated, report


def test_schedule_values(setup):
    gated, report = setup
    cfg = RegularizerConfig(flops_weight=8.0, warmup=0.2, ramp=0.4, ramp_shape="linear", tau_start=1.0,
                            tau_end=0.5, noise_start=1.0, noise_end=0.0, anneal=0.5)
    reg = GateRegularizer(gated, report, cfg)
    assert reg.schedule(0.1)["flops_weight"] == 0.0  # warm-up: no FLOPs pressure
    assert reg.schedule(0.4)["flops_weight"] == pytest.approx(4.0)
    assert reg.schedule(0.8)["flops_weight"] == pytest.approx(8.0)
    assert reg.schedule(0.0)["tau"] == 1.0 and reg.schedule(0.5)["tau"] == pytest.approx(0.5)
    assert reg.schedule(0.25)["noise"] == pytest.approx(0.5)  # cosine anneal, half way
    assert reg.schedule(0.9)["noise"] == 0.0
    values = reg.step(0.25)
    assert all(g.noise == values["noise"] and g.tau == values["tau"] for g in gateify.gates(gated).values())


def test_noise_perturbs_the_forward_pass_not_the_counted_decisions(setup, cifar_batch):
    gated, _ = setup
    mix_decisions(gated, cifar_batch)
    first = next(iter(gateify.gates(gated).values()))
    gateify.set_mode(gated.eval(), "hard")
    with torch.no_grad(), gateify.record_decisions(gated):
        gated(cifar_batch)
    hard = first.last.gate.clone()
    gateify.set_mode(gated, "gumbel", noise=2.0)
    torch.manual_seed(0)
    gated(cifar_batch)
    assert torch.equal(first.last.decision.bool(), hard)  # what hard mode decides, whatever the noise
    assert not torch.equal(first.last.gate.bool(), hard)  # while the noise did flip some samples' branch


def test_flops_fraction_matches_counted_flops(setup, cifar_batch):
    """Without noise and with BatchNorm in eval, the training decisions are the inference decisions: the
    regulariser's FLOPs fraction must be what gateify.flops counts in hard mode."""
    gated, report = setup
    mix_decisions(gated, cifar_batch)
    reg = GateRegularizer(gated, report, "balanced")
    gateify.set_mode(gated, "gumbel", noise=0.0)
    gated(cifar_batch)
    fraction = float(reg.flops_fraction().detach())
    gateify.set_mode(gated, "hard")
    counted = gateify.flops(gated, cifar_batch)
    assert 0.3 < counted.executed_fraction < 0.9
    assert fraction == pytest.approx(counted.executed_fraction, rel=1e-5)


def test_flops_term_gradient_reaches_controllers_and_falls_with_keep(setup, cifar_batch):
    gated, report = setup
    reg = GateRegularizer(gated, report, config_with("balanced", target=0.5, min_keep=0.0))
    reg.step(1.0)
    gated.train()
    terms = reg(F.cross_entropy(gated(cifar_batch), torch.zeros(16, dtype=torch.long)))
    terms.total.backward()
    for gate in gateify.gates(gated).values():
        assert gate.controller.fc2.bias.grad is not None and gate.controller.fc2.bias.grad.abs() > 0
    high = terms.flops.item()
    with torch.no_grad():  # every controller now keeps fewer samples
        for gate in gateify.gates(gated).values():
            gate.controller.fc2.bias.fill_(-0.5)
    gateify.set_mode(gated, "gumbel", noise=0.0)
    gated(cifar_batch)
    low_fraction = reg.flops_fraction().item()
    assert low_fraction < terms.flops_fraction.item()
    assert reg.flops_loss().item() < high


def test_block_granularity_targets_every_block(setup, cifar_batch):
    gated, report = setup
    reg = GateRegularizer(gated, report, config_with("balanced", granularity="block"))
    keep = reg.block_keep_target()
    skippable = sum(b.branch_flops for b in report.blocks)
    fixed = report.dense_flops - skippable + report.gate_flops
    assert (fixed + keep * skippable) / report.dense_flops == pytest.approx(0.70)
    reg.step(1.0)
    gated.train()(cifar_batch)
    rates = torch.tensor([g.last.decision.mean().item() for g in gateify.gates(gated).values()])
    assert reg.flops_loss().item() == pytest.approx(20.0 * ((rates - keep) ** 2).mean().item(), rel=1e-5)


class Mirror(torch.nn.Module):
    """``x + F(x)`` with ``F(x) = (x0, -x1)``: CIR = 1 - cos(x, F(x)) = 1 - (x0^2 - x1^2) / |x|^2, known per input."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.diag(torch.tensor([1.0, -1.0])))

    def forward(self, x):
        return x + self.lin(x)


class MirrorNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Mirror()

    def forward(self, x):
        return self.block(x)


def test_consistency_pulls_the_gate_toward_the_highest_cir_samples():
    # CIR 0, 2, 1, 0.4; the controller's logit is x0 - x1 - 0.5 = 0.5, -1.5, -0.5, 0.5: it keeps samples 0 and 3,
    # so the two samples the block should keep are the two of highest CIR, 1 and 2: targets 0, 1, 1, 0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    gated = gateify.convert(MirrorNet(), example_input=x[:2], hidden=2, noise=0.0)
    gate = gateify.gates(gated)["block"]
    with torch.no_grad():
        gate.controller.fc1.weight.copy_(torch.eye(2))
        gate.controller.fc1.bias.zero_()
        gate.controller.fc2.weight.copy_(torch.tensor([[1.0, -1.0]]))
        gate.controller.fc2.bias.fill_(-0.5)
    reg = GateRegularizer(gated, {"block": 4.0}, "balanced", dense_flops=8.0)
    gateify.set_mode(gated, "gumbel")(x)
    assert torch.allclose(gate.last.cir, torch.tensor([0.0, 2.0, 1.0, 0.4]), atol=1e-6)
    assert gate.last.decision.tolist() == [1.0, 0.0, 0.0, 1.0]
    loss = reg.consistency_loss()
    # binary cross-entropy: -log(1 - sigmoid(z)) = softplus(z) for a target 0, -log(sigmoid(z)) = softplus(-z) for 1
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    assert loss.item() == pytest.approx((sp(0.5) + sp(1.5) + sp(0.5) + sp(0.5)) / 4, rel=1e-6)
    loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # d BCE / d logit = p - target, averaged: raising the bias helps samples 1, 2 and hurts 0, 3
    expected = (sig(0.5) + (sig(-1.5) - 1) + (sig(-0.5) - 1) + sig(0.5)) / 4
    assert float(gate.controller.fc2.bias.grad) == pytest.approx(expected, rel=1e-5)


def test_refusals(resnet20, setup):
    gated, report = setup
    with pytest.raises(gateify.NotConvertedError):
        GateRegularizer(resnet20, report)
    with pytest.raises(gateify.GateifyError, match="unknown preset"):
        GateRegularizer(gated, report, "fast")
    with pytest.raises(gateify.GateifyError, match="gumbel"):
        GateRegularizer(gated, report).flops_fraction()  # no forward pass yet


def test_keep_floor_reopens_a_block_every_sample_skips(setup, cifar_batch):
    """A block switched off for everyone is static pruning; the floor must be able to pull it back, so its
    gradient may not vanish however far below the threshold the samples are (a sigmoid gradient would)."""
    gated, report = setup
    reg = GateRegularizer(gated, report, config_with("balanced", min_keep=0.25))
    reg.step(1.0)
    closed = gateify.gates(gated)["layer2.1"]
    with torch.no_grad():
        closed.controller.fc2.bias.fill_(-30.0)  # keep probability ~1e-13 for every sample
    gated.train()(cifar_batch)
    assert closed.last.decision.sum().item() == 0
    loss = reg.flops_loss()
    assert loss.item() >= 20.0 * 0.25 ** 2 / 9  # this block alone is 0.25 under the floor
    loss.backward()
    assert float(closed.controller.fc2.bias.grad) < 0  # raising the logit lowers the loss: the block can reopen


def test_cir_gates_flops_term_trains_the_gates_only(resnet20, cifar_batch):
    """The FLOPs term may move decisions, never the features: with CIR gates, its gradient must stop at the
    gates' own scale and offset. And a CIR gate holds no controller, which DDP would wait on in vain."""
    gated = gateify.convert(resnet20, gate="cir")
    reg = GateRegularizer(gated, gateify.flops(gated.eval(), cifar_batch), config_with("balanced", target=0.5))
    reg.step(1.0)
    gated.train()(cifar_batch)
    reg.flops_loss().backward()
    found = gateify.gates(gated)
    gate_params = {id(p) for g in found.values() for p in g.parameters()}
    backbone = {n: p.grad for n, p in gated.named_parameters() if id(p) not in gate_params}
    assert backbone and [n for n, grad in backbone.items() if grad is not None and grad.any()] == []
    assert not any(hasattr(g, "controller") for g in found.values())
    assert all(g.cir.scale.grad.abs() > 0 for g in found.values())  # the term does reach the gates


# ------------------------------------------------------------------------------------------ recipes (issue 21)


def test_beta_cdf_matches_closed_forms_and_its_gradient_is_the_density():
    from gateify.regularizer import beta_cdf

    x = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.99], dtype=torch.float64, requires_grad=True)
    assert torch.allclose(beta_cdf(x, 1.0, 1.0), x, atol=1e-10)  # uniform
    assert torch.allclose(beta_cdf(x, 2.0, 1.0), x ** 2, atol=1e-10)
    arcsine = 2 / math.pi * torch.asin(x.sqrt())  # Beta(1/2, 1/2)
    assert torch.allclose(beta_cdf(x, 0.5, 0.5), arcsine, atol=1e-9)
    a, b = 0.7, 0.3  # the shape batch-shaping uses (mean 0.7, U-shaped)
    beta_cdf(x, a, b).sum().backward()
    density = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64),
                                       torch.tensor(b, dtype=torch.float64)).log_prob(x.detach()).exp()
    assert torch.allclose(x.grad, density, rtol=1e-6)
    # and the CDF is the integral of that density (midpoint rule away from the singular ends)
    grid = torch.linspace(0.2, 0.8, 60001, dtype=torch.float64)
    mid = (grid[1:] + grid[:-1]) / 2
    integral = (torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
                .log_prob(mid).exp() * (grid[1] - grid[0])).sum()
    assert float(beta_cdf(torch.tensor(0.8), a, b) - beta_cdf(torch.tensor(0.2), a, b)) == pytest.approx(
        float(integral), rel=1e-5)


def test_bounds_relax_from_the_target_to_the_unit_interval():
    from gateify.regularizer import bounds_at

    assert bounds_at(0.0, 0.3, 0.6) == pytest.approx((0.6, 0.6))
    lower, upper = bounds_at(0.15, 0.3, 0.6)  # half way: p = cos^2(pi/4) = 1/2
    assert (lower, upper) == pytest.approx((0.3, 0.8))
    assert bounds_at(0.3, 0.3, 0.6) == pytest.approx((0.0, 1.0)) and bounds_at(0.9, 0.3, 0.6) == pytest.approx((0, 1))


def test_bounds_penalise_exactly_the_blocks_outside_them(setup, cifar_batch):
    """Early in training a block that every sample skips (or keeps) is outside the bounds and pulled back in; once
    the bounds are relaxed the same decisions cost nothing beyond the model-level term."""
    gated, report = setup
    cfg = config_with("balanced", min_keep=0.0, bounds=0.3, target=0.7)
    reg = GateRegularizer(gated, report, cfg)
    k = reg.block_keep_target()
    with torch.no_grad():
        for name, gate in gateify.gates(gated).items():
            gate.controller.fc2.bias.fill_(-30.0 if name == "layer2.1" else 30.0)  # one block off, the rest on
    gated.train()
    plain = GateRegularizer(gated, report, config_with("balanced", min_keep=0.0, target=0.7))
    for progress, inside in ((0.1, False), (0.5, True)):
        reg.step(progress)
        plain.step(progress)
        gated(cifar_batch)
        lower, upper = reg.keep_bounds()
        rates = {n: float(g.last.decision.detach().mean()) for n, g in gateify.gates(gated).items()}
        expected = sum(max(0.0, r - upper) ** 2 + max(0.0, lower - r) ** 2 for r in rates.values()) / len(rates)
        extra = reg.flops_loss().item() - plain.flops_loss().item()
        assert extra == pytest.approx(cfg.flops_weight * expected, rel=1e-5, abs=1e-9)
        assert (extra == pytest.approx(0.0, abs=1e-9)) == inside
    reg.step(0.1)
    gated(cifar_batch)
    assert 0 < reg.keep_bounds()[0] < k < reg.keep_bounds()[1] < 1
    reg.flops_loss().backward()
    off, on = gateify.gates(gated)["layer2.1"], gateify.gates(gated)["layer1.0"]
    assert float(off.controller.fc2.bias.grad) < 0 < float(on.controller.fc2.bias.grad)  # both pulled inside


def test_bounds_hold_keep_rates_in_training(resnet20, cifar_batch):
    """Gradient steps on the bounds term alone bring every block's keep rate inside its bounds: blocks that start
    all-off or all-on end up routing between ``lower`` and ``upper``."""
    gated = gateify.convert(resnet20, noise=0.0)
    report = gateify.flops(gated.eval(), cifar_batch)
    mix_decisions(gated, cifar_batch)
    with torch.no_grad():
        for i, gate in enumerate(gateify.gates(gated).values()):
            gate.controller.fc2.bias.add_(-20.0 if i % 2 else 20.0)  # alternate blocks: all-off, all-on
    reg = GateRegularizer(gated, report, config_with("balanced", min_keep=0.0, bounds=0.5, target=0.7))
    gated.train()
    for m in gated.modules():  # the features stay fixed: only the decisions move
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.SGD([g.controller.fc2.bias for g in gateify.gates(gated).values()], lr=2.0)
    reg.step(0.2)
    lower, upper = reg.keep_bounds()
    assert 0.1 < lower < upper < 0.9
    gated(cifar_batch)
    first = [float(g.last.decision.mean()) for g in gateify.gates(gated).values()]
    assert set(first) == {0.0, 1.0}
    inside = None
    for _ in range(300):
        gated(cifar_batch)
        rates = [float(g.last.decision.detach().mean()) for g in gateify.gates(gated).values()]
        loss = reg.bounds_loss()
        if all(lower <= r <= upper for r in rates):
            inside = rates
            break
        assert loss.item() > 0  # a rate outside the bounds always costs something
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert inside is not None and loss.item() == 0.0, (lower, upper, rates)


def test_batch_shaping_reaches_the_loss_and_prefers_conditional_gates(setup, cifar_batch):
    from gateify.regularizer import beta_cdf

    gated, report = setup
    mix_decisions(gated, cifar_batch)
    reg = GateRegularizer(gated, report, config_with("balanced", shaping_weight=2.0, consistency_weight=0.0,
                                                         anneal=0.5))
    assert reg.step(0.0)["shaping_weight"] == 2.0 and reg.step(0.5)["shaping_weight"] == 0.0
    reg.step(0.0)
    gated.train()(cifar_batch)
    terms = reg(torch.zeros(()))
    assert terms.shaping is not None and terms.shaping.item() > 0
    assert terms.total.item() == pytest.approx(terms.flops.item() + 2.0 * terms.shaping.item(), rel=1e-5)
    off = GateRegularizer(gated, report, config_with("balanced", consistency_weight=0.0))
    off.step(0.0)
    assert off(torch.zeros(())).shaping is None
    # the prior Beta(k, 1 - k) is U-shaped: every sample at p = k costs more than the samples split near 0 and 1
    # (here 0.086 against 0.039, as scipy.stats.beta gives), and the prior's own quantiles cost nothing
    k = reg.block_keep_target()
    quantiles = torch.arange(1, 17, dtype=torch.float64) / 17

    def cost(p: torch.Tensor) -> float:
        return float(((beta_cdf(p, k, 1 - k) - quantiles) ** 2).mean())

    split = torch.where(torch.arange(16) < round(16 * (1 - k)), 0.02, 0.98).double()
    assert cost(split) < cost(torch.full((16,), k, dtype=torch.float64))
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)[1:-1]
    prior = grid[torch.searchsorted(beta_cdf(grid, k, 1 - k), quantiles)]  # the inverse CDF on a fine grid
    assert cost(prior) < 1e-6
    # its gradient (the Beta density) reaches every block's keep probabilities, and through them every controller
    # whose sigmoid is not saturated (train-mode BatchNorm pushes some blocks' probabilities to exactly 1.0 here)
    found = gateify.gates(gated)
    for g in found.values():
        g.last.keep_prob.retain_grad()
    reg.shaping_loss().backward()
    assert all(float(g.last.keep_prob.grad.abs().sum()) > 0 for g in found.values())
    live = [g for g in found.values() if bool(((g.last.keep_prob > 0) & (g.last.keep_prob < 1)).any())]
    assert len(live) >= len(found) // 2
    assert all(float(g.controller.fc2.weight.grad.abs().sum()) > 0 for g in live)

"""Loss terms of gated fine-tuning and their schedules; the three presets live here, as data.

Per training step, with ``g[b, i]`` the decision hard mode would make for sample ``i`` at block ``b``
(straight-through: ``1[logit >= 0]`` forward, ``sigmoid(logit / tau)``'s gradient backward; the Gumbel noise only
perturbs which branches the forward pass uses, so noise can never meet the budget on its own),
``c[b]`` block ``b``'s branch FLOPs per sample and
``D`` the dense model's FLOPs per sample (all from :func:`gateify.flops`):

* FLOPs fraction ``E = (D - sum_b c[b] + G + sum_b c[b] * mean_i g[b, i]) / D`` (``G``: the controllers' FLOPs),
  the executed FLOPs of this batch under the current decisions, as :func:`gateify.flops` would count them.
  ``flops`` term: ``w(t) * (E - target)^2`` (``granularity="model"``; plus ``w(t) * mean_b relu(min_keep -
  mean_i g[b, i])^2`` when ``min_keep`` > 0, so that no block is dropped for everyone), or the mean over blocks of
  ``w(t) * (mean_i g[b, i] - target_b)^2`` with every block's keep rate pulled to the one global keep rate that
  meets the target (``granularity="block"``: forces every block to route, see docs/method.md).
* ``consistency`` term (CIR, self-supervised): for each block, the ``k`` samples of the batch with the highest
  CIR = 1 - cos(S(x), F(x)) are the ones the block should keep, ``k`` being how many it keeps now; the loss is the
  binary cross-entropy between the keep probability and that target, averaged over samples and blocks.
* ``bounds`` term (LAUDNet's annealed per-block bounds, instead of a fixed floor): every block's keep rate is held
  between ``lower(t) = p(t) * k*`` and ``upper(t) = 1 - p(t) * (1 - k*)``, ``k*`` the keep rate that meets the target
  when every block has it, ``p(t) = cos^2(pi/2 * min(1, t / bounds))``: the bounds start at ``k*`` (every block
  routes) and relax to [0, 1] by the ``bounds`` fraction of training, so that blocks may end at always-on or
  always-off. ``flops_weight * mean_b (relu(k_b - upper)^2 + relu(lower - k_b)^2)``, not ramped.
* ``shaping`` term (batch-shaping, Ehteshami Bejnordi et al., ICLR 2020): per block, the batch's keep probabilities,
  sorted, against the quantiles of a Beta(k*, 1 - k*) prior (mean ``k*``, U-shaped: most samples near 0 or 1, as
  conditional gates are): ``mean_i (F_Beta(p_(i)) - i / (N + 1))^2``, averaged over blocks; its weight
  ``shaping_weight`` decays to 0 (cosine) over ``anneal``, as the paper lets the prior go once gates are conditional.
* ``w(t)`` is 0 for the first ``warmup`` fraction of training, then rises to ``flops_weight`` over the next
  ``ramp`` fraction (linear or cosine), then stays. The Gumbel temperature and noise scale anneal from their start
  to their end value (cosine) over ``anneal`` of training, so training ends on the deterministic inference rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import CostModel, FlopsReport
from .errors import GateConfigError, GateifyError
from .modes import require_gates

__all__ = ["RegularizerConfig", "PRESETS", "GateRegularizer", "LossTerms", "ramp", "config_with", "distill_loss",
           "beta_cdf", "bounds_at"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher || student) at ``temperature``, scaled by T^2 so its gradients match CE's scale."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t


@dataclass(frozen=True)
class RegularizerConfig:
    """Every knob of the gate regulariser. ``PRESETS`` holds the three named operating points.

    Attributes:
        target: executed FLOPs as a fraction of dense that the FLOPs term pulls toward (gate overhead included).
        flops_weight: weight of the FLOPs term once ramped up.
        granularity: ``"model"`` (one term on the whole model's FLOPs) or ``"block"`` (every block's keep rate).
        min_keep: with ``granularity="model"``, a floor on every block's keep rate (penalised below it with the
            FLOPs weight): no block may be switched off for everyone, so the budget is met by routing, not by
            static depth pruning. 0 disables it.
        warmup: fraction of training before the FLOPs weight starts to rise.
        ramp: fraction of training over which it rises to ``flops_weight``.
        ramp_shape: ``"linear"`` or ``"cosine"``.
        consistency_weight: weight of the CIR consistency term (0 disables it).
        tau_start, tau_end: Gumbel-Softmax temperature at the start and end of the anneal.
        noise_start, noise_end: Gumbel noise scale at the start and end of the anneal.
        anneal: fraction of training over which temperature and noise anneal (and the shaping weight decays).
        bounds: fraction of training over which the per-block keep-rate bounds relax from ``[k*, k*]`` to
            ``[0, 1]`` (LAUDNet); 0 disables them. Use instead of ``min_keep``.
        shaping_weight: weight of the batch-shaping prior (Beta(k*, 1 - k*) on each block's keep probabilities);
            0 disables it.
    """

    target: float = 0.70
    flops_weight: float = 20.0
    granularity: str = "model"
    min_keep: float = 0.0
    warmup: float = 0.0
    ramp: float = 0.3
    ramp_shape: str = "cosine"
    consistency_weight: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.5
    noise_start: float = 1.0
    noise_end: float = 0.0
    anneal: float = 0.7
    bounds: float = 0.0
    shaping_weight: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.target <= 1.5:
            problems.append(f"target={self.target} must be a FLOPs fraction in (0, 1.5]")
        if not 0.0 <= self.min_keep < 1.0:
            problems.append(f"min_keep={self.min_keep} must lie in [0, 1)")
        if self.granularity not in ("model", "block"):
            problems.append(f"granularity={self.granularity!r} must be 'model' or 'block'")
        if self.ramp_shape not in ("linear", "cosine"):
            problems.append(f"ramp_shape={self.ramp_shape!r} must be 'linear' or 'cosine'")
        for name in ("warmup", "ramp", "anneal", "bounds"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be a fraction of training in [0, 1]")
        if min(self.tau_start, self.tau_end) <= 0 or min(self.noise_start, self.noise_end) < 0:
            problems.append("temperatures must be > 0 and noise scales >= 0")
        if min(self.flops_weight, self.consistency_weight, self.shaping_weight) < 0:
            problems.append("weights must be >= 0")
        if problems:
            raise GateConfigError("invalid regulariser config: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The named operating points; ``balanced`` is the default. Targets are executed FLOPs fractions.
PRESETS: dict[str, RegularizerConfig] = {
    "aggressive": RegularizerConfig(target=0.55, min_keep=0.25),
    "balanced": RegularizerConfig(target=0.70, min_keep=0.25),
    "conservative": RegularizerConfig(target=0.85, min_keep=0.25),
}


def ramp(progress: float, start: float, length: float, shape: str = "linear") -> float:
    """0 before ``start``, rising to 1 over ``length`` (linear, or cosine: ``(1 - cos(pi * s)) / 2``), then 1."""
    if progress <= start:
        return 0.0
    if length <= 0 or progress >= start + length:
        return 1.0
    s = (progress - start) / length
    return s if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * s))


def bounds_at(progress: float, relax: float, keep: float) -> tuple[float, float]:
    """LAUDNet's per-block keep-rate bounds at ``progress``: ``(p * keep, 1 - p * (1 - keep))`` with
    ``p = cos^2(pi/2 * min(1, progress / relax))``: both equal ``keep`` at the start, ``(0, 1)`` from ``relax`` on."""
    p = math.cos(0.5 * math.pi * min(1.0, progress / relax)) ** 2 if relax > 0 else 0.0
    return p * keep, 1.0 - p * (1.0 - keep)


def _betacf(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """The continued fraction of the regularised incomplete beta function (modified Lentz; Numerical Recipes'
    ``betacf``), elementwise in float64; converges fast for ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    d = 1.0 / d
    h = d.clone()
    for m in range(1, iterations + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1.0 + aa / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            d = 1.0 / d
            h = h * d * c
        if float((d * c - 1.0).abs().max()) < 1e-12:
            break
    return h


class _BetaCDF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: float, b: float) -> torch.Tensor:  # noqa: ANN401
        x64 = x.detach().double().clamp(1e-12, 1 - 1e-12)
        at, bt = torch.full_like(x64, a), torch.full_like(x64, b)
        log_front = (a * x64.log() + b * torch.log1p(-x64) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
        lower = x64 < (a + 1.0) / (a + b + 2.0)
        direct = log_front.exp() * _betacf(at, bt, x64) / a
        mirrored = 1.0 - log_front.exp() * _betacf(bt, at, 1.0 - x64) / b
        ctx.save_for_backward(x64)
        ctx.ab = (a, b)
        return torch.where(lower, direct, mirrored).clamp(0.0, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # noqa: ANN401
        (x64,) = ctx.saved_tensors
        a, b = ctx.ab
        log_pdf = ((a - 1) * x64.log() + (b - 1) * torch.log1p(-x64)
                   - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
        return grad * log_pdf.exp().to(grad.dtype), None, None


def beta_cdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The Beta(a, b) cumulative distribution function at ``x`` (any shape, values in [0, 1]); its gradient is the
    Beta density. Float64 inside (a continued fraction), returned in ``x``'s dtype."""
    if a <= 0 or b <= 0:
        raise GateConfigError(f"Beta({a}, {b}): both parameters must be > 0.")
    return _BetaCDF.apply(x, float(a), float(b))


class LossTerms(NamedTuple):
    """The regulariser's output for one step; ``total`` is what to backpropagate."""

    total: torch.Tensor
    task: torch.Tensor
    flops: torch.Tensor
    consistency: torch.Tensor
    flops_fraction: torch.Tensor  # executed FLOPs fraction of this batch (detached)
    shaping: Optional[torch.Tensor] = None  # the batch-shaping term before its weight (detached), when on


class GateRegularizer:
    """Adds the FLOPs and consistency terms to a task loss, and anneals the gates' temperature and noise.

    Use it from any training loop::

        reg = gateify.GateRegularizer(gated, gateify.flops(gated, example_batch), "balanced")
        for step, (x, y) in enumerate(loader):
            reg.step(progress=step / total_steps)   # sets tau/noise, the FLOPs weight
            terms = reg(F.cross_entropy(gated(x), y))
            terms.total.backward()

    Args:
        model: the converted model (or a DDP wrapper of it) whose gates ran in ``"gumbel"`` mode this step.
        costs: a :class:`FlopsReport` of that model (dense mode or any mode: only per-block branch FLOPs, dense and
            gate FLOPs are read), or a ``{block: branch FLOPs}`` mapping, then with ``dense_flops``.
        config: a :class:`RegularizerConfig` or a preset name (``"aggressive"``, ``"balanced"``, ``"conservative"``).
    """

    def __init__(self, model: nn.Module, costs: Union[FlopsReport, CostModel, Mapping[str, float]],
                 config: Union[RegularizerConfig, str] = "balanced", *, dense_flops: Optional[float] = None,
                 gate_flops: float = 0.0) -> None:
        if isinstance(config, str):
            if config not in PRESETS:
                raise GateConfigError(f"unknown preset {config!r}; use one of {sorted(PRESETS)} or a "
                                      f"RegularizerConfig.")
            config = PRESETS[config]
        self.config = config
        self.gates = require_gates(model, "GateRegularizer")  # looks through DDP
        if isinstance(costs, FlopsReport):
            costs = CostModel.from_report(costs)
        elif not isinstance(costs, CostModel):
            if dense_flops is None:
                raise GateifyError("pass dense_flops with a cost mapping, or pass a FlopsReport from gateify.flops.")
            costs = CostModel(dense_flops, costs, gate_flops)
        missing = set(self.gates) - set(costs.branch_flops)
        if missing:
            raise GateifyError(f"no branch FLOPs for blocks {sorted(missing)}; count them with gateify.flops.")
        self.costs = costs
        self.progress = 0.0
        self.flops_weight = 0.0
        self.shaping_weight = 0.0

    def schedule(self, progress: float) -> dict[str, float]:
        """The FLOPs weight, temperature and noise scale at ``progress`` (fraction of training done, 0..1)."""
        c = self.config
        a = ramp(progress, 0.0, c.anneal, "cosine")
        return {
            "flops_weight": c.flops_weight * ramp(progress, c.warmup, c.ramp, c.ramp_shape),
            "tau": c.tau_start + (c.tau_end - c.tau_start) * a,
            "noise": c.noise_start + (c.noise_end - c.noise_start) * a,
            "shaping_weight": c.shaping_weight * (1.0 - a),
        }

    def step(self, progress: float) -> dict[str, float]:
        """Move to ``progress``: set every gate's temperature and noise, and the FLOPs weight. Returns the values."""
        values = self.schedule(progress)
        self.progress = progress
        self.flops_weight = values["flops_weight"]
        self.shaping_weight = values["shaping_weight"]
        for gate in self.gates.values():
            gate.tau, gate.noise = values["tau"], values["noise"]
        return values

    def block_keep_target(self) -> float:
        """The keep rate that, given to every block, meets ``target``."""
        return self.costs.uniform_keep(self.config.target)

    def _records(self) -> list:
        records = [g.last for g in self.gates.values()]
        if any(r is None or r.mode != "gumbel" for r in records):
            raise GateifyError("the gates' last forward pass was not in 'gumbel' mode: run the model in train() "
                               "(mode 'auto') or set_mode(model, 'gumbel') before computing the loss.")
        return records

    def _keep(self) -> dict[str, torch.Tensor]:
        return {name: r.decision.float().mean() for name, r in zip(self.gates, self._records())}

    def flops_fraction(self) -> torch.Tensor:
        """Executed FLOPs fraction of the last batch, differentiable through the straight-through gates."""
        return self.costs.fraction(self._keep())

    def flops_loss(self) -> torch.Tensor:
        keep = self._keep()
        rates = torch.stack(list(keep.values()))
        if self.config.granularity == "block":
            return self.flops_weight * ((rates - self.block_keep_target()) ** 2).mean()
        loss = self.flops_weight * (self.costs.fraction(keep) - self.config.target) ** 2
        if self.config.min_keep > 0:
            loss = loss + self.flops_weight * (F.relu(self.config.min_keep - rates) ** 2).mean()
        if self.config.bounds > 0:
            loss = loss + self.bounds_loss(rates)
        return loss

    def bounds_loss(self, rates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``flops_weight * mean_b (relu(k_b - upper)^2 + relu(lower - k_b)^2)`` at the current bounds (not ramped:
        the bounds are tightest at the start, when the FLOPs weight is still rising); part of :meth:`flops_loss`."""
        if rates is None:
            rates = torch.stack(list(self._keep().values()))
        lower, upper = self.keep_bounds()
        outside = F.relu(rates - upper) ** 2 + F.relu(lower - rates) ** 2
        return self.config.flops_weight * outside.mean()

    def keep_bounds(self) -> tuple[float, float]:
        """The per-block keep-rate bounds at the current progress (:func:`bounds_at`); (0, 1) once relaxed."""
        return bounds_at(self.progress, self.config.bounds, self.block_keep_target())

    def shaping_loss(self) -> torch.Tensor:
        """Batch-shaping: each block's sorted keep probabilities against the Beta(k*, 1 - k*) quantiles."""
        keep = min(max(self.block_keep_target(), 0.02), 0.98)
        losses = []
        for record in self._records():
            if record.keep_prob is None or record.keep_prob.numel() < 2:
                continue
            p, _ = record.keep_prob.float().sort()
            n = p.numel()
            quantiles = torch.arange(1, n + 1, device=p.device, dtype=p.dtype) / (n + 1)
            losses.append(((beta_cdf(p, keep, 1.0 - keep) - quantiles) ** 2).mean())
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()

    def consistency_loss(self) -> torch.Tensor:
        """BCE between keep probabilities and 'keep the k highest-CIR samples', k = how many each block keeps now."""
        losses = []
        for gate, record in zip(self.gates.values(), self._records()):
            if not gate.scorer.decides_from_input or record.cir is None:
                continue  # a CIR gate's logit is a function of CIR already
            k = int(round(float(record.decision.detach().float().sum())))
            target = torch.zeros_like(record.keep_prob)
            if k > 0:
                target[record.cir.topk(k).indices] = 1.0
            prob = record.keep_prob.clamp(1e-6, 1 - 1e-6)
            losses.append(F.binary_cross_entropy(prob, target))
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()

    def __call__(self, task_loss: torch.Tensor) -> LossTerms:
        """``task_loss`` plus the regulariser's terms for the last forward pass."""
        flops = self.flops_loss()
        consistency = self.consistency_loss().to(flops.device) if self.config.consistency_weight else flops.new_zeros(())
        total = task_loss + flops.to(task_loss.dtype) + self.config.consistency_weight * consistency
        shaping = None
        if self.config.shaping_weight > 0:
            shaping = self.shaping_loss().to(flops.device)
            total = total + self.shaping_weight * shaping.to(task_loss.dtype)
            shaping = shaping.detach()
        return LossTerms(total, task_loss.detach(), flops.detach(), consistency.detach(),
                         self.flops_fraction().detach(), shaping)


def config_with(preset: str, **overrides: Any) -> RegularizerConfig:
    """A preset with some fields changed, e.g. ``config_with("balanced", target=0.65)``."""
    if preset not in PRESETS:
        raise GateConfigError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}.")
    known = {f.name for f in fields(RegularizerConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise GateConfigError(f"unknown regulariser fields {sorted(unknown)}; known: {sorted(known)}.")
    return replace(PRESETS[preset], **overrides)

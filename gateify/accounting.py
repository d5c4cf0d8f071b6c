"""FLOPs of what actually ran, the cost model built on them, and calibration of the hard threshold to a target.

Counting is done by ``torch.utils.flop_counter.FlopCounterMode`` on real forward passes, so work that a gate
skipped is not counted. Units: **FLOPs** as that counter defines them (2 per multiply-accumulate of a
convolution or matrix product) and **MACs** = FLOPs / 2 (what most papers call "FLOPs"; ResNet-20 at 32x32 is
40.6M MACs = 81.1M FLOPs). Elementwise work (BatchNorm, activations, additions), pooling and the gather/scatter of
real skipping are not counted by either unit.

One cost model serves everything that predicts FLOPs from decisions (calibration, the regulariser, static
selection): executed = fixed + sum over blocks of branch FLOPs x keep rate, where fixed is everything outside the
gated branches plus the controllers (:class:`CostModel`).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import GateConfigError, GateifyError, GateifyWarning, InputShapeError
from .modes import (Batches, as_batches, gate_mode, gates, evaluating, keep_rates, model_device,
                    record_decisions, require_gates, unwrap)

__all__ = ["BlockFlops", "FlopsReport", "CostModel", "flops", "calibrate"]


@dataclass
class BlockFlops:
    """One gated block, per sample: branch FLOPs when it runs, FLOPs it executed on average, its keep rate."""

    name: str
    branch_flops: float
    executed_flops: float
    controller_flops: float
    keep_rate: float


@dataclass
class FlopsReport:
    """FLOPs per sample of a model on some data (see module doc for units).

    Attributes:
        dense_flops: the source model: every gate open, no controller.
        executed_flops: what ran in the model's current mode, controllers included.
        gate_flops: the controllers' share of ``executed_flops`` (gate overhead).
        samples: how many samples were counted; input_shape: one sample's shape.
        blocks: per gated block, in execution order (empty for a routed model, which has no gates).
        level_shares: for a routed model, the fraction of the samples that ended on each path, cheapest first.
    """

    dense_flops: float
    executed_flops: float
    gate_flops: float
    samples: int
    input_shape: tuple[int, ...]
    blocks: list[BlockFlops] = field(default_factory=list)
    level_shares: Optional[list[float]] = None

    @property
    def dense_macs(self) -> float:
        return self.dense_flops / 2

    @property
    def executed_macs(self) -> float:
        return self.executed_flops / 2

    @property
    def gate_macs(self) -> float:
        return self.gate_flops / 2

    @property
    def executed_fraction(self) -> float:
        return self.executed_flops / self.dense_flops

    @property
    def saved(self) -> float:
        """Fraction of the dense FLOPs not executed, gate overhead included (may be negative)."""
        return 1.0 - self.executed_fraction

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(dense_macs=self.dense_macs, executed_macs=self.executed_macs, gate_macs=self.gate_macs,
                   saved=self.saved)
        return out

    def table(self) -> str:
        """A plain-text table in MACs (and FLOPs = 2 x MACs in the totals), per sample."""
        m = 1e6
        lines = [
            f"per sample, input {'x'.join(map(str, self.input_shape))}, {self.samples} samples; "
            f"MACs (1 MAC = 2 FLOPs), gate overhead included in executed",
            f"{'block':<28}{'keep rate':>10}{'branch MMACs':>14}{'executed MMACs':>16}{'gate kMACs':>12}",
        ]
        for b in self.blocks:
            lines.append(f"{b.name:<28}{b.keep_rate:>10.3f}{b.branch_flops / 2 / m:>14.3f}"
                         f"{b.executed_flops / 2 / m:>16.3f}{b.controller_flops / 2 / 1e3:>12.2f}")
        lines.append(f"dense    {self.dense_macs / m:10.3f} MMACs = {self.dense_flops / m:10.3f} MFLOPs")
        lines.append(f"executed {self.executed_macs / m:10.3f} MMACs = {self.executed_flops / m:10.3f} MFLOPs "
                     f"(gates {self.gate_macs / 1e3:.1f} kMACs)")
        lines.append(f"saved    {100 * self.saved:.1f}% of dense")
        if self.level_shares is not None:
            lines.append("ended on path " + ", ".join(f"{k}: {100 * s:.1f}%" for k, s in enumerate(self.level_shares)))
        return "\n".join(lines)


class CostModel:
    """Executed FLOPs per sample as a function of each block's keep rate (see module doc).

    ``fixed_flops`` is what runs whatever the decisions (stem, shortcuts, head); ``gate_flops`` the controllers,
    which run for every sample whenever gates decide (not in ``"static"`` mode, where no controller runs).
    Keep rates may be floats or tensors (the regulariser passes differentiable ones).
    """

    def __init__(self, dense_flops: float, branch_flops: Mapping[str, float], gate_flops: float = 0.0) -> None:
        if dense_flops <= 0:
            raise GateifyError(f"dense_flops={dense_flops} must be > 0; count it with gateify.flops.")
        self.dense_flops = float(dense_flops)
        self.branch_flops = {name: float(c) for name, c in branch_flops.items()}
        self.gate_flops = float(gate_flops)
        self.fixed_flops = self.dense_flops - sum(self.branch_flops.values())

    @classmethod
    def from_report(cls, report: "FlopsReport") -> "CostModel":
        return cls(report.dense_flops, {b.name: b.branch_flops for b in report.blocks}, report.gate_flops)

    def fraction(self, keep: Mapping[str, Any], *, gates_run: bool = True) -> Any:
        """Executed FLOPs / dense for ``{block: keep rate}`` (blocks not named are kept)."""
        executed = self.fixed_flops + (self.gate_flops if gates_run else 0.0)
        for name, cost in self.branch_flops.items():
            executed = executed + cost * keep.get(name, 1.0)
        return executed / self.dense_flops

    def static_fraction(self, keep: Mapping[str, bool]) -> float:
        """Executed FLOPs / dense of a static selection ``{block: keep}``: no controller runs in static mode."""
        return self.fraction({name: float(k) for name, k in keep.items()}, gates_run=False)

    def uniform_keep(self, target: float) -> float:
        """The keep rate that, given to every block, makes executed FLOPs ``target`` x dense (clamped to [0, 1])."""
        skippable = sum(self.branch_flops.values())
        return min(1.0, max(0.0, (target * self.dense_flops - self.fixed_flops - self.gate_flops) / skippable))


def _addmv_flops(self_shape: Any, mat_shape: Any, vec_shape: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``softmax(Q K^T) V`` of ``(B, heads, L, E)`` queries against ``S`` keys: two batched matrix products,
    ``2 B heads L S (E + Ev)``, as torch's counter counts its CUDA attention kernels."""
    b, h, l, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * l * s * (e + ev)


def _native_mha_flops(query_shape: Any, key_shape: Any, value_shape: Any, embed_dim: int, *args: Any,
                      **kwargs: Any) -> int:
    """``nn.MultiheadAttention``'s inference fast path (torchvision's ViT): the q, k, v and output projections,
    ``2 E^2 (2 L + 2 S)`` per sample, and the attention itself, ``2 L S (E + E)``."""
    b, l, _ = query_shape
    s = key_shape[1]
    return 2 * b * embed_dim * embed_dim * (2 * l + 2 * s) + 2 * b * l * s * 2 * embed_dim


# a controller deciding for one sample runs its layers as addmv, and attention on a CPU runs as fused kernels: torch's
# counter leaves them out. A controller's pooling (mv there, a mean otherwise) is not counted, like every pooling
_EXTRA_FLOPS = {torch.ops.aten.addmv: _addmv_flops,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                torch.ops.aten._native_multi_head_attention: _native_mha_flops}


@contextmanager
def _no_parameter_grads(model: nn.Module) -> Iterator[None]:
    """Every parameter ``requires_grad=False`` inside, as it was after. Under ``no_grad`` a view of a parameter (the
    class token or latent query that CaiT and attention-pool heads ``expand`` per batch) is a leaf that requires
    grad without a grad accumulator, and the module tracker of torch's FLOP counter fails on it."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def counting_flops(model: nn.Module) -> Iterator[FlopCounterMode]:
    """A ``FlopCounterMode`` that also counts what torch's leaves out (``_EXTRA_FLOPS``: CPU attention kernels,
    addmv), with ``model``'s parameters frozen for the count. Every count of this package goes through it, so
    that a routed segment and a gated block of the same network count the same operations."""
    with _no_parameter_grads(model), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        yield counter


class _Counter:
    """FlopCounterMode plus per-gate attribution of branch and scorer FLOPs and kept samples."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gates = gates(model)
        self.mode: Optional[FlopCounterMode] = None  # counting_flops' counter, while and after run()
        self.branch = {name: 0 for name in self.gates}
        self.controller = {name: 0 for name in self.gates}
        self.kept = {name: 0.0 for name in self.gates}
        self.samples = 0
        self.shape: tuple[int, ...] = ()
        # a routed model is told by its flag, not by its attributes: NesT's `levels` is a Sequential
        self.routed = bool(getattr(model, "gateify_routed", False))
        self.levels = torch.zeros(model.levels if self.routed else 0, dtype=torch.float64)  # samples per path

    def _attribute(self, module: nn.Module, bucket: dict[str, int], name: str) -> list:
        start: list[int] = []
        pre = module.register_forward_pre_hook(lambda *_: start.append(self.mode.get_total_flops()))

        def post(*_: Any) -> None:
            bucket[name] += self.mode.get_total_flops() - start.pop()

        return [pre, module.register_forward_hook(post)]

    def run(self, batches: Iterable[torch.Tensor]) -> "_Counter":
        routes = self.model.forward_routes if self.routed else None  # a routed model: count its paths too
        handles = []
        for name, gate in self.gates.items():  # branch = whole gate call minus its scorer
            handles += self._attribute(gate, self.branch, name)
            handles += self._attribute(gate.scorer, self.controller, name)
        device = model_device(self.model)
        try:
            with torch.no_grad(), counting_flops(self.model) as self.mode, record_decisions(self.model):
                for x in batches:
                    if routes is not None:
                        levels = routes(x.to(device)).levels.cpu()
                        self.levels += torch.bincount(levels, minlength=self.levels.numel()).double()
                    else:
                        self.model(x.to(device))
                    self.samples += x.shape[0]
                    self.shape = tuple(x.shape[1:])
                    for name, gate in self.gates.items():
                        record = gate.last
                        self.kept[name] += float(record.gate.sum()) if record is not None else x.shape[0]
        finally:
            for h in handles:
                h.remove()
        for name in self.gates:
            self.branch[name] -= self.controller[name]
        if not self.samples:
            raise InputShapeError("no input batch was given to count FLOPs on.")
        return self

    @property
    def total(self) -> int:
        return self.mode.get_total_flops()


def flops(model: nn.Module, inputs: Batches, *, max_batches: Optional[int] = None) -> FlopsReport:
    """Count FLOPs per sample of ``model`` on ``inputs`` as inference runs it: in ``eval()``, with gates in
    ``"auto"`` or ``"gumbel"`` mode counted in ``"hard"`` mode (``"hard"``, ``"dense"``, ``"static"`` as they are).

    Args:
        model: a converted model, a routed model (:func:`gateify.route`: dense is its network, executed every
            segment each sample ran, ``level_shares`` where they ended), or any model (then executed = dense and
            ``blocks`` is empty).
        inputs: a batch ``(B, C, H, W)``, or an iterable of batches or ``(batch, target)`` pairs (a DataLoader).
        max_batches: count at most this many batches of an iterable.

    Returns:
        A :class:`FlopsReport`. ``dense_flops`` is counted on the first batch with every gate open; executed
        FLOPs on every batch, so skipped branches are not counted. A model left in ``train()`` is counted as it
        would run in ``eval()``; train flags, gate modes and buffers are left as they were.
    """
    batches = list(as_batches(inputs, max_batches))
    model = unwrap(model)
    routed = getattr(model, "gateify_routed", False)
    with evaluating(model):
        with gate_mode(model, "dense"):
            dense = _Counter(model.network if routed else model).run(batches[:1])
        executed = _Counter(model).run(batches)
    n = executed.samples
    blocks = [
        BlockFlops(name, dense.branch[name] / dense.samples, executed.branch[name] / n,
                   executed.controller[name] / n, executed.kept[name] / n)
        for name in executed.gates
    ]
    return FlopsReport(
        dense_flops=dense.total / dense.samples,
        executed_flops=executed.total / n,
        gate_flops=sum(executed.controller.values()) / n,
        samples=n,
        input_shape=executed.shape,
        blocks=blocks,
        level_shares=(executed.levels / n).tolist() if routed else None,
    )


def calibrate(model: nn.Module, inputs: Batches, target: float = 0.7, *, max_batches: Optional[int] = None,
              steps: int = 40, tolerance: float = 1e-3, max_error: float = 0.02) -> float:
    """Choose one hard-gate threshold for every gate so executed FLOPs are ``target`` x dense on ``inputs``.

    No retraining: a bisection on the threshold (executed FLOPs fall as it rises), each step a hard-mode pass over
    the data, with executed FLOPs predicted by the :class:`CostModel` of one :func:`flops` count. Gate overhead
    counts toward the target. The threshold is written into every gate's ``threshold``, so :func:`gateify.save`
    keeps it. For a routed model (:func:`gateify.route`) the threshold is how unsure (``1 - max softmax``) a cheaper
    path must be for a sample to go deeper, set exactly by :meth:`gateify.RoutedModel.calibrate`.

    Args:
        target: executed FLOPs as a fraction of dense, e.g. 0.7 for 30% saved.
        inputs: calibration batches (a tensor or a DataLoader); max_batches: use at most this many.
        steps: at most this many bisection steps; tolerance: stop once within this of the target.
        max_error: warn (``GateifyWarning``, naming the fraction reached) when the best threshold misses the target
            by more than this: with untrained controllers every sample has the same keep probability, so one
            threshold can only switch whole blocks at once.

    Returns:
        The threshold set.

    Raises:
        GateConfigError: CIR gates (they run every branch before deciding: no threshold saves FLOPs).
        GateifyError: a target outside what the data allows (every block skipped .. every block kept).
    """
    if getattr(unwrap(model), "gateify_routed", False):
        return unwrap(model).calibrate(inputs, target, max_batches=max_batches, max_error=max_error)
    found = require_gates(model, "calibrate")
    cir = [name for name, g in found.items() if not g.scorer.decides_from_input]
    if cir:
        raise GateConfigError(f"calibrate cannot meet a FLOPs target with CIR gates ({cir[:3]}...): a CIR gate needs "
                              f"F(x) to decide, so every branch runs whatever the threshold. Convert with "
                              f"gate='controller' to save compute.")
    batches = list(as_batches(inputs, max_batches))
    before = {name: g.threshold.clone() for name, g in found.items()}
    done = False
    try:
        with gate_mode(model, "hard"):
            costs = CostModel.from_report(flops(model, batches))

            def fraction(threshold: float) -> float:
                for g in found.values():
                    g.threshold.fill_(threshold)
                return costs.fraction(keep_rates(model, batches))

            low, high = fraction(0.0), fraction(1.0 + 1e-6)
            if not high <= target <= low:
                raise GateifyError(
                    f"target={target} is out of reach: executed FLOPs range from {high:.3f} (every block skipped; "
                    f"stem, shortcuts, head and gates remain) to {low:.3f} (every block kept, gate overhead "
                    f"included) of dense on this data.")
            # bisect on the logit of the threshold: trained controllers put many samples near p = 0 or 1
            lo, hi = -30.0, 30.0
            best = (abs(low - target), 0.0, low)
            for _ in range(steps):
                if hi - lo < 1e-2:  # a finer threshold moves no sample's decision that matters (p changes < 0.3%)
                    break
                mid = (lo + hi) / 2
                threshold = 1.0 / (1.0 + math.exp(-mid))
                f = fraction(threshold)
                best = min(best, (abs(f - target), threshold, f))
                if best[0] <= tolerance:
                    break
                if f > target:
                    lo = mid
                else:
                    hi = mid
            for g in found.values():
                g.threshold.fill_(best[1])
            threshold = float(next(iter(found.values())).threshold)  # as stored (float32)
            done = True
    finally:
        if not done:  # a refusal or an interruption leaves the thresholds as they were
            for name, g in found.items():
                g.threshold.copy_(before[name])
    if best[0] > max_error:
        warnings.warn(GateifyWarning(
            f"calibrate reached {best[2]:.3f} of dense FLOPs, not the target {target} (off by {best[0]:.3f} > "
            f"max_error={max_error}): the samples' keep probabilities barely differ, so one threshold switches "
            f"whole blocks at once. Train the gates first (gateify.GateRegularizer), or remove blocks for everyone "
            f"(gateify.select_blocks)."), stacklevel=2)
    return threshold

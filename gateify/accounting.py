"""FLOPs of what actually ran, and calibration of the hard-gate threshold to a FLOPs target.

Counting is done by ``torch.utils.flop_counter.FlopCounterMode`` on real forward passes, so work that a gate
skipped is not counted. Units: **FLOPs** as that counter defines them (2 per multiply-accumulate of a
convolution or matrix product) and **MACs** = FLOPs / 2 (what most papers call "FLOPs"; ResNet-20 at 32x32 is
40.6M MACs = 81.1M FLOPs). Elementwise work (BatchNorm, activations, additions), pooling and the gather/scatter of
real skipping are not counted by either unit.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from itertools import islice
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .conversion import gates, restore_training_flags, training_flags
from .errors import GateifyError, InputShapeError

__all__ = ["BlockFlops", "FlopsReport", "flops", "calibrate", "measure_latency"]

Batches = Union[torch.Tensor, Iterable[Any]]


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
        blocks: per gated block, in execution order.
    """

    dense_flops: float
    executed_flops: float
    gate_flops: float
    samples: int
    input_shape: tuple[int, ...]
    blocks: list[BlockFlops] = field(default_factory=list)

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
        return "\n".join(lines)


def _as_batches(inputs: Batches) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for item in inputs:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"expected a tensor or (tensor, target) batches, got {type(x).__name__}.")
        yield x


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def _modes(model: nn.Module, mode: Optional[str]) -> Iterator[None]:
    """Temporarily put every gate in ``mode`` (``None``: leave as is)."""
    found = gates(model)
    before = {name: g.mode for name, g in found.items()}
    try:
        if mode is not None:
            for g in found.values():
                g.mode = mode
        yield
    finally:
        for name, g in found.items():
            g.mode = before[name]


class _Counter:
    """FlopCounterMode plus per-gate attribution of branch and controller FLOPs and kept samples."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gates = gates(model)
        self.mode = FlopCounterMode(display=False)
        self.branch = {name: 0 for name in self.gates}
        self.controller = {name: 0 for name in self.gates}
        self.kept = {name: 0.0 for name in self.gates}
        self.samples = 0
        self.shape: tuple[int, ...] = ()

    def _attribute(self, module: nn.Module, bucket: dict[str, int], name: str) -> list:
        start: list[int] = []
        pre = module.register_forward_pre_hook(lambda *_: start.append(self.mode.get_total_flops()))

        def post(*_: Any) -> None:
            bucket[name] += self.mode.get_total_flops() - start.pop()

        return [pre, module.register_forward_hook(post)]

    def run(self, batches: Iterable[torch.Tensor]) -> "_Counter":
        handles = []
        for name, gate in self.gates.items():  # branch = whole gate call minus its controller
            handles += self._attribute(gate, self.branch, name)
            handles += self._attribute(gate.controller, self.controller, name)
        device = _device(self.model)
        try:
            with torch.no_grad(), self.mode:
                for x in batches:
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
    """Count FLOPs per sample of ``model`` on ``inputs``, as it runs now (its train/eval state and gate modes).

    Args:
        model: a converted model (or any model: then executed = dense and ``blocks`` is empty).
        inputs: a batch ``(B, C, H, W)``, or an iterable of batches or ``(batch, target)`` pairs (a DataLoader).
        max_batches: count at most this many batches of an iterable.

    Returns:
        A :class:`FlopsReport`. ``dense_flops`` is counted on the first batch with every gate open; executed
        FLOPs on every batch in the current mode, so skipped branches are not counted. Call ``model.eval()`` first
        for the deterministic hard gates of inference. Buffers (BatchNorm statistics) are left as they were.
    """
    batches = list(islice(_as_batches(inputs), max_batches))
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # train() BatchNorm would update statistics
    try:
        with _modes(model, "dense"):
            dense = _Counter(model).run(batches[:1])
        executed = _Counter(model).run(batches)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
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
    )


def _keep_rates(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Per gated block, the fraction of samples its gate kept over ``batches`` (tensors or ``(x, y)`` pairs), in
    the gates' current modes, without gradients."""
    found = gates(model)
    kept = dict.fromkeys(found, 0.0)
    n = 0
    device = _device(model)
    with torch.no_grad():
        for x in _as_batches(batches):
            model(x.to(device))
            n += x.shape[0]
            for name, g in found.items():
                kept[name] += float(g.last.gate.sum())
    if not n:
        raise InputShapeError("no input batch was given to count keep rates on.")
    return {name: k / n for name, k in kept.items()}


def calibrate(model: nn.Module, inputs: Batches, target: float = 0.7, *, max_batches: Optional[int] = None,
              steps: int = 40, tolerance: float = 1e-3) -> float:
    """Choose one hard-gate threshold for every gate so executed FLOPs are ``target`` x dense on ``inputs``.

    No retraining: a bisection on the threshold (executed FLOPs fall as it rises), each step a hard-mode pass over
    the data with the per-block costs counted once by :func:`flops`. Gate overhead counts toward the target. The
    threshold is written into every gate's ``threshold`` buffer, so :func:`gateify.save` keeps it.

    Args:
        target: executed FLOPs as a fraction of dense, e.g. 0.7 for 30% saved.
        inputs: calibration batches (a tensor or a DataLoader); max_batches: use at most this many.
        steps: at most this many bisection steps; tolerance: stop once within this of the target.

    Returns:
        The threshold set.
    """
    found = gates(model)
    if not found:
        raise GateifyError("calibrate needs a converted model; call gateify.convert(model) first.")
    batches = list(islice(_as_batches(inputs), max_batches))
    flags = training_flags(model)
    before = {name: g.threshold.clone() for name, g in found.items()}
    done = False
    model.eval()
    try:
        with _modes(model, "hard"):
            report = flops(model, batches)
            costs = {b.name: b.branch_flops for b in report.blocks}
            fixed = report.dense_flops - sum(costs.values()) + report.gate_flops

            def fraction(threshold: float) -> float:
                for g in found.values():
                    g.threshold.fill_(threshold)
                rates = _keep_rates(model, batches)
                return (fixed + sum(costs[k] * rates[k] for k in found)) / report.dense_flops

            low, high = fraction(0.0), fraction(1.0 + 1e-6)
            if not high <= target <= low:
                raise GateifyError(
                    f"target={target} is out of reach: executed FLOPs range from {high:.3f} (every block skipped; "
                    f"stem, shortcuts, head and gates remain) to {low:.3f} (every block kept, gate overhead "
                    f"included) of dense on this data.")
            # bisect on the logit of the threshold: trained controllers put many samples near p = 0 or 1
            lo, hi = -30.0, 30.0
            best = (abs(low - target), 0.0)
            for _ in range(steps):
                mid = (lo + hi) / 2
                threshold = 1.0 / (1.0 + math.exp(-mid))
                f = fraction(threshold)
                best = min(best, (abs(f - target), threshold))
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
        restore_training_flags(model, flags)
        if not done:  # a refusal or an interruption leaves the thresholds as they were
            for name, g in found.items():
                g.threshold.copy_(before[name])
    return threshold


def measure_latency(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each ``fn`` after ``warmup`` calls, interleaved round-robin so that drift
    (clock, cache, other load) hits every variant alike; CUDA events and synchronisation on a GPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[key].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

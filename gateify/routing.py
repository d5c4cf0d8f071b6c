"""Per-sample depth by routing among static paths: a cascade that shares its computation.

Static depth pruning gives every sample the same blocks. Routing keeps that machinery and lets depth depend on the
sample. ``K`` static selections of one converted model, ``P_0, P_1, ..., P_{K-1}`` (cheapest first; nested when
:func:`select_paths` chooses them, as :func:`gateify.select_blocks` would for ``K`` FLOPs targets), share every
weight. Every sample runs ``P_0`` to the end. The samples whose top softmax probability is low, ``1 - max softmax >=
threshold``, run again on ``P_1``, and so on: a cascade. The deeper pass does not start from the image: the gates
before the first block where ``P_1`` departs from ``P_0`` replay the outputs the first pass computed for those
samples (only the stem and the shortcuts between them run again, on the deeper samples alone), so the two paths'
common part is paid for once. A sample never enters a branch its path skips, and its output is that of the path it
ended on.

A higher threshold sends fewer samples deeper, as for controller gates, so :func:`gateify.calibrate` sets it for a
FLOPs target on validation data.

Training (:class:`RouteLoss`): every batch runs once per path, each copy forced onto its path, and the loss is the
mean over paths of cross-entropy, distillation from the dense teacher and, for every cheaper path, distillation
from the deepest path's own (detached) output, as slimmable networks train their narrower widths: one set of weights
that works at every depth of the cascade, the cheap paths taught by the deep one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GateConfigError
from .gate import GateRecord, ResidualGate, RouteState
from .modes import require_gates, set_mode
from .regularizer import distill_loss
from .static import select_blocks

__all__ = ["RoutePreset", "ROUTE_PRESETS", "route", "select_paths", "routing_paths", "is_routed", "level_shares", "RouteLoss", "RouteTerms",
           "routing_metadata", "route_from_metadata"]


@dataclass(frozen=True)
class RoutePreset:
    """A routing recipe: the paths' FLOPs budgets, the operating point, the self-distillation weight.

    Attributes:
        paths: executed FLOPs fraction of each nested path, cheapest first (:func:`select_paths`' targets).
        target: executed FLOPs fraction :func:`gateify.calibrate` sets the threshold for (between the cheapest and
            the deepest path's).
        self_distill: :class:`RouteLoss`'s distillation of the cheaper paths from the deepest.
    """

    paths: tuple[float, ...]
    target: float
    self_distill: float = 1.0

    def __post_init__(self) -> None:
        if len(self.paths) < 2 or list(self.paths) != sorted(set(self.paths)) or not 0 < self.paths[0]:
            raise GateConfigError(f"paths={self.paths}: at least two increasing executed-FLOPs fractions.")
        if not self.paths[0] <= self.target <= self.paths[-1]:
            raise GateConfigError(f"target={self.target} must lie between the cheapest and the deepest path "
                                  f"{self.paths[0]}..{self.paths[-1]}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Routing's operating points (executed FLOPs fractions; chosen on animals-c's validation split, docs/results.md).
ROUTE_PRESETS: dict[str, RoutePreset] = {
    "aggressive": RoutePreset(paths=(0.22, 0.45, 0.66), target=0.30),
    "balanced": RoutePreset(paths=(0.34, 0.66), target=0.40),
    "conservative": RoutePreset(paths=(0.54, 0.89), target=0.70),
}


def _kept(paths: Sequence[Mapping[str, bool]], names: Sequence[str]) -> list[list[bool]]:
    return [[bool(p.get(name, True)) for name in names] for p in paths]


class _BeginPass:
    """Forward pre-hook of a routed model: a call from outside starts with the cheapest path for every sample."""

    gateify_routing = True  # gateify.to_dense / to_static remove hooks marked so along with the gates

    def __init__(self, state: RouteState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.state.busy:
            self.state.begin()


class _Escalate:
    """Forward hook of a routed model: after the cheapest pass, the deeper passes for the samples still unsure."""

    gateify_routing = True

    def __init__(self, state: RouteState, gates: Sequence[ResidualGate]) -> None:
        self.state = state
        self.gates = list(gates)  # in execution order (index)

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        state = self.state
        if state.busy or state.forced is not None or self.gates[0].mode != "route":
            return output  # a deeper pass, training, or the gates put in another mode (dense, static, hard)
        if not isinstance(output, torch.Tensor) or output.ndim != 2:
            raise GateConfigError(f"a routed model must return class logits (B, classes) to judge how sure a path "
                                  f"is; this one returned {type(output).__name__}.")
        x = args[0]
        batch = x.shape[0]
        logits = output
        level = torch.zeros(batch, dtype=torch.long, device=output.device)
        rows = torch.arange(batch, device=output.device)  # the samples of the last pass, in the original batch
        for k in range(1, state.levels):
            decider = self.gates[state.decisions[k - 1]]
            unsure = 1.0 - logits[rows].detach().float().softmax(1).amax(1)
            picked = (unsure >= decider.threshold).nonzero().view(-1)  # positions within the last pass
            if not picked.numel():
                break
            start = state.decisions[k - 1]
            # the cache holds the last pass's samples: every cached gate before ``start`` is replayed (and cached
            # again, for the picked samples alone), whichever order the paths part in
            replay = {i: t.index_select(0, picked) for i, t in state.cache.items() if i < start}
            replay_until = max(replay, default=-1)
            state.busy = True
            try:
                state.begin(k, replay, replay_until)
                deeper = module(x.index_select(0, rows[picked]))
            finally:
                state.busy = False
            rows = rows[picked]
            logits = logits.index_copy(0, rows, deeper.to(logits.dtype))
            level[rows] = k
        state.level = level
        for gate in self.gates:
            if gate.record:  # the decisions the sample's path made, over the whole batch
                keep = gate.route_keep[level]
                object.__setattr__(gate, "last", GateRecord(None, keep, None, "route", keep))
        return logits


def route(model: nn.Module, paths: Sequence[Mapping[str, bool]]) -> nn.Module:
    """Make a converted model route each sample among static paths; in place, returns ``model``.

    Args:
        model: a converted model (:func:`gateify.convert`) that returns class logits ``(B, classes)``.
        paths: ``K >= 2`` selections ``{block: keep}`` (blocks not named are kept), cheapest first:
            :func:`select_paths` finds nested ones for ``K`` FLOPs targets.

    Every gate is put in mode ``"route"``. Fine-tune with :class:`RouteLoss`, then set the threshold for a FLOPs
    target with :func:`gateify.calibrate` on validation data. :func:`gateify.save` records the paths, and
    :func:`gateify.load` routes the rebuilt model again. The passes are run by forward hooks on ``model``: call the
    model itself (``model(x)``), not ``forward_features``/``forward_head``, to route.
    """
    found = require_gates(model, "route")
    if is_routed(model):
        raise GateConfigError("this model routes already; convert the source model again to route differently.")
    if len(paths) < 2:
        raise GateConfigError(f"routing needs at least 2 paths, got {len(paths)}; one path is static pruning "
                              f"(gateify.set_static).")
    unknown = {name for p in paths for name in p} - set(found)
    if unknown:
        raise GateConfigError(f"paths name unknown blocks {sorted(unknown)}; blocks are {list(found)}.")
    names = list(found)
    kept = _kept(paths, names)
    for k in range(1, len(kept)):
        if kept[k] == kept[k - 1]:
            raise GateConfigError(f"paths {k - 1} and {k} keep the same blocks.")
    gates = sorted(found.values(), key=lambda g: g.index)
    order = [list(found.values()).index(g) for g in gates]  # execution position -> position in ``names``
    # where each deeper path departs from the one before it, in execution order
    decisions = [next(pos for pos, i in enumerate(order) if kept[k][i] != kept[k - 1][i]) for k in range(1, len(kept))]
    state = RouteState(levels=len(paths), cache_at=[d - 1 for d in decisions if d > 0], decisions=decisions)
    for pos, gate in enumerate(gates):  # gate.index is the execution position (gateify.convert numbers them)
        keep = torch.tensor([kept[k][order[pos]] for k in range(len(kept))], device=gate.threshold_bits.device)
        gate.register_buffer("route_keep", keep)
        object.__setattr__(gate, "route_state", state)  # shared by every gate of the model, never a submodule
    model.register_forward_pre_hook(_BeginPass(state))
    model.register_forward_hook(_Escalate(state, gates))
    set_mode(model, "route")
    return model


def is_routed(model: nn.Module) -> bool:
    """Whether :func:`route` was applied to this model."""
    return any(hasattr(g, "route_keep") for g in require_gates(model, "is_routed").values())


def routing_paths(model: nn.Module) -> list[dict[str, bool]]:
    """The nested paths a routed model was set up with, cheapest first (what :func:`route` took)."""
    found = require_gates(model, "routing_paths")
    if not is_routed(model):
        raise GateConfigError("this model does not route; see gateify.route.")
    levels = next(iter(found.values())).route_state.levels
    return [{name: bool(g.route_keep[k]) for name, g in found.items()} for k in range(levels)]


def level_shares(model: nn.Module) -> list[float]:
    """Fraction of the last forward pass's samples that ended on each path, cheapest first."""
    state: RouteState = next(iter(require_gates(model, "level_shares").values())).route_state
    counts = torch.bincount(state.level.flatten().cpu(), minlength=state.levels).float()
    return (counts / counts.sum()).tolist()


def select_paths(model: nn.Module, loader: Iterable, targets: Sequence[float], *,
                 max_batches: Optional[int] = 8) -> list[dict[str, bool]]:
    """Nested paths for :func:`route`, one per FLOPs target (executed fractions, increasing: cheapest first): the
    static selections :func:`gateify.select_blocks` makes for those targets in one greedy run on ``loader``
    (validation ``(images, labels)`` batches), so each path is the static baseline of its budget."""
    require_gates(model, "select_paths")
    targets = [float(t) for t in targets]
    if sorted(targets) != targets or len(set(targets)) != len(targets) or len(targets) < 2:
        raise GateConfigError(f"targets={targets}: give at least two executed-FLOPs fractions in increasing order, "
                              f"e.g. [0.35, 0.65].")
    return select_blocks(model, loader, targets, max_batches=max_batches)


class RouteTerms(NamedTuple):
    """One training step's loss and its parts; ``logits`` are the deepest path's, for accuracy bookkeeping."""

    total: torch.Tensor
    per_path: list[float]
    logits: torch.Tensor


class RouteLoss:
    """The training step of a routed model: every path on every sample (see module doc).

        loss_fn = gateify.RouteLoss(routed, distill_weight=1.0)
        terms = loss_fn(x, y, teacher_logits)      # runs the model once on K copies of x
        terms.total.backward()

    Args:
        model: the routed model (or a DDP wrapper of it), in ``train()``.
        distill_weight, temperature: distillation of every path from the teacher's logits (0: none).
        self_distill: distillation of every cheaper path from the deepest path's detached logits (0: none).
        label_smoothing: of the cross-entropy.
    """

    def __init__(self, model: nn.Module, *, distill_weight: float = 1.0, temperature: float = 2.0,
                 self_distill: float = 1.0, label_smoothing: float = 0.0) -> None:
        self.model = model
        gates = require_gates(model, "RouteLoss")
        if not is_routed(model):
            raise GateConfigError("RouteLoss needs a routed model; call gateify.route(model, paths) first.")
        self.state: RouteState = next(iter(gates.values())).route_state
        self.distill_weight, self.temperature, self.label_smoothing = distill_weight, temperature, label_smoothing
        self.self_distill = self_distill

    def __call__(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> RouteTerms:
        levels, batch = self.state.levels, x.shape[0]
        self.state.forced = torch.arange(levels, device=x.device).repeat_interleave(batch)
        try:
            out = self.model(x.repeat(levels, *([1] * (x.ndim - 1)))).float()
        finally:
            self.state.forced = None
        per_level = out.view(levels, batch, -1)
        deepest = per_level[-1].detach()
        losses = []
        for k in range(levels):
            loss = F.cross_entropy(per_level[k], y, label_smoothing=self.label_smoothing)
            if teacher_logits is not None and self.distill_weight > 0:
                loss = loss + self.distill_weight * distill_loss(per_level[k], teacher_logits.float(), self.temperature)
            if k < levels - 1 and self.self_distill > 0:
                loss = loss + self.self_distill * distill_loss(per_level[k], deepest, self.temperature)
            losses.append(loss)
        total = torch.stack(losses).mean()
        return RouteTerms(total, [float(v.detach()) for v in losses], per_level[-1])


def routing_metadata(model: nn.Module) -> Optional[dict[str, Any]]:
    """What :func:`gateify.load` needs to route a freshly converted model again (``None``: not routed)."""
    require_gates(model, "routing_metadata")
    if not is_routed(model):
        return None
    return {"paths": [sorted(name for name, keep in p.items() if not keep) for p in routing_paths(model)]}


def route_from_metadata(model: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
    """:func:`route` as :func:`routing_metadata` recorded it (each path stored as the blocks it removes)."""
    return route(model, [{name: False for name in removed} for removed in meta["paths"]])

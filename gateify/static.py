"""Static depth pruning: the same blocks removed for every sample. The baseline per-sample gating must beat.

A converted model in ``"static"`` mode runs each block's fixed decision (``gate.static_keep``) with no controller
and no data-dependent shapes; :func:`gateify.to_static` turns it into a plain model without the removed branches.
Which blocks to remove for a FLOPs target is chosen by :func:`select_blocks`:

* ``criterion="loss"``: greedy; each step removes the block whose removal raises the cross-entropy on a
  calibration loader least, until executed FLOPs are at or below the target (so within one block's cost of it;
  ``nearest=True`` keeps the last selection above the target instead when that one is closer).
* ``criterion="keep_rate"``: for a trained gated model, remove the blocks its gates keep least often (hard mode on
  the loader), in that order, until the target is met.

:func:`static_twin` gives a gated model's majority decision per block: the depth its routing implies.
:func:`seed_gates` starts gated fine-tuning from a static selection; :func:`pin_gates` fixes some gates' decisions
for the whole of it (a static floor under per-sample gates, downsampling blocks found by :func:`reshaping_gates`).
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import CostModel, FlopsReport, flops
from .errors import GateifyError
from .modes import (evaluating, gate_mode, keep_rates, model_device, require_gates, restore_training_flags,
                    training_flags)

__all__ = ["set_static", "select_blocks", "static_twin", "static_flops_fraction", "seed_gates", "pin_gates",
           "reshaping_gates"]


def _check_names(keep: Mapping[str, bool], found: Mapping[str, object]) -> None:
    unknown = set(keep) - set(found)
    if unknown:
        raise GateifyError(f"keep names unknown blocks {sorted(unknown)}; blocks are {list(found)}.")


def set_static(model: nn.Module, keep: Mapping[str, bool]) -> nn.Module:
    """Put every gate in ``"static"`` mode with ``keep[block]`` (blocks not named are kept). Returns ``model``."""
    found = require_gates(model, "set_static")
    _check_names(keep, found)
    for name, gate in found.items():
        gate.static_keep.fill_(bool(keep.get(name, True)))
        gate.mode = "static"
    return model


def static_flops_fraction(costs: Union[CostModel, FlopsReport], keep: Mapping[str, bool]) -> float:
    """Executed FLOPs / dense of the static selection ``keep`` (no controller runs in static mode)."""
    model = costs if isinstance(costs, CostModel) else CostModel.from_report(costs)
    return model.static_fraction(keep)


def _loss(model: nn.Module, batches: list, device: torch.device) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device))
            total += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
            n += len(y)
    return total / n


def _removal_order(model: nn.Module, batches: list, costs: CostModel, floor_target: float,
                   criterion: str) -> list[str]:
    """Blocks in the order the selector removes them, until executed FLOPs are at or below ``floor_target``."""
    found = require_gates(model, "select_blocks")
    keep = {name: True for name in found}
    if criterion == "keep_rate":
        with gate_mode(model, "hard"):
            rates = keep_rates(model, batches)
        ranked = sorted(found, key=lambda name: rates[name])
    device = model_device(model)
    order: list[str] = []
    while costs.static_fraction(keep) > floor_target:
        if criterion == "keep_rate":
            victim = next(name for name in ranked if keep[name])
        else:
            trials = {}
            for name in (n for n in found if keep[n]):
                set_static(model, {**keep, name: False})
                trials[name] = _loss(model, batches, device)
            victim = min(trials, key=trials.get)
        keep[victim] = False
        order.append(victim)
    return order


def select_blocks(model: nn.Module, loader: Iterable, target: Union[float, Sequence[float]], *,
                  criterion: str = "loss", max_batches: Optional[int] = 8,
                  nearest: bool = False) -> Union[dict[str, bool], list[dict[str, bool]]]:
    """Which blocks to keep so that executed FLOPs are at most ``target`` x dense (see module doc).

    Args:
        loader: ``(images, labels)`` batches (training or validation data, never the test set); max_batches: how
            many to use.
        target: one FLOPs fraction, or several: then one selection per target from a single greedy run, so the
            selections are nested (a lower target removes every block a higher one removes), as routing among
            paths (:func:`gateify.route`) needs.
        criterion: ``"loss"`` or ``"keep_rate"``.
        nearest: stop at whichever of the last two selections (just above / at or below the target) is closer to
            it, instead of always at or below: for comparisons at equal FLOPs.

    Returns:
        ``{block: keep}`` (a list of them for several targets); the model's modes, decisions and train flags are
        left as they were.
    """
    found = require_gates(model, "select_blocks")
    if criterion not in ("loss", "keep_rate"):
        raise GateifyError(f"criterion={criterion!r}; use 'loss' or 'keep_rate'.")
    targets = [float(target)] if isinstance(target, (int, float)) else [float(t) for t in target]
    batches = list(islice(loader, max_batches))
    if not batches:
        raise GateifyError("select_blocks needs at least one (images, labels) batch.")
    before = {name: (g.mode, bool(g.static_keep)) for name, g in found.items()}
    flags = training_flags(model)
    model.eval()
    try:
        costs = CostModel.from_report(flops(model, [x for x, _ in batches[:1]]))
        floor = costs.static_fraction({name: False for name in found})
        if min(targets) < floor:
            raise GateifyError(f"target={min(targets)} is below {floor:.3f}, the FLOPs left with every block removed.")
        order = _removal_order(model, batches, costs, min(targets), criterion)
    finally:
        for name, gate in found.items():
            gate.mode = before[name][0]
            gate.static_keep.fill_(before[name][1])
        restore_training_flags(model, flags)
    selections = []
    for t in targets:
        keep = {name: True for name in found}
        previous = dict(keep)
        for victim in order:
            if costs.static_fraction(keep) <= t:
                break
            previous = dict(keep)
            keep[victim] = False
        if nearest and abs(costs.static_fraction(previous) - t) < abs(costs.static_fraction(keep) - t):
            keep = previous
        selections.append(keep)
    return selections[0] if isinstance(target, (int, float)) else selections


def static_twin(model: nn.Module, loader: Iterable, *, max_batches: Optional[int] = None) -> dict[str, bool]:
    """Each block's majority hard decision on ``loader``: keep it iff the gate keeps at least half the samples."""
    require_gates(model, "static_twin")
    with gate_mode(model, "hard"):
        rates = keep_rates(model, loader, max_batches=max_batches)
    return {name: rate >= 0.5 for name, rate in rates.items()}


def seed_gates(model: nn.Module, keep: Mapping[str, bool], confidence: float = 0.9) -> nn.Module:
    """Start gated fine-tuning from a static selection: every controller outputs keep probability ``confidence``
    for the blocks in ``keep`` and ``1 - confidence`` for the others, the same for every sample.

    The gated model then begins as the static model (same depth, same FLOPs, at the default threshold 0.5) and can
    only move away from it where per-sample routing lowers the loss. The controller's output weights are zeroed so
    that every sample starts with the same decision; its first layer is untouched.
    """
    found = require_gates(model, "seed_gates")
    if not 0.5 < confidence < 1.0:
        raise GateifyError(f"confidence={confidence} must lie in (0.5, 1).")
    _check_names(keep, found)
    _check_controllers(found, found, "seed_gates")
    logit = float(torch.logit(torch.tensor(confidence)))
    with torch.no_grad():
        for name, gate in found.items():
            gate.controller.fc2.weight.zero_()  # the same logit for every sample; training makes it input-dependent
            gate.controller.fc2.bias.fill_(logit if keep.get(name, True) else -logit)
    return model


#: a pinned controller's constant logit: sigmoid(30) is 1.0 in float32, and the logistic noise of Gumbel sampling
#: exceeds 30 with probability below 1e-13, so a pinned decision does not flip in training either
_PINNED_LOGIT = 30.0


def _check_controllers(found: Mapping[str, nn.Module], names: Iterable[str], needed_by: str) -> None:
    cir = [name for name in names if not found[name].scorer.decides_from_input]
    if cir:
        raise GateifyError(f"{needed_by} sets controllers, and gates {cir[:3]} are CIR gates; convert with "
                           f"gate='controller'.")


def pin_gates(model: nn.Module, decisions: Mapping[str, bool]) -> nn.Module:
    """Fix the decisions of the gates named in ``decisions``: ``True`` keeps every sample, ``False`` skips every
    sample, in every mode but ``"dense"`` and ``"static"``. Each named controller outputs a constant logit (its
    output weights zeroed, its bias +-30) and stops training (``requires_grad=False``), so neither Gumbel sampling
    nor the FLOPs term moves it; the other gates train as before. Returns ``model``.

    The gated recipe that ties static pruning on animals-c (docs/results.md, issue 21) pins shut the blocks a static
    selection removes for three quarters of the target's saving, pins open the downsampling blocks and trains the
    other gates with no keep floor (``GateRegularizer(model, report, RegularizerConfig(target=target))``)::

        floor = gateify.select_blocks(model, val_loader, 1 - 0.75 * (1 - target), nearest=True)
        gateify.pin_gates(model, {**{n: False for n, kept in floor.items() if not kept},
                                  **{n: True for n in gateify.reshaping_gates(model, x) if floor[n]}})

    A pinned-shut block still evaluates its (constant) controller in hard mode and is counted so; ``set_static``
    or ``to_static`` with the same decisions removes it outright. The constant logits are weights and travel with
    :func:`gateify.save`; ``requires_grad`` does not, so pin again before training a loaded model further.
    """
    found = require_gates(model, "pin_gates")
    _check_names(decisions, found)
    _check_controllers(found, decisions, "pin_gates")
    with torch.no_grad():
        for name, keep in decisions.items():
            controller = found[name].controller
            controller.fc2.weight.zero_()
            controller.fc2.bias.fill_(_PINNED_LOGIT if keep else -_PINNED_LOGIT)
            for p in controller.parameters():
                p.requires_grad_(False)
    return model


def reshaping_gates(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The gates whose shortcut has another shape than their block's input, in execution order: a downsampling
    block (a stage's first), whose skip leaves only a projected or zero-padded subsample of the input. Found by one
    forward pass of the example batch ``x`` ``(B, C, H, W)`` as inference runs it (:func:`gateify.evaluating`: training
    flags and gate modes are restored), without gradients."""
    found = require_gates(model, "reshaping_gates")
    reshaping: list[str] = []

    def watch(name: str, gate: nn.Module) -> torch.utils.hooks.RemovableHandle:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            shortcut, inputs, _ = args
            if shortcut.shape != inputs[gate.ctrl_index].shape:
                reshaping.append(name)
        return gate.register_forward_hook(hook)

    hooks = [watch(name, gate) for name, gate in found.items()]
    try:
        with torch.no_grad(), evaluating(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return reshaping

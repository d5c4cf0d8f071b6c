"""Model-wide gate handling without the FX machinery: find the gates, set or scope their modes, keep rates.

Everything here works on any ``nn.Module`` that holds :class:`~gateify.gate.ResidualGate` modules, and looks
through ``DistributedDataParallel`` / ``DataParallel`` wrappers (by type: a model's own submodule that happens to
be called ``module`` is not a wrapper).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .errors import GateConfigError, InputShapeError, NotConvertedError
from .gate import INFERENCE_MODES, MODES, ResidualGate

__all__ = ["unwrap", "gates", "require_gates", "set_mode", "gate_mode", "evaluating", "record_decisions",
           "keep_rates", "training_flags", "restore_training_flags", "model_device", "as_batches", "Batches"]

Batches = Union[torch.Tensor, Iterable[Any]]

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else ``model`` itself."""
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def gates(model: nn.Module) -> "OrderedDict[str, ResidualGate]":
    """Block name -> its gate, in execution order. ``{}`` for a model that is not converted.

    The name is the path of the block that holds the gate (``"layer1.0"``), or the gate's own path for a second
    residual addition in one block. A DDP / DataParallel wrapper is looked through, so names are the same with or
    without it.
    """
    found = [(path, m) for path, m in unwrap(model).named_modules() if isinstance(m, ResidualGate)]
    found.sort(key=lambda item: item[1].index)
    out: OrderedDict[str, ResidualGate] = OrderedDict()
    for path, gate in found:
        out[path.rpartition(".")[0] if gate.primary else path] = gate
    return out


def require_gates(model: nn.Module, needed_by: str) -> "OrderedDict[str, ResidualGate]":
    """:func:`gates`, refusing a model that has none (``needed_by`` names the caller in the message)."""
    found = gates(model)
    if not found and getattr(unwrap(model), "gateify_routed", False):
        raise GateConfigError(f"{needed_by} works on the gates of a converted model, and a routed model has none: it "
                              f"routes each sample among static paths by the cheapest path's confidence. Use "
                              f"routed.path(k) for one path as a plain model, routed.network for the dense network, "
                              f"gateify.calibrate(routed, data, target) to move its threshold.")
    if not found:
        raise NotConvertedError(f"{needed_by} needs a converted model, and this one has no gates; call "
                                f"gateify.convert(model) first.")
    return found


def set_mode(model: nn.Module, mode: str, *, threshold: Optional[Union[float, Mapping[str, float]]] = None,
             tau: Optional[float] = None, noise: Optional[float] = None) -> nn.Module:
    """Set every gate's mode (and optionally its hard threshold, Gumbel temperature, noise scale).

    Args:
        mode: ``"gumbel"`` (training), ``"hard"`` (deterministic inference, real skip), ``"dense"`` (every gate open:
            the source model's output), ``"static"`` (each block's fixed ``static_keep``), or ``"auto"``
            (``gumbel`` in train(), ``hard`` in eval(); the default after :func:`gateify.convert`).
        threshold: keep probability at or above which ``hard`` mode keeps a sample (0 keeps all, >1 skips all);
            one float for every gate or a ``{block name: float}`` dict as keyed by :func:`gates`.
        tau: Gumbel-Softmax temperature. noise: scale of the Gumbel noise (0 = deterministic).

    Returns:
        ``model``, for chaining.
    """
    if mode not in MODES:
        raise GateConfigError(f"mode={mode!r} is not a gate mode; use one of {MODES}.")
    found = require_gates(model, "set_mode")
    thresholds = dict(threshold) if isinstance(threshold, Mapping) else {name: threshold for name in found}
    unknown = set(thresholds) - set(found)
    if unknown:
        raise GateConfigError(f"threshold names unknown blocks {sorted(unknown)}; blocks are {list(found)}.")
    bad = {k: t for k, t in thresholds.items() if t is not None and not t >= 0}
    if bad:
        raise GateConfigError(f"thresholds {bad} must be >= 0 (0 keeps all, >1 skips all).")
    if tau is not None and not tau > 0:
        raise GateConfigError(f"tau={tau} must be > 0.")
    if noise is not None and not noise >= 0:
        raise GateConfigError(f"noise={noise} must be >= 0.")
    for name, gate in found.items():  # validated above: nothing is half-set
        gate.mode = mode
        if thresholds.get(name) is not None:
            gate.threshold.fill_(float(thresholds[name]))
        if tau is not None:
            gate.tau = float(tau)
        if noise is not None:
            gate.noise = float(noise)
    return model


@contextmanager
def gate_mode(model: nn.Module, mode: Optional[str]) -> Iterator[nn.Module]:
    """Every gate in ``mode`` inside the ``with`` block, each back to its own mode after (``None``: unchanged).

        with gateify.gate_mode(gated, "dense"):
            reference = gated(x)                     # the source model's output
    """
    if mode is not None and mode not in MODES:
        raise GateConfigError(f"mode={mode!r} is not a gate mode; use one of {MODES}.")
    found = gates(model)
    before = {name: g.mode for name, g in found.items()}
    try:
        if mode is not None:
            for g in found.values():
                g.mode = mode
        yield model
    finally:
        for name, g in found.items():
            g.mode = before[name]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model as inference runs it, inside the ``with`` block: ``eval()``, and gates in ``"auto"`` or
    ``"gumbel"`` mode in ``"hard"`` mode (``"hard"``, ``"dense"`` and ``"static"`` gates keep theirs). Every
    module's train flag and every gate's mode are restored after."""
    found = gates(model)
    before = {name: g.mode for name, g in found.items()}
    flags = training_flags(model)
    try:
        model.eval()
        for g in found.values():
            if g.mode not in INFERENCE_MODES:
                g.mode = "hard"
        yield model
    finally:
        restore_training_flags(model, flags)
        for name, g in found.items():
            g.mode = before[name]


class record_decisions:
    """Every gate of ``model`` writes a :class:`~gateify.gate.GateRecord` to ``gate.last`` in every mode, as
    ``"gumbel"`` mode always does: what statistics (``gate.last.gate``, the per-sample decisions) are read from.

        with gateify.record_decisions(gated):
            gated(x)
            kept = {name: g.last.gate for name, g in gateify.gates(gated).items()}   # (B,) bool per block

    Outside it, ``"hard"``, ``"dense"`` and ``"static"`` gates leave ``last = None``: a record costs a sigmoid and
    a tensor per gate, which shows at batch 1. Called plainly (``gateify.record_decisions(gated)``) it stays on until
    ``gateify.record_decisions(gated, False)``, like ``torch.set_grad_enabled``; as a context manager it gives every
    gate back its own setting on exit. :func:`gateify.flops`, :func:`keep_rates`, :func:`gateify.calibrate` and
    :func:`gateify.evaluate` turn it on for their own passes.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._before = [(g, g.record) for g in gates(model).values()]
        for g, _ in self._before:
            g.record = bool(enabled)

    def __enter__(self) -> "record_decisions":
        return self

    def __exit__(self, *exc: Any) -> None:
        for g, before in self._before:
            g.record = before


def training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's own train/eval flag: ``model.train(b)`` would overwrite deliberately frozen BatchNorms."""
    return {m: m.training for m in model.modules()}


def restore_training_flags(model: nn.Module, flags: Mapping[nn.Module, bool]) -> None:
    for m in model.modules():
        if m in flags:
            m.training = flags[m]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def as_batches(inputs: Batches, max_batches: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Input tensors from a batch ``(B, ...)`` or an iterable of batches or ``(batch, target)`` pairs."""
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for item in islice(inputs, max_batches):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"expected a tensor or (tensor, target) batches, got {type(x).__name__}.")
        yield x


def keep_rates(model: nn.Module, inputs: Batches, *, max_batches: Optional[int] = None) -> dict[str, float]:
    """Per gated block, the fraction of samples its gate keeps over ``inputs`` (a batch, or a loader of batches or
    ``(x, y)`` pairs), as inference decides (:func:`evaluating`), without gradients."""
    found = require_gates(model, "keep_rates")
    kept = dict.fromkeys(found, 0.0)
    n = 0
    device = model_device(model)
    with torch.no_grad(), evaluating(model), record_decisions(model):
        for x in as_batches(inputs, max_batches):
            model(x.to(device))
            n += x.shape[0]
            for name, g in found.items():
                kept[name] += float(g.last.gate.sum())
    if not n:
        raise InputShapeError("no input batch was given to count keep rates on.")
    return {name: k / n for name, k in kept.items()}

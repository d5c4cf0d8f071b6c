"""The per-sample residual gate: its two kinds of decision, its modes, and the real skip.

A converted block computes ``out = act(S(x) + g * F(x))``. The block's FX graph hands the gate the shortcut
``S(x)``, the tensors the branch ``F`` reads, and the modules/parameters ``F`` uses (fetched from the block at
every call, so the branch never holds a stale reference). The gate decides ``g`` per sample and, in ``"hard"``
mode, runs ``F`` only on the kept sub-batch: skipped samples never enter the branch.

Two kinds of decision (``GateConfig.gate``), each a small module registered in :data:`GATE_KINDS`:

* :class:`Controller` (``"controller"``): a keep logit from the pooled block input, known before ``F`` runs,
  so skipping saves compute;
* :class:`CIRScorer` (``"cir"``): the paper's signal, a keep logit from CIR = 1 - cos(S(x), F(x)); ``F`` must run
  for every sample first, so nothing is saved (kept for comparison).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import fx, nn

from .errors import GateConfigError

__all__ = ["GateConfig", "GateRecord", "ResidualGate", "Controller", "CIRScorer", "cosine_incompatibility",
           "MODES", "INFERENCE_MODES", "GATE_KINDS"]

#: ``auto`` follows ``module.training``: ``gumbel`` in train(), ``hard`` in eval().
MODES = ("auto", "gumbel", "hard", "dense", "static")
#: The modes that make the same decision for a sample every time (what evaluation and FLOPs counting use).
INFERENCE_MODES = ("hard", "dense", "static")


@dataclass(frozen=True)
class GateConfig:
    """How every gate of a converted model is built. Stored with the weights by :func:`gateify.save`.

    Attributes:
        gate: ``"controller"`` (keep decision from the pooled block input; skipping saves compute) or
            ``"cir"`` (paper-faithful: logit from CIR = 1 - cos(S(x), F(x)); F(x) must run first, so nothing is saved).
        hidden: width of the controller MLP (pooled C -> hidden -> 1).
        init_keep: keep probability every gate starts at (sets the controller's output bias).
        tau: Gumbel-Softmax temperature used in ``"gumbel"`` mode.
        noise: scale of the logistic (Gumbel-difference) noise in ``"gumbel"`` mode; 0 gives deterministic
            straight-through decisions identical to ``"hard"`` mode's.
        threshold: ``"hard"`` mode keeps a sample when its keep probability is ``>= threshold``.
    """

    gate: str = "controller"
    hidden: int = 32
    init_keep: float = 0.95
    tau: float = 1.0
    noise: float = 1.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.gate not in GATE_KINDS:
            raise GateConfigError(f"gate={self.gate!r} is not a gate kind; use one of {tuple(GATE_KINDS)}.")
        if self.hidden < 1:
            raise GateConfigError(f"hidden={self.hidden} must be a positive controller width.")
        if not 0.0 < self.init_keep < 1.0:
            raise GateConfigError(f"init_keep={self.init_keep} must lie strictly between 0 and 1.")
        if self.tau <= 0:
            raise GateConfigError(f"tau={self.tau} must be > 0 (Gumbel-Softmax temperature).")
        if self.noise < 0:
            raise GateConfigError(f"noise={self.noise} must be >= 0.")
        if self.threshold < 0:
            raise GateConfigError(f"threshold={self.threshold} must be >= 0 (0 keeps all, >1 skips all).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GateConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise GateConfigError(f"unknown gate config keys {sorted(unknown)}; known keys are {sorted(known)}.")
        return cls(**values)


class GateRecord(NamedTuple):
    """What a gate saw in its last forward pass, for losses and statistics (all shaped ``(B,)``).

    ``keep_prob`` is the deterministic keep probability (with gradient in ``"gumbel"`` mode), ``gate`` the value
    that multiplied the branch (straight-through sample in ``"gumbel"``, a bool mask in ``"hard"``, 0/1 otherwise),
    ``cir`` the cosine incompatibility ratio where F(x) ran for the whole batch (``None`` where it did not),
    ``mode`` the mode that produced the record, ``decision`` the noiseless decision hard mode would make (in
    ``"gumbel"``: with a straight-through gradient of constant slope ``1 / (4 tau)`` in the logit; equal to ``gate``
    in value when the noise scale is 0).
    """

    keep_prob: Optional[torch.Tensor]
    gate: torch.Tensor
    cir: Optional[torch.Tensor]
    mode: str
    decision: torch.Tensor


def cosine_incompatibility(shortcut: torch.Tensor, branch: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CIR = 1 - cos(S(x), F(x)) per sample, over all non-batch dims: ``(B, ...) x (B, ...) -> (B,)`` in [0, 2].

    eps-guarded: a branch that outputs exactly 0 (timm's ``zero_init_last``) gives cos = 0, CIR = 1.
    """
    s = shortcut.flatten(1).float()
    f = branch.flatten(1).float()
    cos = (s * f).sum(1) / (s.norm(dim=1) * f.norm(dim=1)).clamp_min(eps)
    return 1.0 - cos


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class Controller(nn.Module):
    """Keep logit from the block input: global average pool -> Linear(C, hidden) -> ReLU -> Linear(hidden, 1).

    ``(B, C, *spatial) -> (B,)`` float32. The output layer starts at zero weight and bias ``logit(init_keep)``, so a
    freshly converted model keeps every sample and computes exactly what the source model computes. It runs in
    float32 even under autocast: a decision must not flip because the features were rounded to bfloat16.
    """

    #: the decision is known before the branch runs, so a skipped sample costs no branch compute
    decides_from_input = True
    attr = "controller"

    def __init__(self, channels: int, config: GateConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, config.hidden)
        self.fc2 = nn.Linear(config.hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, _logit(config.init_keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pooled = x.float().mean(tuple(range(2, x.ndim))) if x.ndim > 2 else x.float()
            # functional calls: this runs once per block and batch, and module-call overhead shows at batch 1
            hidden = F.relu(F.linear(pooled, self.fc1.weight.float(), self.fc1.bias.float()))
            return F.linear(hidden, self.fc2.weight.float(), self.fc2.bias.float()).view(-1)

    def keep_logit(self, x: torch.Tensor, shortcut: torch.Tensor, branch: Optional[torch.Tensor]) -> torch.Tensor:
        """From the branch input ``x``, detached: gate losses train the controller, never the features it reads
        (a FLOPs penalty flowing into the backbone would warp its representations to move decisions)."""
        return self(x.detach())


class CIRScorer(nn.Module):
    """Keep logit ``scale * (CIR - offset)`` from CIR = 1 - cos(S(x), F(x)): ``(B,) -> (B,)``.

    The paper's reading: a branch orthogonal to its input (high CIR) adds information, so keep it. The signal needs
    F(x), so this kind cannot save compute; its inputs are detached, so gate losses move only ``scale``/``offset``.
    """

    decides_from_input = False
    attr = "cir"

    def __init__(self, channels: int, config: GateConfig) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.offset = nn.Parameter(torch.tensor(0.5))

    def forward(self, cir: torch.Tensor) -> torch.Tensor:
        return self.scale * (cir - self.offset)

    def keep_logit(self, x: torch.Tensor, shortcut: torch.Tensor, branch: Optional[torch.Tensor]) -> torch.Tensor:
        return self(cosine_incompatibility(shortcut.detach(), branch.detach()))


#: ``GateConfig.gate`` -> the module that computes the keep logit (registered on the gate under its ``attr``).
GATE_KINDS: dict[str, type[nn.Module]] = {"controller": Controller, "cir": CIRScorer}


def _per_sample(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> broadcastable against ``like`` ``(B, ...)`` in its dtype."""
    return g.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@register_notrace_module  # timm's FX feature extraction calls a gate as a whole: it skips by data-dependent shapes
class ResidualGate(nn.Module):
    """Gated residual ``S(x) + g * F(x)`` for one block, ``g`` per sample.

    Called by the converted block's graph as ``gate(shortcut, inputs, params)``: ``shortcut`` is S(x) ``(B, C, H, W)``,
    ``inputs`` the tensors the branch reads (batched ones marked in ``batched``), ``params`` the modules and
    tensors the branch uses, owned by the block. ``branch(*inputs, *params)`` computes F.

    Modes (see :func:`gateify.set_mode`):
        ``dense``: ``S + F`` for every sample, the source model's computation.
        ``gumbel``: F on the full batch; ``g`` is a straight-through Gumbel-Softmax sample (training).
        ``hard``: ``g = [p >= threshold]``; with a :class:`Controller`, F runs on the kept sub-batch only
            (gather -> F -> scatter-add), not at all when nobody is kept.
        ``static``: the block's fixed decision ``static_keep`` for every sample; no controller runs.
        ``auto``: ``gumbel`` in train(), ``hard`` in eval().

    The hard threshold is stored as the int32 bits of a float32 (``threshold_bits``; ``threshold`` is a float view
    of it, writable in place): it is a decision rule, not a weight, so EMA and SWA averaging, which average floating
    buffers only, and ``model.half()`` leave it exactly as calibrated.
    """

    def __init__(
        self,
        branch: Callable[..., torch.Tensor],
        channels: int,
        batched: Sequence[bool],
        config: GateConfig,
        ctrl_index: int = 0,
    ) -> None:
        super().__init__()
        if not any(batched):
            raise GateConfigError("a residual branch must read at least one batched tensor.")
        self.branch = branch
        self.config = config
        self.batched = tuple(bool(b) for b in batched)
        self.ctrl_index = ctrl_index
        kind = GATE_KINDS[config.gate]
        self.add_module(kind.attr, kind(channels, config))
        self._scorer_attr = kind.attr
        self.register_buffer("threshold_bits", torch.tensor(float(config.threshold)).view(torch.int32))
        self.register_buffer("static_keep", torch.tensor(True))
        self.mode = "auto"
        self.owns_shortcut = False  # set by gateify.convert when nothing but this addition reads the shortcut
        self.primary = True  # the block's first gate, named after the block by gateify.gates(); set by convert
        self.index = 0  # execution order among the model's gates; set by gateify.convert
        self.tau = config.tau
        self.noise = config.noise
        self.last: Optional[GateRecord] = None

    @property
    def scorer(self) -> nn.Module:
        """The module that computes the keep logit: a :class:`Controller` or a :class:`CIRScorer`."""
        return getattr(self, self._scorer_attr)

    @property
    def threshold(self) -> torch.Tensor:
        """The hard threshold as a float32 scalar tensor viewing ``threshold_bits`` (``fill_`` writes through)."""
        return self.threshold_bits.view(torch.float32)

    def extra_repr(self) -> str:
        return f"gate={self.config.gate!r}, mode={self.mode!r}, threshold={float(self.threshold):.4g}"

    @property
    def effective_mode(self) -> str:
        if self.mode == "auto":
            return "gumbel" if self.training else "hard"
        return self.mode

    def _run_branch(self, *args: Any) -> torch.Tensor:
        # forward() directly: the branch is stateless and module-call overhead shows at batch 1; FLOPs accounting
        # attributes the branch as gate minus scorer, so no hook on it is needed
        return self.branch.forward(*args)

    def _threshold_shift(self) -> torch.Tensor:
        # keep <=> sigmoid(logit) >= threshold <=> logit - logit(threshold) >= 0
        t = self.threshold.clamp(1e-6, 1 - 1e-6)
        return torch.log(t) - torch.log1p(-t)

    def _record(self, mode: str, keep_prob: Optional[torch.Tensor], gate: torch.Tensor,
                cir: Optional[torch.Tensor], decision: Optional[torch.Tensor] = None) -> None:
        if not torch.compiler.is_exporting():  # an exported program must not leave fake tensors on the module
            # plain attribute write: nn.Module.__setattr__ costs more than the rest of a gate at batch 1
            record = GateRecord(keep_prob, gate, cir, mode, gate if decision is None else decision)
            object.__setattr__(self, "last", record)

    def forward(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        if isinstance(shortcut, fx.Proxy):
            # traced by an FX tracer that does not know gates (torchvision's create_feature_extractor): a skip
            # decision cannot be traced, so record the gate as one module call, as a leaf would be
            tracer = shortcut.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (shortcut, inputs, params), {})
        mode = self.effective_mode
        if mode == "dense":
            self._record("dense", None, shortcut.new_ones(shortcut.shape[0]), None)
            return self._add(shortcut, self._run_branch(*inputs, *params))
        if mode == "static":
            return self._static(shortcut, inputs, params)
        if mode == "gumbel":
            return self._gumbel(shortcut, inputs, params)
        if mode == "hard":
            if self.scorer.decides_from_input:
                return self._hard(shortcut, inputs, params)
            return self._hard_masked(shortcut, inputs, params)
        raise GateConfigError(f"gate mode {self.mode!r} is not one of {MODES}; use gateify.set_mode.")

    def _static(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise GateConfigError("a gated model in 'static' mode cannot be exported: its decisions live in buffers. "
                                  "Export gateify.to_static(model) instead: the same computation, no gates.")
        keep = bool(self.static_keep)
        ones = shortcut.new_full((shortcut.shape[0],), float(keep))
        self._record("static", None, ones, None)
        if keep:
            return self._add(shortcut, self._run_branch(*inputs, *params))
        return self._alone(shortcut)

    def _gumbel(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        branch = self._run_branch(*inputs, *params)
        cir = cosine_incompatibility(shortcut.detach(), branch.detach())
        raw = self.scorer.keep_logit(inputs[self.ctrl_index], shortcut, branch)
        logit = raw - self._threshold_shift()  # >= 0 exactly where hard mode keeps
        # what hard mode would decide, for the FLOPs terms; its gradient is the sigmoid's slope at the threshold for
        # every sample, so it never vanishes: a budget can still move a block that every sample skips (or keeps)
        decision = (logit >= 0).to(logit.dtype) + (logit - logit.detach()) / (4 * self.tau)
        g = self._straight_through(logit)
        if self.noise > 0:
            u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
            g = self._straight_through(logit + self.noise * (torch.log(u) - torch.log1p(-u)))  # logistic noise
        self._record("gumbel", torch.sigmoid(raw), g, cir, decision)
        return shortcut + _per_sample(g, branch) * branch

    def _straight_through(self, z: torch.Tensor) -> torch.Tensor:
        """``1[z >= 0]`` in the forward pass, ``sigmoid(z / tau)``'s gradient in the backward pass."""
        soft = torch.sigmoid(z / self.tau)
        return (z >= 0).to(soft.dtype) + (soft - soft.detach())

    def _hard_masked(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        # The decision needs F(x), so F ran for every sample already: this masks, it cannot save compute.
        branch = self._run_branch(*inputs, *params)
        cir = cosine_incompatibility(shortcut, branch)
        p = torch.sigmoid(self.scorer(cir))
        keep = (p >= self.threshold).to(p.dtype)
        self._record("hard", p, keep, cir)
        return shortcut + _per_sample(keep, branch) * branch

    def _hard(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        if torch.jit.is_tracing():  # a trace would bake the example's decisions in and be silently wrong
            raise GateConfigError("hard gates make data-dependent decisions that torch.jit.trace and the legacy ONNX "
                                  "exporter freeze to the example input. Use torch.export.export / "
                                  "torch.onnx.export(..., dynamo=True), or export gateify.to_static(model).")
        x = inputs[self.ctrl_index]
        p = torch.sigmoid(self.scorer(x))
        keep = p >= self.threshold  # p lies in [0, 1]: threshold 0 keeps all, > 1 skips all
        self._record("hard", p, keep, None)
        if torch.compiler.is_exporting():
            return self._hard_export(shortcut, inputs, params, keep)
        idx = keep.nonzero().squeeze(1)  # the one host sync real skipping needs
        n = idx.numel()
        if n == keep.numel():
            return self._add(shortcut, self._run_branch(*inputs, *params))
        if n == 0:
            return self._alone(shortcut)
        sub = [t.index_select(0, idx) if b else t for t, b in zip(inputs, self.batched)]
        return self._scatter(shortcut, idx, self._run_branch(*sub, *params))

    # Large activations are mmapped by the allocator, so a fresh buffer per block costs page faults that show as a
    # few percent of latency. Without autograd, write into a buffer that is ours, as the original `x += shortcut`
    # does; `owns_shortcut` (set by the conversion) says the shortcut tensor is consumed by this addition alone.

    @staticmethod
    def _writable(t: torch.Tensor) -> bool:
        compiling = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # graphs must stay functional
        return not (compiling or t.requires_grad) and t._base is None

    def _add(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self._writable(branch) and branch.dtype == torch.promote_types(branch.dtype, shortcut.dtype):
            return branch.add_(shortcut)
        return shortcut + branch

    def _alone(self, shortcut: torch.Tensor) -> torch.Tensor:
        if self.owns_shortcut and self._writable(shortcut):
            return shortcut
        return shortcut.clone()  # the post-add activation may be in-place: never hand out the block input

    def _scatter(self, shortcut: torch.Tensor, idx: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(shortcut.dtype, branch.dtype)
        if self.owns_shortcut and shortcut.dtype == dtype and self._writable(shortcut):
            return shortcut.index_add_(0, idx, branch.to(dtype))
        return shortcut.to(dtype).index_add(0, idx, branch.to(dtype))

    def _hard_export(self, shortcut: torch.Tensor, inputs: tuple, params: tuple, keep: torch.Tensor) -> torch.Tensor:
        """The same skip for ``torch.export``: a ``torch.cond`` on 'anyone kept', a data-dependent sub-batch inside."""

        def run_kept(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            idx = keep.nonzero().squeeze(1)
            torch._check(idx.shape[0] > 0)  # true on this side of the cond; lets shape guards on F resolve
            sub = [t.index_select(0, idx) if b else t for t, b in zip(tensors, self.batched)]
            # both sides of a cond must agree in dtype: keep the shortcut's, as skip_all does (matters under AMP)
            return shortcut.index_add(0, idx, self._run_branch(*sub, *params).to(shortcut.dtype))

        def skip_all(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            return shortcut.clone()

        return torch.cond(keep.any(), run_kept, skip_all, (shortcut, keep, *inputs))

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

Cost (docs/latency.md): in eager ``"hard"`` mode a gate compares the controller's logit with the threshold's logit
(:func:`keep_cut`, computed once per threshold value) instead of taking a sigmoid, decides a batch of one on the
host (one sync, no index ops), and writes no :class:`GateRecord` unless asked to (``record``). Under
:func:`gateify.compile` and ``torch.export`` the same skip is a ``torch.cond``, so the model stays one graph.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import fx, nn

from .errors import GateConfigError

__all__ = ["GateConfig", "GateRecord", "ResidualGate", "Controller", "CIRScorer", "cosine_incompatibility",
           "keep_cut", "MODES", "INFERENCE_MODES", "GATE_KINDS"]

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


# float32 values in order as integers: non-negative floats are their bits, negative ones minus their magnitude's bits
_INF_KEY = 0x7F800000  # +inf; -_INF_KEY is -inf, and every key in between is a number (no NaN)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (returned as a Python float, exactly)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_from_key(key: int) -> float:
    bits = key if key >= 0 else (-key) | 0x80000000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _f32_from_bits(bits: int) -> float:
    """The float32 whose int32 bit pattern is ``bits`` (as ``threshold_bits`` stores it)."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _sigmoid_f32(x: float) -> float:
    """sigmoid(x) in float64, rounded to float32: the keep probability a float32 logit ``x`` stands for."""
    if x >= 0:
        return _f32(1.0 / (1.0 + math.exp(-x)))
    e = math.exp(x)
    return _f32(e / (1.0 + e))


def keep_cut(threshold: float) -> float:
    """The logit cut of a hard threshold: for every float32 logit ``z``, ``z >= keep_cut(t)`` iff
    ``sigmoid(z) >= t``, with sigmoid rounded to float32 (so ``t = 1`` keeps logits whose probability rounds to 1).

    ``-inf`` for ``t <= 0`` (every sample kept, even a logit of ``-inf``); NaN for ``t > 1`` or NaN (nothing compares
    ``>=`` NaN: every sample skipped; a NaN logit is skipped at any threshold, as ``sigmoid(NaN) >= t`` is false).
    The cut is a float32 value, so a float32 tensor compared with it and its ``.item()`` compared in Python agree.
    A bisection over the 2^32 float32 values (32 steps): computed once per threshold value, not per call.
    """
    if not threshold > 0:
        return -math.inf if threshold <= 0 else math.nan
    if threshold > 1:
        return math.nan
    lo, hi = -_INF_KEY, _INF_KEY  # sigmoid(-inf) = 0 < threshold <= 1 = sigmoid(+inf): the cut lies in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _sigmoid_f32(_f32_from_key(mid)) >= threshold:
            hi = mid
        else:
            lo = mid
    return _f32_from_key(hi)


# (spatial size, device, dtype) -> a vector of 1 / size: pooling one sample as a matrix-vector product
_POOL_WEIGHTS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _pool_weights(size: int, device: torch.device) -> torch.Tensor:
    key = (size, device, torch.float32)
    w = _POOL_WEIGHTS.get(key)
    if w is None:
        with torch.inference_mode(False):  # a normal tensor even when first needed under inference_mode
            w = _POOL_WEIGHTS[key] = torch.full((size,), 1.0 / size, device=device)
    return w


def _as_matrix(x: torch.Tensor) -> Optional[torch.Tensor]:
    """One sample ``(1, C, H, W)`` as a ``(C, H * W)`` view, in NCHW or channels_last alike; ``None`` where H and W
    do not collapse into one stride (a strided slice) or the input is not 4-d."""
    if x.ndim != 4:
        return None
    if x.is_contiguous():
        return x.view(x.shape[1], -1)
    _, c, h, w = x.shape
    _, sc, sh, sw = x.stride()
    if w == 1:
        inner = sh
    elif h == 1 or sh == sw * w:
        inner = sw
    else:
        return None
    return x.as_strided((c, h * w), (sc, inner), x.storage_offset())


class Controller(nn.Module):
    """Keep logit from the block input: global average pool -> Linear(C, hidden) -> ReLU -> Linear(hidden, 1).

    ``(B, C, *spatial) -> (B,)`` float32. The output layer starts at zero weight and bias ``logit(init_keep)``, so a
    freshly converted model keeps every sample and computes exactly what the source model computes. It runs in
    float32 even under autocast: a decision must not flip because the features were rounded to bfloat16.

    Four kernels, no module calls: pool, linear + in-place ReLU, linear. A float32 sample alone (batch 1, eager) is
    pooled by a matrix-vector product on a view of it instead of a reduction, and its layers are ``addmv``: several
    microseconds cheaper per block on a CPU; its logit equals the batched one to float32 rounding.

    ``channel_dim`` is the input's channel axis: 1 for ``(B, C, H, W)``; -1 for channels-last activations, the
    ``(B, N, C)`` tokens of a ViT or the ``(B, H, W, C)`` maps of a Swin (``gateify.convert`` sets it per block),
    which are pooled over tokens or positions the same way, through a ``(B, C, ...)`` view.
    """

    #: the decision is known before the branch runs, so a skipped sample costs no branch compute
    decides_from_input = True
    attr = "controller"
    channel_dim: int = 1

    def __init__(self, channels: int, config: GateConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, config.hidden)
        self.fc2 = nn.Linear(config.hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, _logit(config.init_keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # entering autocast costs more than the controller itself: only where some autocast is on
        if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._logit(x)
        return self._logit(x)

    def _logit(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim != 1:
            x = x.movedim(self.channel_dim, 1)  # (B, ..., C) -> a (B, C, ...) view
        # the parameter dicts directly: nn.Module.__getattr__ costs ~0.7 us a lookup on a CPU, and this made 8
        p1, p2 = self._modules["fc1"]._parameters, self._modules["fc2"]._parameters
        w1, b1, w2, b2 = p1.get("weight"), p1.get("bias"), p2.get("weight"), p2.get("bias")
        if w1 is None or b1 is None or w2 is None or b2 is None:  # parametrized (weight_norm, ...): properties
            w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        if w1.dtype is not torch.float32:  # after model.half(): decide in float32 all the same
            w1, b1, w2, b2 = w1.float(), b1.float(), w2.float(), b2.float()
        if not torch.compiler.is_compiling() and x.shape[0] == 1 and x.dtype is torch.float32:  # no guard in graphs
            m = _as_matrix(x)
            if m is not None:  # addmv: gateify.flops counts it (torch's FLOP counter does not by default)
                pooled = torch.mv(m, _pool_weights(m.shape[1], x.device))  # (C,)
                return torch.addmv(b2, w2, torch.addmv(b1, w1, pooled).relu_())  # (1,)
        # mean(dtype=float32) accumulates a bfloat16 input in float32 without a float32 copy of the activation
        pooled = x.mean(tuple(range(2, x.ndim)), dtype=torch.float32) if x.ndim > 2 else x.float()  # (B, C)
        return F.linear(F.linear(pooled, w1, b1).relu_(), w2, b2).view(-1)  # (B, hidden) -> (B,)

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


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``(n,)`` of ``t`` ``(B, ...) -> (n, ...)``, in ``t``'s memory format. ``index_select`` writes
    contiguous rows, which would turn a channels_last block into an NCHW one (slower convolutions, and an output in
    another layout than dense mode's), so a channels_last tensor is gathered through its NHWC view: no extra copy."""
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    if t.ndim == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t.permute(0, 2, 3, 4, 1).index_select(0, idx).permute(0, 4, 1, 2, 3)
    return t.index_select(0, idx)


def _index_add_(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[idx] += src`` in place (``out`` ``(B, ...)``, ``src`` ``(n, ...)``), returns ``out``. On a channels_last
    tensor ``index_add_`` goes element by element (7-10x slower on a CPU), so it adds through the NHWC views."""
    if out.ndim == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
        out.permute(0, 2, 3, 1).index_add_(0, idx, src.permute(0, 2, 3, 1))
        return out
    if out.ndim == 5 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last_3d):
        out.permute(0, 2, 3, 4, 1).index_add_(0, idx, src.permute(0, 2, 3, 4, 1))
        return out
    return out.index_add_(0, idx, src)


@register_notrace_module  # timm's FX feature extraction calls a gate as a whole: it skips by data-dependent shapes
class ResidualGate(nn.Module):
    """Gated residual ``S(x) + g * F(x)`` for one block, ``g`` per sample.

    Called by the converted block's graph as ``gate(shortcut, inputs, params)``: ``shortcut`` is S(x) ``(B, C, H, W)``,
    ``inputs`` the tensors the branch reads (batched ones marked in ``batched``), ``params`` the modules and
    tensors the branch uses, owned by the block. ``branch(*inputs, *params)`` computes F.

    Modes (see :func:`gateify.set_mode`):
        ``dense``: ``S + F`` for every sample, the source model's computation.
        ``gumbel``: F on the full batch; ``g`` is a straight-through Gumbel-Softmax sample (training).
        ``hard``: ``g = [sigmoid(logit) >= threshold]``, decided as ``logit >= keep_cut(threshold)``; with a
            :class:`Controller`, F runs on the kept sub-batch only (gather -> F -> scatter-add), on the whole batch
            without a gather when every sample is kept, not at all when none is.
        ``static``: the block's fixed decision ``static_keep`` for every sample; no controller runs.
        ``auto``: ``gumbel`` in train(), ``hard`` in eval().

    The output keeps the memory format of the tensors it is made from (a channels_last model stays channels_last
    whatever the decisions). Under ``torch.export`` and :func:`gateify.compile` a hard gate is a ``torch.cond``
    (``_hard_cond``), so the whole model is one graph; under plain ``torch.compile`` dynamo breaks the graph at
    the decision.

    Statistics: ``last`` is the :class:`GateRecord` of the last forward pass. ``"gumbel"`` mode always writes it
    (the regulariser reads it); the other modes only while ``record`` is true (:func:`gateify.record_decisions`),
    and otherwise leave ``None``, so inference pays for no record.

    The hard threshold is stored as the int32 bits of a float32 (``threshold_bits``; ``threshold`` is a float view
    of it, writable in place): it is a decision rule, not a weight, so EMA averaging that averages floating buffers
    only (``timm.utils.ModelEmaV3``) and ``model.half()`` leave it exactly as calibrated (SWA: see docs/stack.md). The gate reads it at every call (a host read
    of 4 bytes on a CPU; on other devices the rule runs on the device, see :meth:`_keep_cut`), so ``fill_``,
    :func:`gateify.set_mode`, :func:`gateify.calibrate` and ``load_state_dict`` take effect at the next call.
    """

    # class-level defaults, so that a gate pickled before these attributes existed still runs
    #: write a :class:`GateRecord` to ``last`` in every mode, not only in ``"gumbel"``
    record: bool = False
    _cut_bits: Optional[int] = None  # the threshold bits that ``_cut`` was computed from
    _cut: float = math.nan

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
        self.record = False
        self.last: Optional[GateRecord] = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy or a pickle starts without the last forward pass: a training record holds autograd tensors, which
        # deepcopy refuses (an EMA or a best-model snapshot taken mid-training would fail)
        state = super().__getstate__()
        state["last"] = None
        return state

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
        branch = self._modules.get("branch")  # a dict lookup: nn.Module.__getattr__ costs ~0.7 us on a CPU
        return (branch if branch is not None else self.branch).forward(*args)

    def _threshold_shift(self) -> torch.Tensor:
        # keep <=> sigmoid(logit) >= threshold <=> logit - logit(threshold) >= 0
        t = self.threshold.clamp(1e-6, 1 - 1e-6)
        return torch.log(t) - torch.log1p(-t)

    def _keep_cut(self) -> Optional[float]:
        """:func:`keep_cut` of the current threshold; ``None`` where the threshold is not in host memory.

        The threshold's 4 bytes are read at every call (0.3 us on a CPU) and the cut recomputed only when they
        changed: a version counter would miss writes made under ``torch.inference_mode``. On a GPU that read would
        be a second sync per gate, so there the rule runs on the device as ``sigmoid(logit) >= threshold``.
        """
        bits = self._buffers["threshold_bits"]
        if not bits.is_cpu:
            return None
        value = bits.item()
        if value != self._cut_bits:
            state = self.__dict__  # plain attributes: nn.Module.__setattr__ is slow, and these are no state
            state["_cut"] = keep_cut(_f32_from_bits(value))
            state["_cut_bits"] = value
        return self._cut

    def _record(self, mode: str, keep_prob: Optional[torch.Tensor], gate: torch.Tensor,
                cir: Optional[torch.Tensor], decision: Optional[torch.Tensor] = None) -> None:
        if not torch.compiler.is_exporting():  # an exported program must not leave fake tensors on the module
            # plain attribute write: nn.Module.__setattr__ costs more than the rest of a gate at batch 1
            record = GateRecord(keep_prob, gate, cir, mode, gate if decision is None else decision)
            object.__setattr__(self, "last", record)

    def _forget(self) -> None:
        """No record of this call: drop the previous one, so that ``last`` never describes another forward pass."""
        if self.last is not None and not torch.compiler.is_compiling():
            object.__setattr__(self, "last", None)

    def forward(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        if isinstance(shortcut, fx.Proxy):
            # traced by an FX tracer that does not know gates (torchvision's create_feature_extractor): a skip
            # decision cannot be traced, so record the gate as one module call, as a leaf would be
            tracer = shortcut.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (shortcut, inputs, params), {})
        mode = self.mode
        if mode == "auto":
            mode = "gumbel" if self.training else "hard"
        if mode == "hard":
            scorer = self._modules[self._scorer_attr]
            if scorer.decides_from_input:
                return self._hard(shortcut, inputs, params, scorer)
            return self._hard_masked(shortcut, inputs, params)
        if mode == "dense":
            if self.record:
                self._record("dense", None, shortcut.new_ones(shortcut.shape[0]), None)
            else:
                self._forget()
            return self._add(shortcut, self._run_branch(*inputs, *params))
        if mode == "static":
            return self._static(shortcut, inputs, params)
        if mode == "gumbel":
            return self._gumbel(shortcut, inputs, params)
        raise GateConfigError(f"gate mode {self.mode!r} is not one of {MODES}; use gateify.set_mode.")

    def _static(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise GateConfigError("a gated model in 'static' mode cannot be exported: its decisions live in buffers. "
                                  "Export gateify.to_static(model) instead: the same computation, no gates.")
        keep = bool(self.static_keep)
        if self.record:
            self._record("static", None, shortcut.new_full((shortcut.shape[0],), float(keep)), None)
        else:
            self._forget()
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
        if self.record:
            self._record("hard", p, keep, cir)
        else:
            self._forget()
        return shortcut + _per_sample(keep, branch) * branch

    def _hard(self, shortcut: torch.Tensor, inputs: tuple, params: tuple, scorer: nn.Module) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.compile or torch.export: decisions stay tensors in the graph
            return self._hard_graph(shortcut, inputs, params)
        if torch._C._get_tracing_state():  # jit.trace would bake the example's decisions in and be silently wrong
            raise GateConfigError("hard gates make data-dependent decisions that torch.jit.trace and the legacy ONNX "
                                  "exporter freeze to the example input. Use torch.export.export / "
                                  "torch.onnx.export(..., dynamo=True), or export gateify.to_static(model).")
        logit = scorer(inputs[self.ctrl_index])  # (B,) float32; a module call, so hooks on the controller see it
        cut = self._keep_cut()
        if self.record or cut is None:
            keep = logit >= cut if cut is not None else torch.sigmoid(logit) >= self.threshold
            if self.record:
                self._record("hard", torch.sigmoid(logit), keep, None)
            else:
                self._forget()
            return self._skip(shortcut, inputs, params, keep)
        if self.last is not None:
            self._forget()
        if logit.shape[0] == 1:  # a sample alone: decided on the host, one sync, no index ops
            if logit.item() >= cut:
                return self._add(shortcut, self._run_branch(*inputs, *params))
            return self._alone(shortcut)
        return self._skip(shortcut, inputs, params, logit >= cut)

    def _skip(self, shortcut: torch.Tensor, inputs: tuple, params: tuple, keep: torch.Tensor) -> torch.Tensor:
        """``S + F`` for the samples ``keep`` ``(B,)`` marks, ``S`` for the others: F on the whole batch when every
        sample is kept (no gather), on none when none is, else gather -> F -> scatter-add."""
        if keep.shape[0] == 1:
            return self._add(shortcut, self._run_branch(*inputs, *params)) if keep.item() else self._alone(shortcut)
        idx = keep.nonzero()  # (n, 1): the one host sync real skipping needs
        n = idx.shape[0]
        if n == keep.shape[0]:
            return self._add(shortcut, self._run_branch(*inputs, *params))
        if n == 0:
            return self._alone(shortcut)
        idx = idx.view(-1)
        sub = [_gather(t, idx) if b else t for t, b in zip(inputs, self.batched)]
        return self._scatter(shortcut, idx, self._run_branch(*sub, *params))

    # Large activations are mmapped by the allocator, so a fresh buffer per block costs page faults that show as a
    # few percent of latency. Without autograd, write into a buffer that is ours, as the original `x += shortcut`
    # does; `owns_shortcut` (set by the conversion) says the shortcut tensor is consumed by this addition alone.

    @staticmethod
    def _writable(t: torch.Tensor) -> bool:
        compiling = torch.compiler.is_compiling()  # graphs (torch.compile, torch.export) must stay functional
        return not (compiling or t.requires_grad) and t._base is None

    def _add(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self._writable(branch) and (branch.dtype is shortcut.dtype or
                                       branch.dtype == torch.promote_types(branch.dtype, shortcut.dtype)):
            return branch.add_(shortcut)
        return shortcut + branch

    def _alone(self, shortcut: torch.Tensor) -> torch.Tensor:
        if self.owns_shortcut and self._writable(shortcut):
            return shortcut
        return shortcut.clone()  # the post-add activation may be in-place: never hand out the block input

    def _scatter(self, shortcut: torch.Tensor, idx: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(shortcut.dtype, branch.dtype)
        if self.owns_shortcut and shortcut.dtype == dtype and self._writable(shortcut):
            out = shortcut
        else:  # one copy, in the shortcut's memory format (Tensor.index_add would return NCHW)
            out = shortcut.to(dtype, copy=True)
        return _index_add_(out, idx, branch.to(dtype))

    def _hard_graph(self, shortcut: torch.Tensor, inputs: tuple, params: tuple) -> torch.Tensor:
        """Hard mode inside a graph: the decision stays a tensor, ``sigmoid(logit) >= threshold`` with the threshold
        a graph input (a program exported or compiled before a calibration follows the new threshold)."""
        logit = self.scorer(inputs[self.ctrl_index])
        # exported programs decode the threshold arithmetically: ONNX has no translation for the bit view
        threshold = _float_from_bits(self.threshold_bits) if torch.compiler.is_exporting() else self.threshold
        keep = torch.sigmoid(logit) >= threshold  # (B,) bool
        if self.record:
            self._record("hard", torch.sigmoid(logit), keep, None)
        if torch.compiler.is_exporting() or torch._dynamo.config.capture_dynamic_output_shape_ops:  # gateify.compile
            return self._hard_cond(shortcut, inputs, params, keep, split_all=True)
        return self._skip(shortcut, inputs, params, keep)  # plain torch.compile: dynamo breaks the graph at the sync

    def _hard_cond(self, shortcut: torch.Tensor, inputs: tuple, params: tuple, keep: torch.Tensor,
                   split_all: bool) -> torch.Tensor:
        """The skip as ``torch.cond`` on 'anyone kept' (and, with ``split_all``, first on 'everyone kept', whose
        side runs F on the batch without gather or scatter); the data-dependent sub-batch lives inside a side.

        Every side returns the shortcut's dtype and memory format (channels_last where the shortcut is stored so,
        else contiguous), as the sides of a cond must agree on strides.
        """
        batched, run = self.batched, self._run_branch
        fmt = _memory_format(shortcut)

        def some_kept(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            idx = keep.nonzero().view(-1)
            torch._check(idx.shape[0] > 0)  # true on this side of the cond; lets shape guards on F resolve
            sub = [_gather(t, idx) if b else t for t, b in zip(tensors, batched)]
            # index_put keeps the layout where a traced index_add (functional) returns NCHW; contiguous() is a
            # no-op but for a strided shortcut (ViT's tokens as patch_embed's transposed view)
            out = shortcut.index_put((idx,), run(*sub, *params).to(shortcut.dtype), accumulate=True)
            return out.contiguous(memory_format=fmt)

        def none_kept(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            return shortcut.clone(memory_format=fmt)

        root = shortcut if shortcut._base is None else shortcut._base
        if any(isinstance(t, torch.Tensor) and t is not shortcut and (t if t._base is None else t._base) is root
               for t in inputs):
            # a view of another operand or its base (VOLO's and CrossViT's class token, x[:, :1], beside x): a cond
            # refuses aliased operands (the same tensor twice it accepts)
            shortcut = shortcut.clone(memory_format=fmt)
        operands = (shortcut, keep, *inputs)
        if not split_all:
            return torch.cond(keep.any(), some_kept, none_kept, operands)

        def all_kept(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            return (shortcut + run(*tensors, *params).to(shortcut.dtype)).contiguous(memory_format=fmt)

        def not_all(shortcut: torch.Tensor, keep: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            return torch.cond(keep.any(), some_kept, none_kept, (shortcut, keep, *tensors))

        return torch.cond(keep.all(), all_kept, not_all, operands)


def _float_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """The float32 whose bit pattern the int32 ``bits`` holds, from integer arithmetic (sign, exponent, mantissa;
    exact, subnormals, inf and NaN included) instead of ``bits.view(torch.float32)``."""
    b = bits.to(torch.int64)
    negative = b < 0
    b = torch.where(negative, b + 2**31, b)
    e = torch.div(b, 2**23, rounding_mode="floor")
    m = (b - e * 2**23).to(torch.float64)
    e = e.to(torch.float64)
    value = torch.where(e > 0, (m + 2.0**23) * torch.exp2(e - 150), m * 2.0**-149)  # exact in float64
    value = torch.where(e == 255, torch.where(m == 0, math.inf, math.nan), value)
    return torch.where(negative, -value, value).to(torch.float32)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) where ``t`` is stored so (and not also plain contiguous), else contiguous."""
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.ndim == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format

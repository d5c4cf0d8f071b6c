"""Per-sample depth by routing among static paths: a cascade that shares its computation.

Static depth pruning gives every sample the same blocks. Routing keeps that machinery and lets depth depend on the
sample. ``K`` static selections of one converted model, ``P_0, P_1, ..., P_{K-1}`` (cheapest first; nested when
:func:`select_paths` chooses them, as :func:`gateify.select_blocks` would for ``K`` FLOPs targets), share every
weight. Every sample runs ``P_0`` to the end. The samples whose top softmax probability is low, ``1 - max softmax >=
threshold``, continue on ``P_1`` from the first block where ``P_1`` departs from ``P_0``, starting from the activation
the first pass left there, and so on: a cascade whose common prefix is paid for once.

:func:`route` builds a :class:`RoutedModel`: the plain network (no gates) and, per path, plain ``torch.fx`` code cut
at the departure points (:mod:`gateify.segments`). Inference is path 0's code for the whole batch, then for each
deeper level one data-dependent step: gather the unsure samples' activations at the departure point, run the deeper
path's remaining blocks on them, scatter their logits back. Nothing runs per block in Python, nothing before a
departure point runs twice, and no state survives a call. Under ``torch.export``, ONNX export and
:func:`gateify.compile` that step is a ``torch.cond``, so the routed model is one graph.

A higher threshold sends fewer samples deeper, so :func:`gateify.calibrate` sets it for a FLOPs target on validation
data (exactly: every path's confidence is computed once, and the FLOPs of each piece are counted).

Training (:class:`RouteLoss`): every path on every sample, the common prefix computed once, and the loss is the mean
over paths of cross-entropy, distillation from the dense teacher and, for every cheaper path, distillation from the
deepest path's own (detached) output, as slimmable networks train their narrower widths: one set of weights that
works at every depth of the cascade, the cheap paths taught by the deep one.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .accounting import counting_flops
from .errors import GateConfigError, GateifyError, GateifyWarning, InputShapeError
from .conversion import to_dense
from .gate import ResidualGate, _float_from_bits, _gather
from .modes import (Batches, as_batches, gates, model_device, require_gates, restore_training_flags, training_flags,
                    unwrap)
from .regularizer import distill_loss
from .rewrite import inline_block
from .segments import RoutePlan, inline_graph, plan_routes, trace_modes
from .static import select_blocks

__all__ = ["RoutePreset", "ROUTE_PRESETS", "RoutedModel", "PathNorm", "route", "cascade", "select_paths", "routing_paths", "is_routed",
           "level_shares", "RouteLoss", "RouteTerms", "routing_metadata", "route_from_metadata"]


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


class RouteResult(NamedTuple):
    """A routed call: the logits ``(B, classes)`` and the path each sample ended on, ``(B,)`` int64."""

    logits: torch.Tensor
    levels: torch.Tensor


class PathNorm(nn.Module):
    """One path's running statistics for one BatchNorm of the network, with the network's affine parameters.

    A BatchNorm after the point where two paths part sees different activations on each path; one set of running
    statistics for both is a mixture that fits neither (slimmable networks keep BatchNorm per width for this reason).
    By default (``gateify.route(..., path_norms=True)``) every level ``k >= 1`` normalises with its own statistics, updated
    when it trains, while the weight and bias stay shared by every path. ``forward(x, weight, bias)``: ``x`` as the
    BatchNorm takes it; the statistics start as a copy of the network's.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, source: str) -> None:
        super().__init__()
        self.source = source  # the BatchNorm's path in the network
        self.momentum, self.eps = norm.momentum, norm.eps
        self.register_buffer("running_mean", norm.running_mean.detach().clone())
        self.register_buffer("running_var", norm.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", norm.num_batches_tracked.detach().clone())

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:  # as torch.nn.BatchNorm: a cumulative average when momentum is None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, factor, self.eps)

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # exactly these: subclasses (BatchNormAct) do more


class RoutedModel(nn.Module):
    """A network that routes each sample among nested static paths (see module doc); built by :func:`route`, or a
    cascade of separately trained networks, built by :func:`cascade`.

    ``routed(x)`` in ``eval()``: ``(B, C, H, W) -> (B, classes)``, each row the output of the path its sample ended on.
    ``routed(x, every_path=True)``: ``(K, B, classes)``, every path on every sample (training, :class:`RouteLoss`);
    the only call allowed in ``train()``, where routing by an uncalibrated threshold would train nothing useful.

    Attributes:
        network: the plain network (the converted model without its gates): its state dict keys are the source
            model's, under ``network.``; ``routed.network.forward_features`` etc. run it densely. A cascade holds
            ``networks`` instead, one per level (keys under ``networks.<k>.``), and ``network`` is its last.
        threshold: per deeper level, how unsure (``1 - max softmax``) the previous path must be for a sample to go on:
            a float32 view of the ``threshold_bits`` buffer (int32 bits, so weight averaging never touches it);
            :func:`gateify.calibrate` sets it for a FLOPs target.
        levels: the number of paths ``K``.
    """

    #: how gateify's model-wide helpers (``require_gates``, ``calibrate``, ``flops``) recognise a routed model
    gateify_routed = True

    def __init__(self, networks: Sequence[nn.Module], paths: Sequence[Mapping[str, bool]],
                 blocks: Mapping[str, Mapping[str, str]], block_graphs: Sequence[Mapping[str, fx.Graph]],
                 block_classes: Mapping[str, str], tracer_kwargs: Mapping[str, Any], path_norms: bool = False) -> None:
        super().__init__()
        separate = len(networks) > 1
        if separate:
            self.networks = nn.ModuleList(networks)
            prefixes = [f"networks.{k}" for k in range(len(networks))]
        else:
            self.network = networks[0]
            prefixes = ["network"]
        self.training = networks[-1].training  # a routed model starts in the mode of the model it was made from
        if path_norms:
            self.path_norms = nn.ModuleDict()  # level -> {BatchNorm path with "_" for ".": PathNorm}
        self.register_buffer("threshold_bits",
                             torch.full((len(paths) - 1,), 0.5, device=model_device(networks[-1])).view(torch.int32))
        self.paths: tuple[dict[str, bool], ...] = tuple(dict(p) for p in paths)
        self._block_graphs = [dict(g) for g in block_graphs]
        self._block_classes = dict(block_classes)
        # per deeper level, the blocks where its path differs from the one before (a block holds one gate or more)
        differ = [[b for b, names in blocks.items() if any(paths[k][n] != paths[k - 1][n] for n in names.values())]
                  for k in range(1, len(paths))]
        tops = trace_modes(networks[0], list(blocks), **tracer_kwargs)
        rewrite = self._own_norms if path_norms else None
        plans: dict[bool, RoutePlan] = {False: plan_routes(self, tops[False], prefixes, block_graphs, differ, rewrite)}
        plans[True] = plans[False] if tops[True] is tops[False] else plan_routes(self, tops[True], prefixes,
                                                                                   block_graphs, differ, rewrite)
        self._plans = plans
        self._buckets = False  # compile_segments: pad deeper sub-batches to powers of two
        if path_norms:  # the path norms made above follow the model's mode; the network's modules keep their own
            self.path_norms.train(self.training)

    def __getattr__(self, name: str) -> Any:
        if name == "network" and "networks" in self._modules:  # a cascade: its deepest network stands for it
            return self._modules["networks"][-1]
        return super().__getattr__(name)

    @property
    def is_cascade(self) -> bool:
        """Whether every level has a network of its own (:func:`cascade`) rather than sharing one (:func:`route`)."""
        return "networks" in self._modules

    def _own_norms(self, level: int, graph: fx.Graph) -> None:
        """Level ``level``'s BatchNorm calls (``level >= 1``) normalise with its own statistics (:class:`PathNorm`)."""
        if level == 0:
            return
        holder = self.path_norms[str(level)] if str(level) in self.path_norms else nn.ModuleDict()
        self.path_norms[str(level)] = holder
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            norm = self.get_submodule(node.target)
            if type(norm) not in _PLAIN_NORMS or not norm.track_running_stats:
                continue
            source = node.target[len("network."):]
            key = source.replace(".", "_")
            if key not in holder:
                holder[key] = PathNorm(norm, source)
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight") if norm.affine else None
                bias = graph.get_attr(f"{node.target}.bias") if norm.affine else None
            node.target = f"path_norms.{level}.{key}"
            node.args = (node.args[0], weight, bias)

    # --- what timm-aware code reads off a model ---------------------------------------------------------------------

    @property
    def levels(self) -> int:
        return len(self.paths)

    @property
    def threshold(self) -> torch.Tensor:
        """``(K - 1,)`` float32 view of ``threshold_bits``; ``fill_`` writes through."""
        return self.threshold_bits.view(torch.float32)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.network, "pretrained_cfg", None) or {}

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.network, "num_classes", None)

    def extra_repr(self) -> str:
        kept = [sum(p.values()) for p in self.paths]
        kind = "cascade of separate networks, " if self.is_cascade else ""
        return f"{kind}levels={self.levels}, blocks kept per path={kept}, threshold={self.threshold.tolist()}"

    def __prepare_scriptable__(self) -> nn.Module:
        raise GateifyError("TorchScript cannot express routing's data-dependent sub-batches; use torch.export.export"
                           "(routed, (x,)) or torch.onnx.export(routed, (x,), dynamo=True) instead.")

    # --- forward ------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, every_path: bool = False) -> torch.Tensor:
        if every_path:
            return torch.stack(self.forward_paths(x))
        if self.training:
            raise GateConfigError(
                "a routed model in train() trains every path on every sample: use gateify.RouteLoss(routed)(x, y) "
                "(or routed(x, every_path=True) -> (paths, B, classes)); call routed.eval() to route.")
        return self._route(x, want_levels=False).logits

    def forward_routes(self, x: torch.Tensor) -> RouteResult:
        """The routed logits and each sample's path, ``(B,)`` (``eval()`` only)."""
        if self.training:
            raise GateConfigError("forward_routes routes as inference does: call routed.eval() first.")
        return self._route(x, want_levels=True)

    def forward_paths(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every path's logits for every sample, ``K x (B, classes)``, the common prefix computed once."""
        plan = self._plans[self.training]
        outs = plan.segments[0](self, x)
        logits, carried = [outs[0]], plan.split(0, outs[1:])
        for k in range(1, self.levels):
            outs = plan.segments[k](self, *carried.pop(k))
            logits.append(outs[0])
            carried.update(plan.split(k, outs[1:]))
        return logits

    def _escalates(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """``(n,)`` bool: the samples level ``k - 1`` is unsure of, which go on to level ``k``."""
        # exported programs decode the threshold arithmetically: ONNX has no translation for the bit view
        bits = self.threshold_bits[k - 1]
        threshold = _float_from_bits(bits) if torch.compiler.is_exporting() else bits.view(torch.float32)
        return 1.0 - logits.detach().float().softmax(1).amax(1) >= threshold

    def _route(self, x: torch.Tensor, want_levels: bool) -> RouteResult:
        if torch._C._get_tracing_state():  # jit.trace would freeze the example's routes
            raise GateConfigError("a routed model makes data-dependent decisions that torch.jit.trace and the legacy "
                                  "ONNX exporter freeze to the example input; use torch.export.export or "
                                  "torch.onnx.export(..., dynamo=True).")
        plan = self._plans[False]
        outs = plan.segments[0](self, x)
        # the cond form under torch.export, and under gateify.compile for inference (dynamo cannot yet trace a cond
        # side with data-dependent shapes for autograd: with gradients on, the eager step, with graph breaks)
        if torch.compiler.is_exporting() or (torch.compiler.is_compiling() and not torch.is_grad_enabled()
                                             and torch._dynamo.config.capture_dynamic_output_shape_ops):
            logits = self._escalate_graph(plan, 1, outs[0], plan.split(0, outs[1:]))
            return RouteResult(logits, logits.new_zeros(0, dtype=torch.long))
        return self._escalate(plan, 1, outs[0], plan.split(0, outs[1:]), want_levels)

    def _escalate(self, plan: RoutePlan, k: int, logits: torch.Tensor,
                  carried: dict[int, tuple[torch.Tensor, ...]], want_levels: bool) -> RouteResult:
        """Eager: send the unsure rows of ``logits`` (level ``k - 1``'s) on to level ``k``, and so on."""
        n = logits.shape[0]

        def stay() -> RouteResult:
            return RouteResult(logits, torch.full((n,), k - 1, dtype=torch.long, device=logits.device)
                               if want_levels else logits.new_zeros(0, dtype=torch.long))

        if k == self.levels:
            return stay()
        unsure = self._escalates(logits, k)
        if n == 1:  # a sample alone: decided on the host, no index ops
            if not bool(unsure):
                return stay()
            idx = None
        else:
            idx = unsure.nonzero().view(-1)  # the one host sync a level costs
            if idx.shape[0] == 0:
                return stay()
            if idx.shape[0] == n:
                idx = None
        rows = idx
        if idx is not None and self._buckets:  # compiled segments: a few sub-batch sizes serve every count
            m = idx.shape[0]
            size = 1 << (m - 1).bit_length()
            rows = torch.cat([idx, idx[:1].expand(size - m)]) if size > m else idx
        sub = carried if rows is None else {m: tuple(_gather(t, rows) for t in ts) for m, ts in carried.items()}
        outs = plan.segments[k](self, *sub.pop(k))
        if rows is not idx:  # the padding rows (copies of the first) are dropped again
            outs = tuple(o[: idx.shape[0]] for o in outs)
            sub = {m: tuple(t[: idx.shape[0]] for t in ts) for m, ts in sub.items()}
        sub.update(plan.split(k, outs[1:]))
        deeper = self._escalate(plan, k + 1, outs[0], sub, want_levels)
        if idx is None:
            return RouteResult(deeper.logits.to(logits.dtype), deeper.levels)
        merged = logits.index_copy(0, idx, deeper.logits.to(logits.dtype))
        if not want_levels:
            return RouteResult(merged, deeper.levels)
        return RouteResult(merged, stay().levels.index_copy(0, idx, deeper.levels))

    def _escalate_graph(self, plan: RoutePlan, k: int, logits: torch.Tensor,
                        carried: dict[int, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """In a graph (torch.export, gateify.compile): the same step as one ``torch.cond`` per level, the
        data-dependent sub-batch inside its true side, so the main graph never syncs on ``nonzero``."""
        if k == self.levels:
            return logits
        later = sorted(carried)
        sizes = [len(carried[m]) for m in later]
        flat = [t for m in later for t in carried[m]]

        def regroup(tensors: Sequence[torch.Tensor]) -> dict[int, tuple[torch.Tensor, ...]]:
            out, i = {}, 0
            for m, size in zip(later, sizes):
                out[m] = tuple(tensors[i:i + size])
                i += size
            return out

        def onward(sub: dict[int, tuple[torch.Tensor, ...]]) -> torch.Tensor:
            """Level ``k`` on the rows ``sub`` carries, then the levels after it: their logits."""
            outs = plan.segments[k](self, *sub.pop(k))
            sub.update(plan.split(k, outs[1:]))
            return self._escalate_graph(plan, k + 1, outs[0], sub)

        def deeper(logits: torch.Tensor, unsure: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
            idx = unsure.nonzero().view(-1)
            torch._check(idx.shape[0] > 0)  # true on this side of the cond; lets shape guards in the path resolve
            deep = onward(regroup([_gather(t, idx) for t in flat]))
            return logits.index_put((idx,), deep.to(logits.dtype))

        def stay(logits: torch.Tensor, unsure: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
            return logits.clone()

        def every(logits: torch.Tensor, unsure: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
            sub = regroup(flat)
            # a cond side may not write its operands: inputs the segment acts on in place go in as copies
            sub[k] = tuple(t.clone() if w else t for t, w in zip(sub[k], plan.written[k]))
            return onward(sub).to(logits.dtype)

        def some(logits: torch.Tensor, unsure: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
            return torch.cond(unsure.all(), every, deeper, (logits, unsure, *flat))

        unsure = self._escalates(logits, k)
        if torch.compiler.is_exporting():  # one cond: export cannot yet prove a nested cond's sides the same shape
            return torch.cond(unsure.any(), deeper, stay, (logits, unsure, *flat))
        # compiled: every sample unsure (a batch of one that goes on) runs the deeper segment on the whole batch, at
        # its static shape, with no gather and no scatter (the data-dependent sub-batch cost 0.3 ms more at batch 1);
        # checked second, so that a batch that stays pays for one cond
        return torch.cond(unsure.any(), some, stay, (logits, unsure, *flat))

    def compile_segments(self, *, buckets: bool = True, **compile_kwargs: Any) -> "RoutedModel":
        """Compile each level's code on its own with ``torch.compile(**compile_kwargs)``; the step between levels
        stays in Python (one host sync per level). Returns ``self``.

        Where :func:`gateify.compile` makes one graph of everything, this keeps every segment free of data-dependent
        shapes, which is what CUDA graphs need: with ``mode="reduce-overhead"`` on a GPU each segment is captured
        once per input shape. ``buckets`` runs a deeper level on the next power of two of its sub-batch (padded with
        copies of one row, whose outputs are dropped), so that ``log2(B) + 1`` shapes serve every escalation count;
        pass ``dynamic=False`` so each gets its own graph, and raise ``torch._dynamo.config.recompile_limit`` above
        that count for large batches. A copy of the model (``copy.deepcopy``) runs its segments uncompiled again.
        """
        for plan in {id(p): p for p in self._plans.values()}.values():
            for segment in plan.segments:
                segment.compile(**compile_kwargs)
        self._buckets = buckets
        return self

    # --- paths as plain models, FLOPs, calibration -------------------------------------------------------------------

    def path(self, level: int) -> nn.Module:
        """Path ``level`` alone as a plain pruned model (a copy, of the network's class, without the removed
        branches): what :func:`gateify.to_static` gives for the same blocks; exports like any ResNet."""
        if not 0 <= level < self.levels:
            raise GateConfigError(f"level={level}: this model routes among paths 0..{self.levels - 1}.")
        plain = copy.deepcopy(self.networks[level] if self.is_cascade else self.network)
        norms = getattr(self, "path_norms", {})
        for own in (norms[str(level)].values() if str(level) in norms else ()):  # the path's own statistics
            target = plain.get_submodule(own.source)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(target, name).copy_(getattr(own, name))
        for block, graph in self._block_graphs[level].items():
            dense = plain.get_submodule(block)
            static = fx.GraphModule(dense, copy.deepcopy(graph), class_name=self._block_classes[block])
            static.training = dense.training
            plain.set_submodule(block, static)
        return plain

    def segment_flops(self, x: torch.Tensor) -> tuple[float, list[float]]:
        """``(dense, [per level])`` FLOPs per sample (2 per multiply-accumulate, as ``FlopCounterMode`` counts) on
        ``x``: the network, and each level's segment for a sample that runs it (level 0: path 0 to the end)."""
        flags = training_flags(self)
        self.eval()
        try:
            with torch.no_grad():
                with counting_flops(self) as counter:
                    self.network(x)
                dense = counter.get_total_flops() / x.shape[0]
                plan, per_level = self._plans[False], []
                carried: dict[int, tuple[torch.Tensor, ...]] = {}
                for k in range(self.levels):
                    with counting_flops(self) as counter:
                        outs = plan.segments[k](self, *(carried.pop(k) if k else (x,)))
                    carried.update(plan.split(k, outs[1:]))
                    per_level.append(counter.get_total_flops() / x.shape[0])
        finally:
            restore_training_flags(self, flags)
        return dense, per_level

    def calibrate(self, inputs: Batches, target: float, *, max_batches: Optional[int] = None,
                  max_error: float = 0.02) -> float:
        """Set the threshold so that executed FLOPs are ``target`` x dense on ``inputs``; returns it.

        Exact: every path's confidence is computed once per sample, and executed FLOPs are those of the segments
        each sample runs (level 0 for all, level ``k``'s segment for the samples that reach it, counted once by
        :meth:`segment_flops`). The threshold is placed halfway between the two samples it separates.
        """
        batches = list(as_batches(inputs, max_batches))
        if not batches:
            raise InputShapeError("no input batch was given to calibrate on.")
        device = model_device(self)
        flags = training_flags(self)
        self.eval()
        try:
            with torch.no_grad():
                unsure = torch.cat([torch.stack([1.0 - p.float().softmax(1).amax(1) for p in
                                                 self.forward_paths(x.to(device))[:-1]], 1).cpu() for x in batches])
                dense, costs = self.segment_flops(batches[0][:2].to(device))
        finally:
            restore_training_flags(self, flags)
        candidates = torch.cat([torch.tensor([0.0, 1.0 + 1e-6]), unsure.flatten()]).unique()

        def fraction(t: float) -> float:
            reached = torch.ones(unsure.shape[0], dtype=torch.bool)
            executed = costs[0]
            for k in range(1, self.levels):
                reached &= unsure[:, k - 1] >= t
                executed += costs[k] * float(reached.float().mean())
            return executed / dense

        fractions = torch.tensor([fraction(float(t)) for t in candidates])
        low, high = float(fractions.max()), float(fractions.min())
        if not high - 1e-9 <= target <= low + 1e-9:
            raise GateifyError(f"target={target} is out of reach: executed FLOPs range from {high:.3f} (every sample on "
                               f"the cheapest path) to {low:.3f} (every sample on the deepest) of dense on this data.")
        best = int(torch.argmin((fractions - target).abs()))
        # halfway to the next lower candidate: the same samples escalate, with room for another runtime's rounding
        t = float(candidates[best])
        below = candidates[candidates < t]
        threshold = 0.5 * (t + float(below.max())) if below.numel() and t <= 1.0 else t
        self.threshold.fill_(threshold)
        reached = float(fractions[best])
        if abs(reached - target) > max_error:
            warnings.warn(GateifyWarning(
                f"calibrate reached {reached:.3f} of dense FLOPs, not the target {target} (off by "
                f"{abs(reached - target):.3f} > max_error={max_error}): too few samples to place the threshold "
                f"finely; calibrate on more data."), stacklevel=3)
        return float(self.threshold[0])


def _kept(paths: Sequence[Mapping[str, bool]], names: Sequence[str]) -> list[dict[str, bool]]:
    return [{name: bool(p.get(name, True)) for name in names} for p in paths]


def route(model: nn.Module, paths: Sequence[Mapping[str, bool]], *, path_norms: bool = True,
          leaf_modules: Sequence[Union[type, str]] = (), autowrap_functions: Sequence[Callable] = (),
          inplace: bool = False) -> RoutedModel:
    """A :class:`RoutedModel` that routes each sample among static paths of a converted model.

    Args:
        model: a converted model (:func:`gateify.convert`) whose forward returns class logits ``(B, classes)``
            and can be traced by ``torch.fx`` with its gated blocks as leaves, its other forward arguments at their
            defaults (timm and torchvision ResNets, ConvNeXt, ViT, DeiT, Swin, MobileNet, EfficientNet). A gated
            block that another gated block calls (FastViT's token mixer) is routed as part of it.
        paths: ``K >= 2`` selections ``{block: keep}`` (blocks not named are kept), cheapest first:
            :func:`select_paths` finds nested ones for ``K`` FLOPs targets.
        path_norms: every deeper level keeps its own BatchNorm running statistics after the point where it departs
            (:class:`PathNorm`; the weights stay shared). ``False``: one set of statistics, a mixture of every
            path's activations that fits none of them (on animals-c it cost a routed ResNet-20 10-14 points of test
            accuracy at 55-65% FLOPs saved: docs/results.md); kept for the comparison and for files made before.
        leaf_modules, autowrap_functions: for the tracer, as in :func:`gateify.convert`, where the network's own
            forward needs them.
        inplace: use ``model``'s modules (its gates are dropped) instead of a copy.

    The routed model keeps the network's weights (without the gates' controllers: they play no part in routing)
    under ``network.``. Fine-tune it with :class:`RouteLoss`, then set the threshold for a FLOPs target with
    :func:`gateify.calibrate` on validation data. :func:`gateify.save` records the paths and :func:`gateify.load`
    rebuilds it.
    """
    if is_routed(model):
        raise GateConfigError("this model routes already; convert the source model again to route differently.")
    found = require_gates(model, "route")
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
    work = unwrap(model) if inplace else copy.deepcopy(unwrap(model))
    per_path = [_static_blocks(work, keep) for keep in kept]
    blocks, classes = per_path[0][0], per_path[0][2]
    network = to_dense(work, inplace=True)
    return RoutedModel([network], kept, blocks, [graphs for _, graphs, _ in per_path], classes,
                       {"leaf_modules": tuple(leaf_modules), "autowrap_functions": tuple(autowrap_functions)},
                       path_norms=path_norms)


def cascade(models: Sequence[nn.Module], paths: Optional[Sequence[Mapping[str, bool]]] = None, *,
            leaf_modules: Sequence[Union[type, str]] = (), autowrap_functions: Sequence[Callable] = ()) -> RoutedModel:
    """A confidence cascade of separately trained models of one architecture: every sample runs the first; the
    samples it is unsure of (``1 - max softmax >= threshold``) run the next, from the input, and so on.

    What routing (:func:`route`) does inside one network, with a network per level: no weight is shared, nothing is
    computed once for two levels, and each model is trained on its own (static pruning, and distillation from the
    deeper model with ``gateify.fit(..., self_teacher=deeper)``). The result is a :class:`RoutedModel`
    (``is_cascade``): the same calibration, FLOPs counting, export, compilation and files.

    Args:
        models: ``K >= 2`` converted models (:func:`gateify.convert`) of one architecture, cheapest first.
        paths: each model's static selection ``{block: keep}``; default: each model's own (every gate in
            ``"static"`` mode, as :func:`gateify.set_static` leaves them).
        leaf_modules, autowrap_functions: for the tracer, as in :func:`route`.

    The models are copied; their gates are dropped (the static selections are baked into each level's code).
    """
    if len(models) < 2:
        raise GateConfigError(f"a cascade needs at least 2 models, got {len(models)}.")
    found = [require_gates(m, "cascade") for m in models]
    if any(list(f) != list(found[0]) for f in found):
        raise GateConfigError("a cascade's models must be conversions of one architecture (the same gated blocks).")
    if paths is None:
        modes = {g.mode for f in found for g in f.values()}
        if modes != {"static"}:
            raise GateConfigError(f"cascade takes each model's static selection, but its gates are in modes "
                                  f"{sorted(modes)}; call gateify.set_static(model, keep) on each, or pass paths=.")
        paths = [{name: bool(g.static_keep) for name, g in f.items()} for f in found]
    if len(paths) != len(models):
        raise GateConfigError(f"{len(paths)} paths for {len(models)} models: give one selection per model.")
    kept = _kept(paths, list(found[0]))
    networks, block_graphs = [], []
    for model, keep in zip(models, kept):
        work = copy.deepcopy(unwrap(model))
        blocks, graphs, classes = _static_blocks(work, keep)
        block_graphs.append(graphs)
        networks.append(to_dense(work, inplace=True))
    return RoutedModel(networks, kept, blocks, block_graphs, classes,
                       {"leaf_modules": tuple(leaf_modules), "autowrap_functions": tuple(autowrap_functions)})


def _static_blocks(work: nn.Module, keep: Mapping[str, bool]) -> tuple[dict[str, dict[str, str]], dict[str, fx.Graph],
                                                                      dict[str, str]]:
    """Per outermost gated block of a converted model: ``{gate path in the block: gate name}``, its static graph for
    ``keep``, and the class name it had.

    A gated block that another gated block calls outside its branches (FastViT's token mixer, a ``MixerBlock``'s
    mixer) is inlined, in its static form, into the graph of the block that calls it, and its gates are listed with
    that block's: the network's top graph calls the outermost blocks only, and a path that drops the inner block's
    branch must not run it.
    """
    where = {gate: path for path, gate in work.named_modules() if isinstance(gate, ResidualGate)}
    own: dict[str, dict[str, str]] = {}
    for name, gate in gates(work).items():
        block, _, attr = where[gate].rpartition(".")
        own.setdefault(block, {})[attr] = name
    graphs = {block: inline_block(work.get_submodule(block), {a: keep[n] for a, n in attrs.items()},
                                  sub_batch=True).graph
              for block, attrs in own.items()}
    called: set[str] = set()
    for block in sorted(own, key=lambda b: -b.count(".")):  # innermost first: a child is flat when its parent inlines it
        graphs[block] = _inline_gated_children(block, graphs, called)
    outer = [b for b in own if not any(b.startswith(o + ".") for o in own)]
    hidden = [b for b in own if b not in outer and b not in called]
    if hidden:
        raise GateConfigError(
            f"gated blocks {hidden} sit inside other gated blocks whose traced forward does not call them (a module "
            f"around them is called as a whole), so routing cannot give them a static form per path. Convert with "
            f"leaf_modules={hidden} to leave them ungated, then route.")
    blocks = {o: {f"{b[len(o) + 1:]}.{attr}" if b != o else attr: name for b in own if b == o or b.startswith(o + ".")
                  for attr, name in own[b].items()} for o in outer}
    classes = {block: work.get_submodule(block).meta.get("gateify_block_class", "Block") for block in outer}
    return blocks, {o: graphs[o] for o in outer}, classes


def _inline_gated_children(block: str, graphs: Mapping[str, fx.Graph], called: set[str]) -> fx.Graph:
    """``graphs[block]`` with each gated block it calls (added to ``called``) replaced by that block's static graph."""
    if not any(b.startswith(block + ".") for b in graphs):
        return graphs[block]
    flat, env = fx.Graph(), {}
    for n in graphs[block].nodes:
        child = f"{block}.{n.target}" if n.op == "call_module" else None
        if child in graphs:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            env[n] = inline_graph(flat, graphs[child], n.target, args, kwargs)
            called.add(child)
        elif n.op == "output":
            flat.output(fx.node.map_arg(n.args[0], env.__getitem__))
        else:
            env[n] = flat.node_copy(n, env.__getitem__)
    flat.lint()
    return flat


def is_routed(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP / DataParallel wrapper) is a :class:`RoutedModel`."""
    return isinstance(unwrap(model), RoutedModel)


def _require_routed(model: nn.Module, needed_by: str) -> RoutedModel:
    module = unwrap(model)
    if not isinstance(module, RoutedModel):
        raise GateConfigError(f"{needed_by} needs a routed model; build one with gateify.route(converted, paths).")
    return module


def routing_paths(model: nn.Module) -> list[dict[str, bool]]:
    """The paths a routed model runs, cheapest first, as ``{block: keep}`` over every block."""
    return [dict(p) for p in _require_routed(model, "routing_paths").paths]


def level_shares(model: nn.Module, inputs: Batches, *, max_batches: Optional[int] = None) -> list[float]:
    """Fraction of the samples of ``inputs`` (a batch, or a loader of batches or ``(x, y)`` pairs) that end on
    each path, cheapest first, as inference routes them."""
    routed = _require_routed(model, "level_shares")
    counts = torch.zeros(routed.levels)
    device = model_device(routed)
    flags = training_flags(routed)
    routed.eval()
    try:
        with torch.no_grad():
            for x in as_batches(inputs, max_batches):
                levels = routed.forward_routes(x.to(device)).levels
                counts += torch.bincount(levels.cpu(), minlength=routed.levels).float()
    finally:
        restore_training_flags(routed, flags)
    if not counts.sum():
        raise InputShapeError("no input batch was given to count paths on.")
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
        terms = loss_fn(x, y, teacher_logits)      # runs every path once, the common prefix once
        terms.total.backward()

    Args:
        model: the routed model (or a DDP wrapper of it), in ``train()``.
        distill_weight, temperature: distillation of every path from the teacher's logits (0: none).
        self_distill: distillation of every cheaper path from the deepest path's detached logits (0: none).
        label_smoothing: of the cross-entropy.
        survivors: ``None`` (every path learns from every sample), or the fraction of each batch a deeper path
            learns from: the samples the path before it is least sure of, those a cascade sends on (the deeper path
            still runs on every sample, to teach the cheaper ones).
    """

    def __init__(self, model: nn.Module, *, distill_weight: float = 1.0, temperature: float = 2.0,
                 self_distill: float = 1.0, label_smoothing: float = 0.0, survivors: Optional[float] = None) -> None:
        if survivors is not None and not 0 < survivors <= 1:
            raise GateConfigError(f"survivors={survivors} must lie in (0, 1], or be None for every sample.")
        self.model = model
        self.levels = _require_routed(model, "RouteLoss").levels
        self.distill_weight, self.temperature, self.label_smoothing = distill_weight, temperature, label_smoothing
        self.self_distill, self.survivors = self_distill, survivors

    def __call__(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> RouteTerms:
        per_level = self.model(x, every_path=True).float()  # (K, B, classes); through DDP's forward when wrapped
        deepest = per_level[-1].detach()
        losses = []
        for k in range(self.levels):
            logits, labels, teacher = per_level[k], y, teacher_logits
            if self.survivors is not None and k > 0:  # the samples level k - 1 is least sure of
                unsure = per_level[k - 1].detach().softmax(1).amax(1).argsort()
                rows = unsure[:max(1, round(self.survivors * len(y)))]
                logits, labels = logits[rows], labels[rows]
                teacher = teacher[rows] if teacher is not None else None
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            if teacher is not None and self.distill_weight > 0:
                loss = loss + self.distill_weight * distill_loss(logits, teacher.float(), self.temperature)
            if k < self.levels - 1 and self.self_distill > 0:
                loss = loss + self.self_distill * distill_loss(per_level[k], deepest, self.temperature)
            losses.append(loss)
        total = torch.stack(losses).mean()
        return RouteTerms(total, [float(v.detach()) for v in losses], per_level[-1])


def routing_metadata(model: nn.Module) -> dict[str, Any]:
    """What :func:`gateify.load` needs to route a freshly converted model again: each path as the blocks it removes."""
    routed = _require_routed(model, "routing_metadata")
    return {"paths": [sorted(name for name, keep in p.items() if not keep) for p in routing_paths(model)],
            "path_norms": hasattr(routed, "path_norms"), "cascade": routed.is_cascade}


def route_from_metadata(model: nn.Module, meta: Mapping[str, Any], **route_kwargs: Any) -> RoutedModel:
    """:func:`route` as :func:`routing_metadata` recorded it."""
    paths = [{name: False for name in removed} for removed in meta["paths"]]
    if meta.get("cascade", False):  # a network per level, each loaded with its own weights after this
        return cascade([model] * len(paths), paths, **route_kwargs)
    return route(model, paths, path_norms=bool(meta.get("path_norms", False)), **route_kwargs)

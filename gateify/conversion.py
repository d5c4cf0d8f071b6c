"""The public conversion pass: :func:`convert`, and its inverses :func:`to_dense` and :func:`to_static`.

``convert`` finds every module whose own forward performs a residual addition (the *block*; see
:mod:`gateify.matching`), re-traces each block on its own (:mod:`gateify.tracing`) into a ``GraphModule`` that keeps
the block's submodules under their original names, so ``state_dict`` keys do not change, and replaces each residual
addition by a :class:`~gateify.gate.ResidualGate` (:mod:`gateify.rewrite`). Nothing is swapped into the model until
every block has been rewritten, so a refusal leaves it as it was.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import fx, nn

from .errors import (
    AlreadyConvertedError,
    GateifyError,
    GateifyWarning,
    InputShapeError,
    MetaDeviceError,
    NoResidualBlocksError,
    UntraceableModelError,
)
from .gate import GateConfig, ResidualGate
from .matching import is_addition, remove_dead_pure_nodes, split_residual
from .models import input_shape
from .modes import require_gates, restore_training_flags, training_flags
from .rewrite import EXAMPLE_BATCH, NotAResidual, UnskippableResidual, ValueRecorder, gate_residual, inline_block
from .tracing import TraceFailure, discover_blocks, enclosing_module, join_path, trace_block, untraceable_message

__all__ = ["convert", "to_dense", "to_static"]

_logger = logging.getLogger(__name__)


def _check_convertible(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise GateifyError(f"convert expects a torch.nn.Module, got {type(model).__name__}.")
    if any(isinstance(m, ResidualGate) for m in model.modules()):
        raise AlreadyConvertedError(
            "this model is already converted (it contains gateify gates). Use the converted model as it is, "
            "or convert the original again; gateify.to_dense(model) gives back a plain model.")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise MetaDeviceError(
            f"the model's weights are on the meta device (e.g. '{meta[0]}'), so gateify cannot run it to find "
            f"block shapes. Materialise it first: model.to_empty(device='cpu') and load real weights, "
            f"or build it with weights.")


def _example_input(model: nn.Module, example_input: Optional[torch.Tensor]) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if example_input is not None:
        if example_input.shape[0] < EXAMPLE_BATCH:  # batched tensors are told apart by their leading dim
            example_input = example_input.expand(EXAMPLE_BATCH, *example_input.shape[1:])
        floating = example_input.is_floating_point()
        return example_input[:EXAMPLE_BATCH].to(device=device, dtype=dtype if floating else None)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(EXAMPLE_BATCH, *input_shape(model), generator=generator).to(device=device, dtype=dtype)


class _BlockCall(NamedTuple):
    """A block's first call: its arguments in its forward's parameter order, and the parameters that were None."""

    args: tuple
    none: frozenset


def _block_call(module: nn.Module, path: str, args: tuple, kwargs: dict) -> _BlockCall:
    """A call's arguments in the order of ``module.forward``'s parameters, defaults filled in: the order of the
    placeholders that tracing ``module`` gives (keyword-only parameters come after the positional ones there too).
    Swin's ``self.attn(x, mask=mask)`` becomes ``(x, mask)``."""
    signature = inspect.signature(module.forward)
    variadic = [p.name for p in signature.parameters.values()
                if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if variadic and kwargs:
        raise GateifyError(f"block '{path}' ({type(module).__name__}) is called with keyword arguments "
                           f"{sorted(kwargs)} and its forward takes *{variadic[0]}, so gateify cannot tell which "
                           f"traced input each keyword feeds. Pass leaf_modules=['{path}'] to call it as a whole "
                           f"(ungated), or give its forward named parameters.")
    if variadic:
        return _BlockCall(args, frozenset())
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise GateifyError(f"block '{path}' ({type(module).__name__}) was called with arguments its forward "
                           f"signature does not accept ({e}). Pass leaf_modules=['{path}'] to call it as a "
                           f"whole (ungated).") from e
    bound.apply_defaults()
    return _BlockCall(tuple(bound.arguments.values()),
                      frozenset(name for name, value in bound.arguments.items() if value is None))


@contextmanager
def _as_it_was(model: nn.Module) -> Iterator[None]:
    """Run ``model`` inside and get it back as it was: train/eval flags, BatchNorm statistics a train() run moved,
    and buffers a module replaced (a cache such as ConViT's rel_indices that the first call fills)."""
    flags = training_flags(model)
    buffers = {name: (b, b.clone()) for name, b in model.named_buffers()}
    try:
        yield
    finally:
        restore_training_flags(model, flags)
        with torch.no_grad():
            for name, (tensor, value) in buffers.items():
                tensor.copy_(value)
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                if module._buffers.get(attr) is not tensor:
                    module._buffers[attr] = tensor


def _capture_block_inputs(model: nn.Module, paths: Sequence[str],
                          x: torch.Tensor) -> tuple[dict[str, _BlockCall], dict[str, int]]:
    """Each block's first inputs, positional and keyword ones in its forward's parameter order, in the order blocks
    ran: from an eval-mode run of ``model(x)``, then for blocks that only run in training (``if self.training:
    ...``), from a train-mode run whose BatchNorm statistics are restored after. Blocks neither run reaches are
    left out. Also: how many times the eval-mode run called each block."""
    seen: dict[str, _BlockCall] = {}
    calls: dict[str, int] = {}
    handles = []
    for path in paths:
        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            if not module.training:
                calls[path] = calls.get(path, 0) + 1
            if path not in seen:
                seen[path] = _block_call(module, path, args, kwargs)
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with _as_it_was(model):
            for train in (False, True):
                if train and set(seen) == set(paths):
                    break
                model.train(train)
                with torch.no_grad():
                    model(x)
    except GateifyError:
        raise
    except Exception as e:
        raise InputShapeError(
            f"running the model on an example input of shape {tuple(x.shape)} failed ({type(e).__name__}: {e}). "
            f"gateify runs the model once to learn block shapes: pass example_input=<a tensor the model accepts>."
        ) from e
    finally:
        for h in handles:
            h.remove()
    return seen, calls


def _shared_blocks(model: nn.Module, paths: Iterable[str], calls: Mapping[str, int]) -> dict[str, str]:
    """Blocks that one gate cannot stand for, and why: a module the network holds under several names (CoaT's
    ConvPosEnc, shared by the blocks of a stage) or calls more than once per forward. A gate decides, records and
    is counted once per forward of its block, and a block swapped in under one name leaves its other names calling
    the ungated module."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    shared = {}
    for path in paths:
        n = calls.get(path, 1)  # a block only train() runs: once, as far as the eval() run can tell
        aliases = [a for a in names[id(model.get_submodule(path))] if a != path]
        if aliases or n > 1:
            also = f", also held as {', '.join(repr(a) for a in aliases[:3])}" if aliases else ""
            shared[path] = f"called {n} times per forward{also}"
    return shared


def _execution_order(model: nn.Module, gates: Sequence[ResidualGate], x: torch.Tensor) -> list[ResidualGate]:
    """``gates`` in the order an eval() run of the converted model calls them (a block's own residual can come after
    a child block's: FastViT's token mixer); gates that run only in training follow, in block order."""
    order: list[ResidualGate] = []
    handles = [g.register_forward_pre_hook(lambda gate, args: order.append(gate)) for g in gates]
    modes = [g.mode for g in gates]
    try:
        with _as_it_was(model), torch.no_grad():
            for g in gates:
                g.mode = "dense"
            model.eval()
            model(x)
    finally:
        for g, mode in zip(gates, modes):
            g.mode = mode
        for h in handles:
            h.remove()
    ran = list(dict.fromkeys(order))
    return ran + [g for g in gates if g not in ran]


def _leaf_args(leaf_modules: Sequence[Union[type, str]]) -> tuple[list[type], set[str]]:
    types, names = [], set()
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            names.add(leaf)
        else:
            raise GateifyError(f"leaf_modules entries must be nn.Module classes or module paths, got {leaf!r}.")
    return types, names


def _flattened_graphs(model: nn.Module) -> list[str]:
    """Paths of ``torch.fx`` GraphModules in ``model`` that perform additions in their own code: a traced model whose
    blocks were inlined into one graph (timm's ``FeatureGraphNet``, torchvision's ``create_feature_extractor``)."""
    return [path for path, m in model.named_modules()
            if isinstance(m, fx.GraphModule) and any(is_addition(n) for n in m.graph.nodes)]


def _no_residual_message(model: nn.Module) -> str:
    flattened = _flattened_graphs(model)
    if flattened:
        where = f"its submodule '{flattened[0]}'" if flattened[0] else "it"
        return (f"found no residual block to gate in {type(model).__name__}: {where} is a torch.fx GraphModule into "
                f"which tracing inlined the residual blocks (what timm's features_only=True with feature_cls='fx', "
                f"i.e. FeatureGraphNet, and torchvision's create_feature_extractor build), so no block module is left "
                f"to replace. Convert first, then extract features: gated = gateify.convert(timm.create_model(name)), "
                f"then timm.models.FeatureGraphNet(gated, out_indices=...) or create_feature_extractor(gated, ...) "
                f"(each gate stays one node and keeps skipping); or build the backbone with feature_cls='list', "
                f"'hook' or 'getter', which gateify converts as it is.")
    return (f"found no residual addition to gate in {type(model).__name__}. gateify gates `x + F(x)` performed in a "
            f"block module's forward, where x is the block input (or its downsampled/normalised shortcut) and F "
            f"contains a convolution or linear layer. Models without skip connections (VGG, plain CNNs) have nothing "
            f"to skip; if your blocks are traced as leaves, check leaf_modules.")


def _unskippable_message(unskippable: Mapping[str, str], refused: bool) -> str:
    listed = "; ".join(f"'{p}': {why}" for p, why in unskippable.items())
    head = ("found residual additions, but none whose branch can be skipped: " if refused
            else "residual additions left ungated, as their branch cannot be skipped: ")
    return (head + listed + ". Such a block runs as in the source model. Pass leaf_modules=[<the block>] to say "
            "so and silence this.")


def _shared_message(shared: Mapping[str, str]) -> str:
    listed = "; ".join(f"'{p}' is {why}" for p, why in shared.items())
    return (f"residual blocks left ungated, as one gate per module cannot decide for each of its calls: {listed}. "
            f"Such a block runs as in the source model; give each call site a module of its own to gate it, or pass "
            f"leaf_modules=[<the block>] to silence this.")


def _opaque_message(model: nn.Module, failures: Mapping[str, str]) -> str:
    by_class: dict[str, list[str]] = {}
    for path in failures:
        by_class.setdefault(type(model.get_submodule(path)).__name__, []).append(path)
    listed = ", ".join(f"{cls} ({len(paths)}, e.g. '{paths[0]}')" for cls, paths in by_class.items())
    return (f"timm calls {listed} as a whole (register_notrace_module), and their forward does not trace on its own "
            f"either: a residual addition inside them, if any, is not gated. Pass leaf_modules=[{', '.join(by_class)}] "
            f"to silence this.")


def _branch_modules(path: str, gm: fx.GraphModule) -> set[str]:
    """Model-level paths of the modules and tensors that the gates of block ``path`` run in their branches."""
    found = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ResidualGate):
            found |= {join_path(path, p.target) for p in node.args[2] if isinstance(p, fx.Node) and p.op == "get_attr"}
    return found


def _nested(branch_modules: Mapping[str, set[str]]) -> dict[str, str]:
    """Converted block -> the converted block in whose residual branch it runs (skipping that one skips it too)."""
    return {inner: outer for inner in branch_modules for outer, used in branch_modules.items() if inner != outer
            and any(inner == m or inner.startswith(m + ".") for m in used)}


def _outer_first(paths: Iterable[str]) -> list[str]:
    """Parents before children: a child swapped into a parent that is replaced after would be lost."""
    return sorted(paths, key=lambda p: p.count("."))


def convert(
    model: nn.Module,
    config: Optional[GateConfig] = None,
    *,
    example_input: Optional[torch.Tensor] = None,
    leaf_modules: Sequence[Union[type, str]] = (),
    autowrap_functions: Sequence[Callable] = (),
    inplace: bool = False,
    **config_kwargs: Any,
) -> nn.Module:
    """Gate every residual block of ``model`` per sample; returns the converted model.

    Args:
        model: any residual network (timm or torchvision ResNet, ConvNeXt, ViT, Swin, MobileNet, EfficientNet,
            gateify's CIFAR zoo, your own) with real weights. Each residual addition of a block is a gate: a
            transformer block has two (attention, MLP; docs/method.md).
        config: a :class:`GateConfig`; or pass its fields as keywords (``gate="cir"``, ``hidden=16``, ...).
        example_input: a tensor the model accepts, ``(B, C, H, W)``; default: random, at the size the model was
            built for (``img_size=``, see :func:`gateify.models.input_shape`), else ``pretrained_cfg['input_size']``
            (else 3x224x224), with the first convolution's input channels.
        leaf_modules: classes or module paths that the tracer must call as a whole rather than trace through.
        autowrap_functions: functions the tracer must record as calls rather than trace through.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The converted model: the same class at the top (timm's ``forward_features``, ``pretrained_cfg`` etc. stay),
        each residual block replaced by a ``GraphModule`` with the block's submodules under their original names
        plus a ``gate`` (:class:`ResidualGate`). Gates start in mode ``"auto"`` and keep every sample.

    Raises:
        AlreadyConvertedError, MetaDeviceError, UntraceableModelError (no block could be traced; names the
        modules and the leaf-module remedy), NoResidualBlocksError, InputShapeError. The input model is left
        unchanged when any of these is raised. A ``GateifyWarning`` names what was left ungated and why: a module
        that cannot be traced but holds no block (it is called as a whole), a residual block nested inside
        another's branch (it is skipped with its outer block), a block that the example input never reaches, a
        residual addition whose branch cannot be skipped (ReXNet's channel-slice sum), a block the network calls
        from several places (CoaT's shared position encodings: one gate cannot decide for each call).
    """
    _check_convertible(model)
    if config is None:
        config = GateConfig(**config_kwargs)
    elif config_kwargs:
        raise GateifyError("pass either config=GateConfig(...) or its fields as keywords, not both.")
    leaf_types, leaf_names = _leaf_args(leaf_modules)
    start = time.perf_counter()

    work = model if inplace else copy.deepcopy(model)
    candidates, failures, opaque = discover_blocks(work, leaf_types, leaf_names, autowrap_functions, is_addition)
    failures.pop("", None)  # the root is never replaced, so its own forward need not be traceable
    opaque_failures = {p: failures.pop(p) for p in list(failures) if p in opaque}
    x = _example_input(work, example_input)
    block_inputs, calls = _capture_block_inputs(work, [p for p in candidates if p], x)  # in call order
    shared = _shared_blocks(work, block_inputs, calls)
    block_inputs = {p: call for p, call in block_inputs.items() if p not in shared}

    # Each block is called as a whole from the graph of a block around it (FastViT's token mixer, torchvision's
    # encoder layers), so its residual additions are gated in its own graph and nowhere else
    blocks = {p for p in candidates if p}
    leaf_names |= blocks
    converted: dict[str, fx.GraphModule] = {}
    block_gates: dict[str, list[ResidualGate]] = {}
    block_failures: dict[str, str] = {}  # blocks whose own forward could not be traced for gating
    unskippable: dict[str, str] = {}  # residual additions that cannot be skipped, and why
    for path, call in block_inputs.items():
        block = work.get_submodule(path)
        try:
            block_graph = trace_block(block, path, leaf_types, leaf_names, autowrap_functions, concrete_none=call.none)
        except TraceFailure as f:
            block_failures[f.failed] = str(f)
            continue
        gm = fx.GraphModule(block, block_graph, class_name=f"Gated{type(block).__name__}")
        gm.meta["gateify_block_class"] = type(block).__name__  # survives deepcopy, unlike the class name
        flags = training_flags(gm)  # the block's own flags, per submodule (GraphModule shares the submodules)
        gm.eval()  # shape propagation must not touch BatchNorm running statistics
        try:
            with torch.no_grad():
                recorder = ValueRecorder(gm)
                recorder.propagate(*call.args)
        except Exception as e:  # the traced forward does not run on the block's own inputs
            block_failures[path] = f"{type(block).__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        finally:
            restore_training_flags(gm, flags)
        gm.training = block.training
        remove_dead_pure_nodes(gm.graph)
        child_blocks = [n for n in gm.graph.nodes if n.op == "call_module" and join_path(path, n.target) in blocks]
        residuals: list[tuple[fx.Node, fx.Node, fx.Node]] = []
        for n in list(gm.graph.nodes):
            if enclosing_module(n):  # a submodule's addition is that submodule's (a block of its own, if any)
                continue
            split = split_residual(n, gm, earlier=[add for add, _, _ in residuals] + child_blocks)
            if split is not None:
                residuals.append((n, *split))
        gated, replaced = [], {}  # an addition already gated -> its gate call (a later residual's shortcut)
        for add, shortcut, branch in residuals:
            try:
                node = gate_residual(gm, add, replaced.get(shortcut, shortcut), replaced.get(branch, branch), config,
                                     path, recorder.values, primary=not gated)
            except NotAResidual as e:
                _logger.debug("block '%s': %s is not gated: %s", path, add.name, e)
                continue
            except UnskippableResidual as e:
                unskippable[path] = str(e)
                continue
            replaced[add] = node
            gated.append(gm.get_submodule(node.target))
        if gated:
            gm.graph.lint()
            gm.recompile()
            converted[path], block_gates[path] = gm, gated
    branch_modules = {path: _branch_modules(path, gm) for path, gm in converted.items()}

    def in_a_branch(p: str) -> bool:
        return any(p == m or p.startswith(m + ".") for used in branch_modules.values() for m in used)

    # a block inside a converted block's branch is not gated on its own (see nested below): that it cannot be
    # traced by itself (Swin's WindowAttention traces differently in train and eval) changes nothing
    failures.update({p: why for p, why in block_failures.items() if not in_a_branch(p)})
    unskippable = {p: why for p, why in unskippable.items() if not in_a_branch(p)}
    if not converted:
        if failures:
            raise UntraceableModelError(untraceable_message(failures))
        if unskippable:
            raise NoResidualBlocksError(_unskippable_message(unskippable, refused=True))
        if shared:
            raise NoResidualBlocksError(_shared_message(shared))
        raise NoResidualBlocksError(_no_residual_message(model))
    notes = []
    nested = _nested(branch_modules)
    for inner in nested:  # the outer gate's branch runs the inner block as it was
        del converted[inner], block_gates[inner]
    if nested:
        pairs = list(nested.items())
        listed = "; ".join(f"'{inner}' is a residual block inside the branch of '{outer}'"
                           for inner, outer in pairs[:3])
        more = f" (and {len(pairs) - 3} more)" if len(pairs) > 3 else ""
        inner, outer = pairs[0]
        notes.append(f"{listed}{more}: such a block is not gated on its own (skipping '{outer}' skips it too). Pass "
                     f"leaf_modules=['{inner}', ...] to keep the outer gates and silence this.")
    if unskippable:
        notes.append(_unskippable_message(unskippable, refused=False))
    if shared:
        notes.append(_shared_message(shared))
    unreached = [p for p in candidates if p and p not in block_inputs and p not in shared and not in_a_branch(p)
                 and not any(p.startswith(o + ".") for o in converted)]
    if unreached:
        notes.append(f"blocks {unreached} perform an addition but neither an eval() nor a train() run of the model "
                     f"on the example input of shape {tuple(x.shape)} reached them, so they are not gated; pass an "
                     f"example_input that reaches them.")
    if failures:
        notes.append("some modules were called as a whole instead of traced through; a residual addition in their "
                     "own forward, if any, is not gated. " + untraceable_message(failures))
    opaque_failures = {p: why for p, why in opaque_failures.items() if not in_a_branch(p)}
    if opaque_failures:
        notes.append(_opaque_message(work, opaque_failures))
    for note in notes:
        warnings.warn(GateifyWarning(note), stacklevel=2)

    for path in _outer_first(converted):  # only now is anything swapped in: a failure above changes nothing
        work.set_submodule(path, converted[path])
    for i, gate in enumerate(_execution_order(work, [g for gated in block_gates.values() for g in gated], x)):
        gate.index = i
    _logger.info("gated %d residual blocks in %.2fs", len(block_gates), time.perf_counter() - start)
    return work


def _replace_gated_blocks(model: nn.Module, keep: Callable[[str, ResidualGate], bool], inplace: bool,
                          needed_by: str) -> nn.Module:
    require_gates(model, needed_by)
    work = model if inplace else copy.deepcopy(model)
    blocks: dict[str, dict[str, bool]] = {}
    paths = {gate: path for path, gate in work.named_modules() if isinstance(gate, ResidualGate)}
    for name, gate in require_gates(work, needed_by).items():
        block, _, attr = paths[gate].rpartition(".")
        blocks.setdefault(block, {})[attr] = keep(name, gate)
    plain = {block: inline_block(work.get_submodule(block), decisions) for block, decisions in blocks.items()}
    for block in _outer_first(plain):  # all built first: a failure above leaves the model as it was
        work.set_submodule(block, plain[block])
    return work


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The converted model without its gates: every block computes ``branch + shortcut`` again.

    The top-level class is the original one and the state dict has the original keys and (fine-tuned) values, so
    ``timm.create_model(name).load_state_dict(to_dense(gated).state_dict())`` gives back the library's own classes.
    Every module keeps its own train/eval flag.
    """
    return _replace_gated_blocks(model, lambda name, gate: True, inplace, "to_dense")


def to_static(model: nn.Module, keep: Optional[Mapping[str, bool]] = None, *, inplace: bool = False) -> nn.Module:
    """A plain model with one fixed decision per block baked in: kept blocks compute ``branch + shortcut``, the
    others their shortcut only and no longer contain their branch's modules.

    Args:
        keep: ``{block: keep}`` (blocks not named are kept), e.g. from :func:`gateify.select_blocks` or
            :func:`gateify.static_twin`. Default: the gates' own ``static_keep``, which requires every gate to be
            in ``"static"`` mode (:func:`gateify.set_static`); any other mode is refused rather than silently
            returning the dense model.

    No gates, no data-dependent shapes: exports with ``torch.export`` and ONNX like any ResNet.
    """
    found = require_gates(model, "to_static")
    if keep is None:
        modes = {name: g.mode for name, g in found.items() if g.mode != "static"}
        if modes:
            raise GateifyError(
                f"to_static needs a fixed decision per block, but gates {sorted(modes)[:4]} are in modes "
                f"{sorted(set(modes.values()))}, not 'static'. Pass the selection: gateify.to_static(model, keep="
                f"gateify.static_twin(model, loader)) or keep=gateify.select_blocks(model, loader, target), or call "
                f"gateify.set_static(model, keep) first.")
        return _replace_gated_blocks(model, lambda name, gate: bool(gate.static_keep), inplace, "to_static")
    unknown = set(keep) - set(found)
    if unknown:
        raise GateifyError(f"keep names unknown blocks {sorted(unknown)}; blocks are {list(found)}.")
    return _replace_gated_blocks(model, lambda name, gate: bool(keep.get(name, True)), inplace, "to_static")

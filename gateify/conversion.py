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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

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
from .rewrite import EXAMPLE_BATCH, ValueRecorder, gate_residual, inline_block
from .tracing import TraceFailure, discover_blocks, trace_block, untraceable_message

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


def _positional(module: nn.Module, path: str, args: tuple, kwargs: dict) -> tuple:
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
        return args
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise GateifyError(f"block '{path}' ({type(module).__name__}) was called with arguments its forward "
                           f"signature does not accept ({e}). Pass leaf_modules=['{path}'] to call it as a "
                           f"whole (ungated).") from e
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _capture_block_inputs(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> dict[str, tuple]:
    """Each block's first inputs, positional and keyword ones in its forward's parameter order, in the order blocks
    ran: from an eval-mode run of ``model(x)``, then for blocks that only run in training (``if self.training:
    ...``), from a train-mode run whose BatchNorm statistics are restored after. Blocks neither run reaches are
    left out."""
    seen: dict[str, tuple] = {}
    handles = []
    for path in paths:
        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            if path not in seen:
                seen[path] = _positional(module, path, args, kwargs)
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    flags = training_flags(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
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
        restore_training_flags(model, flags)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for h in handles:
            h.remove()
    return seen


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


def _no_residual_message(model: nn.Module) -> str:
    return (f"found no residual addition to gate in {type(model).__name__}. gateify gates `x + F(x)` performed in a "
            f"block module's forward, where x is the block input (or its downsampled/normalised shortcut) and F "
            f"contains a convolution or linear layer. Models without skip connections (VGG, plain CNNs) have nothing "
            f"to skip; if your blocks are traced as leaves, check leaf_modules.")


def _nested(paths: Sequence[str]) -> dict[str, str]:
    """Inner block -> the converted block whose graph it lies in (its forward was traced into the outer one)."""
    return {p: outer for p in paths for outer in paths if p != outer and p.startswith(outer + ".")}


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
        model: any ResNet-like ``nn.Module`` (timm, torchvision, gateify's CIFAR zoo, your own) with real weights.
        config: a :class:`GateConfig`; or pass its fields as keywords (``gate="cir"``, ``hidden=16``, ...).
        example_input: a tensor the model accepts, ``(B, C, H, W)``; default: ``pretrained_cfg['input_size']``
            (else 3x224x224) with the first convolution's input channels.
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
        another's branch (it is skipped with its outer block), a block that the example input never reaches.
    """
    _check_convertible(model)
    if config is None:
        config = GateConfig(**config_kwargs)
    elif config_kwargs:
        raise GateifyError("pass either config=GateConfig(...) or its fields as keywords, not both.")
    leaf_types, leaf_names = _leaf_args(leaf_modules)
    start = time.perf_counter()

    work = model if inplace else copy.deepcopy(model)
    candidates, failures = discover_blocks(work, leaf_types, leaf_names, autowrap_functions, is_addition)
    failures.pop("", None)  # the root is never replaced, so its own forward need not be traceable
    x = _example_input(work, example_input)
    block_inputs = _capture_block_inputs(work, [p for p in candidates if p], x)  # in call order

    converted: dict[str, fx.GraphModule] = {}
    block_gates: dict[str, list[ResidualGate]] = {}
    block_failures: dict[str, str] = {}  # blocks whose own forward could not be traced for gating
    for path, args in block_inputs.items():
        block = work.get_submodule(path)
        try:
            block_graph = trace_block(block, path, leaf_types, leaf_names, autowrap_functions)
        except TraceFailure as f:
            block_failures[f.failed] = str(f)
            continue
        gm = fx.GraphModule(block, block_graph, class_name=f"Gated{type(block).__name__}")
        gm.meta["gateify_block_class"] = type(block).__name__  # survives deepcopy, unlike the class name
        flags = training_flags(gm)  # the block's own flags, per submodule (GraphModule shares the submodules)
        gm.eval()  # shape propagation must not touch BatchNorm running statistics
        with torch.no_grad():
            recorder = ValueRecorder(gm)
            recorder.propagate(*args)
        restore_training_flags(gm, flags)
        gm.training = block.training
        remove_dead_pure_nodes(gm.graph)
        residuals: list[tuple[fx.Node, fx.Node, fx.Node]] = []
        for n in list(gm.graph.nodes):
            split = split_residual(n, gm, earlier=[add for add, _, _ in residuals])
            if split is not None:
                residuals.append((n, *split))
        gated, replaced = [], {}  # an addition already gated -> its gate call (a later residual's shortcut)
        for add, shortcut, branch in residuals:
            node = gate_residual(gm, add, replaced.get(shortcut, shortcut), replaced.get(branch, branch), config,
                                 path, recorder.values, primary=not gated)
            replaced[add] = node
            gated.append(gm.get_submodule(node.target))
        if gated:
            gm.graph.lint()
            gm.recompile()
            converted[path], block_gates[path] = gm, gated
    # a block inside a converted block's branch would not be gated on its own anyway (see nested below): that it
    # cannot be traced by itself (Swin's WindowAttention traces differently in train and eval) changes nothing
    failures.update({p: why for p, why in block_failures.items()
                     if not any(p.startswith(outer + ".") for outer in converted)})
    if not converted:
        if failures:
            raise UntraceableModelError(untraceable_message(failures))
        raise NoResidualBlocksError(_no_residual_message(model))
    notes = []
    nested = _nested(list(converted))
    for inner, outer in nested.items():  # the outer block's graph calls the inner block's layers directly
        del converted[inner], block_gates[inner]
        notes.append(f"'{inner}' is a residual block inside the branch of '{outer}': it is not gated on its own "
                     f"(skipping '{outer}' skips it too). Pass leaf_modules=['{inner}'] to keep the outer gate "
                     f"and silence this.")
    unreached = [p for p in candidates if p and p not in block_inputs and not any(p.startswith(o + ".") for o in converted)]
    if unreached:
        notes.append(f"blocks {unreached} perform an addition but neither an eval() nor a train() run of the model "
                     f"on the example input of shape {tuple(x.shape)} reached them, so they are not gated; pass an "
                     f"example_input that reaches them.")
    if failures:
        notes.append("some modules were called as a whole instead of traced through; a residual addition in their "
                     "own forward, if any, is not gated. " + untraceable_message(failures))
    for note in notes:
        warnings.warn(GateifyWarning(note), stacklevel=2)

    for path, gm in converted.items():  # only now is anything swapped in: a failure above changes nothing
        work.set_submodule(path, gm)
    for i, gate in enumerate(g for gated in block_gates.values() for g in gated):
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
    for block, module in plain.items():  # all built first: a failure above leaves the model as it was
        work.set_submodule(block, module)
    for hooks in (work._forward_pre_hooks, work._forward_hooks):  # gateify.route's passes need the gates
        for key in [k for k, hook in hooks.items() if getattr(hook, "gateify_routing", False)]:
            del hooks[key]
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

"""The conversion pass: ``torch.fx`` finds every residual addition of a model and gates it.

How a residual addition is recognised, inside the ``forward`` of the module that performs it (the *block*):
an ``add`` of two tensors of equal shape that fork from the block's input with no convolution or linear layer
shared by both sides (so the fork is the block input itself, or a normalisation of it, as in pre-activation
ResNets). The side with more parametrised layers is the branch ``F``, the other the shortcut ``S``. Additions
inside a branch (Res2Net's hierarchical sums, attention pooling) fork after a convolution and are left alone.

Each block with such an addition is re-traced on its own and becomes a ``GraphModule`` that keeps the block's
submodules under their original names, so ``state_dict`` keys do not change; the branch nodes move into a
stateless :class:`~gateify.gate.ResidualGate` ``branch`` graph that receives the block's modules at every call.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import operator
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import (
    AlreadyConvertedError,
    GateifyError,
    GateifyWarning,
    InputShapeError,
    MetaDeviceError,
    NoResidualBlocksError,
    NotConvertedError,
    UntraceableModelError,
)
from .gate import MODES, GateConfig, ResidualGate
from .models import input_shape

__all__ = ["convert", "gates", "set_mode", "to_dense", "to_static", "GateifyTracer", "call_module"]

_logger = logging.getLogger(__name__)

_ADD_FUNCTIONS = (operator.add, torch.add)
_HEAVY_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.matmul,
                    torch.bmm, torch.mm, operator.matmul)
_EXAMPLE_BATCH = 2  # the example input's batch; shapes tracking it mark batched tensors


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A branch graph's way of calling a module its block passes in (kept importable for pickling)."""
    return module(*args, **kwargs)


def _default_leaf_types() -> tuple[type, ...]:
    """timm's notrace modules, torchvision.ops modules (e.g. StochasticDepth), and gateify's own gate."""
    types: list[type] = [ResidualGate]
    try:
        from timm.layers import get_notrace_modules

        types += list(get_notrace_modules())
    except ImportError:  # timm is a dependency, but the pass itself does not need it
        pass
    try:
        import torchvision.ops

        types += [obj for _, obj in inspect.getmembers(torchvision.ops)
                  if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    except ImportError:
        pass
    return tuple(types)


def _default_autowrap() -> tuple[Callable, ...]:
    try:
        from timm.layers import get_notrace_functions

        return tuple(f for f in get_notrace_functions() if callable(f))
    except ImportError:
        return ()


class GateifyTracer(fx.Tracer):
    """``fx.Tracer`` with timm's leaf policy, extra leaf types or module paths, and failure localisation.

    Leaves are: ``torch.nn`` built-ins (fx's default), timm's ``register_notrace_module`` classes,
    ``torchvision.ops`` modules, ``leaf_types`` and the modules at ``leaf_names`` (paths relative to the traced
    root). When tracing fails, ``failed_module`` holds the path and class of the innermost module being traced.
    """

    def __init__(self, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = (),
                 autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(autowrap_modules=(math,),
                         autowrap_functions=tuple(dict.fromkeys(_default_autowrap() + tuple(autowrap_functions))))
        self.leaf_types = _default_leaf_types() + tuple(leaf_types)
        self.leaf_names = frozenset(leaf_names)
        self.failed_module: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the exception first
                self.failed_module = (self.path_of_module(m), type(m).__name__)
            raise


class _TraceFailure(Exception):
    """Tracing ``path`` failed inside the module at ``failed`` (a model-level path)."""

    def __init__(self, failed: str, cls: str, error: Exception) -> None:
        super().__init__(f"{cls}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self.failed, self.cls, self.error = failed, cls, error


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _trace(module: nn.Module, prefix: str, leaf_types: Sequence[type], leaf_names: Iterable[str],
           autowrap_functions: Sequence[Callable]) -> fx.Graph:
    """Trace ``module`` (found at ``prefix`` in the model); ``leaf_names`` are model-level paths."""
    cut = len(prefix) + 1 if prefix else 0
    local = [n[cut:] for n in leaf_names if not prefix or n.startswith(prefix + ".")]
    tracer = GateifyTracer(leaf_types, local, autowrap_functions)
    try:
        return tracer.trace(module)
    except Exception as e:
        path, cls = tracer.failed_module or ("", type(module).__name__)
        raise _TraceFailure(_join(prefix, path), cls, e) from e


def _untraceable_message(failures: dict[str, str]) -> str:
    listed = "; ".join(f"'{p or '<root>'}' ({why})" for p, why in failures.items())
    return (f"torch.fx could not trace {listed}. gateify traces a block's forward to gate it. If the failing code "
            f"sits in a submodule, mark that submodule a leaf so it is called as a whole: "
            f"gateify.convert(model, leaf_modules=[TheClass or 'its.path']), or decorate the class with "
            f"@timm.layers.register_notrace_module; wrap a function with autowrap_functions=[fn]. Data-dependent "
            f"control flow in a block's own forward must be moved into such a submodule.")


def _discover_blocks(model: nn.Module, leaf_types: Sequence[type], leaf_names: set[str],
                     autowrap_functions: Sequence[Callable]) -> tuple[list[str], dict[str, str]]:
    """Paths of the modules whose own forward performs an addition, and the modules that could not be traced.

    A module that fails to trace is called as a whole (a leaf) where it is used, and traced on its own; if its own
    forward fails, its children are traced one by one. So an untraceable head or stem costs nothing, and only a
    block whose own forward cannot be traced is lost (and reported).
    """
    found: list[str] = []
    failures: dict[str, str] = {}
    todo = [""]
    while todo:
        path = todo.pop(0)
        module = model.get_submodule(path)
        while True:
            try:
                graph = _trace(module, path, leaf_types, leaf_names, autowrap_functions)
            except _TraceFailure as f:
                failures[f.failed] = str(f)
                if f.failed == path:  # its own forward: look for blocks among its children
                    todo.extend(_join(path, name) for name, _ in module.named_children())
                    break
                leaf_names.add(f.failed)
                todo.append(f.failed)
                continue
            found += [_join(path, _enclosing_module(n)) for n in graph.nodes if _add_operands(n) is not None]
            break
    return list(dict.fromkeys(found)), failures


def _enclosing_module(node: fx.Node) -> str:
    """Path of the module whose forward produced ``node`` (for a leaf call: the module that called it)."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


def _signature(node: fx.Node) -> tuple:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return node.op, target, _enclosing_module(node)


def _trace_block(block: nn.Module, path: str, leaf_types: Sequence[type], leaf_names: set[str],
                 autowrap_functions: Sequence[Callable]) -> fx.Graph:
    """Trace a block in eval and train mode; make leaves of submodules whose traced code differs, until both agree.

    A submodule whose forward branches on ``self.training`` (drop-path, DropBlock, EvoNorm) would otherwise be
    frozen into its eval behaviour. Returns the eval-mode graph. Raises ``_TraceFailure`` for the block itself.
    """
    flags = training_flags(block)
    try:
        while True:
            graphs = []
            for train in (False, True):
                block.train(train)
                graphs.append(_trace(block, path, leaf_types, leaf_names, autowrap_functions))
            eval_nodes, train_nodes = (list(g.nodes) for g in graphs)
            diff = next((i for i, (a, b) in enumerate(zip(eval_nodes, train_nodes)) if _signature(a) != _signature(b)),
                        None if len(eval_nodes) == len(train_nodes) else min(len(eval_nodes), len(train_nodes)))
            if diff is None:
                return graphs[0]
            candidates = {_enclosing_module(nodes[diff]) for nodes in (eval_nodes, train_nodes) if diff < len(nodes)}
            candidates = {_join(path, c) for c in candidates} - leaf_names - {path}
            if not candidates:
                raise _TraceFailure(path, type(block).__name__, RuntimeError(
                    "its own forward traces differently in train() and eval() mode, so a converted block could not "
                    "behave like the original in both"))
            leaf = max(candidates, key=lambda p: p.count("."))  # the deepest module is the smallest to give up
            _logger.debug("treating %s as a leaf: it traces differently in train and eval", leaf)
            leaf_names.add(leaf)
    finally:
        restore_training_flags(block, flags)


def training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Every module's own train/eval flag: ``model.train(b)`` would overwrite deliberately frozen BatchNorms."""
    return {m: m.training for m in model.modules()}


def restore_training_flags(model: nn.Module, flags: dict[nn.Module, bool]) -> None:
    for m in model.modules():
        if m in flags:
            m.training = flags[m]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _is_heavy(node: fx.Node, root: nn.Module) -> bool:
    """A convolution, linear layer or matmul: what makes a branch worth skipping."""
    if node.op == "call_module":
        return any(p.ndim >= 2 for p in root.get_submodule(node.target).parameters())
    if node.op == "call_function":
        return node.target in _HEAVY_FUNCTIONS
    return False


def _param_count(nodes: Iterable[fx.Node], root: nn.Module) -> int:
    return sum(p.numel() for n in nodes if n.op == "call_module" for p in root.get_submodule(n.target).parameters())


def _add_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    if node.kwargs:
        return None
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (node.op == "call_method" and node.target == "add"):
        if len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            return node.args[0], node.args[1]
    return None


def _tensor_shape(node: fx.Node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _split_residual(node: fx.Node, root: nn.Module) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(shortcut, branch)`` if ``node`` is a residual addition of this block's graph, else ``None``."""
    operands = _add_operands(node)
    if operands is None:
        return None
    a, b = operands
    shape_a, shape_b = _tensor_shape(a), _tensor_shape(b)
    if shape_a is None or shape_a != shape_b:
        return None
    anc_a, anc_b = _ancestors(a), _ancestors(b)
    shared = anc_a & anc_b
    if not any(n.op == "placeholder" for n in shared) or any(_is_heavy(n, root) for n in shared):
        return None  # not forking from the block input (e.g. a sum inside a branch)
    only_a, only_b = anc_a - shared, anc_b - shared
    heavy_a = sum(_is_heavy(n, root) for n in only_a)
    heavy_b = sum(_is_heavy(n, root) for n in only_b)
    if heavy_a == heavy_b:
        size_a, size_b = _param_count(only_a, root), _param_count(only_b, root)
        if size_a == size_b:
            return None
        heavy_a, heavy_b = size_a, size_b
    shortcut, branch = (a, b) if heavy_a < heavy_b else (b, a)
    if not any(_is_heavy(n, root) for n in _ancestors(branch) - shared):
        return None
    return shortcut, branch


def _branch_nodes(branch: fx.Node, shortcut: fx.Node, add: fx.Node) -> list[fx.Node]:
    """Nodes computed only for the branch, in graph order: they can be skipped for a sample."""
    candidates = _ancestors(branch) - _ancestors(shortcut)
    candidates = {n for n in candidates if n.op not in ("placeholder", "get_attr")}
    changed = True
    while changed:  # a node with a user outside the branch must run for everyone, and so must its inputs
        changed = False
        for n in list(candidates):
            if n in candidates and any(u not in candidates and u is not add for u in n.users):
                candidates -= _ancestors(n)
                changed = True
    order = {n: i for i, n in enumerate(branch.graph.nodes)}
    return sorted(candidates, key=order.__getitem__)


def _remove_dead_pure_nodes(graph: fx.Graph) -> None:
    """Drop unused results of pure calls (e.g. ``spx[0]`` never read) so they do not pin nodes to the block.

    Conservative on purpose: in-place calls (``relu_``, ``add_``), impure calls and module calls stay.
    """
    for n in reversed(list(graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method", "get_attr"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op != "get_attr" and (name.endswith("_") or n.is_impure()):
            continue
        graph.erase_node(n)


def _unique_attr(module: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _batched(node: fx.Node, batch: int) -> bool:
    shape = _tensor_shape(node)
    return shape is not None and len(shape) > 0 and shape[0] == batch and any(
        n.op == "placeholder" for n in _ancestors(node))


class _ValueRecorder(ShapeProp):
    """Shape propagation that also keeps every node's value, to tell fresh tensors from aliases."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _owned(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """``node``'s tensor is read by nothing else and shares memory with no other value of the block, so an
    addition may write into it. An ``nn.Identity`` shortcut returns the block input itself: not owned."""
    if node.op == "placeholder" or len(node.users) != 1 or not isinstance(values.get(node), torch.Tensor):
        return False
    ptr = values[node].untyped_storage().data_ptr()
    return not any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr
                   for n, v in values.items() if n is not node)


def _gate_residual(gm: fx.GraphModule, add: fx.Node, shortcut: fx.Node, branch: fx.Node,
                   config: GateConfig, block_path: str, values: dict[fx.Node, Any]) -> ResidualGate:
    """Move the branch of ``add`` into a gate and replace ``add`` by the gate call, in place."""
    graph = gm.graph
    nodes = _branch_nodes(branch, shortcut, add)
    if branch not in nodes:
        raise GateifyError(f"block '{block_path}': the residual branch output is also used outside the addition, "
                           f"so it cannot be skipped; pass leaf_modules=['{block_path}'] to leave this block alone.")
    inside = set(nodes)
    inputs: list[fx.Node] = []
    params: list[fx.Node | str] = []  # get_attr nodes of the block, or submodule targets to fetch
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp not in inside:
                bucket = params if inp.op == "get_attr" else inputs
                if inp not in bucket:
                    bucket.append(inp)
        if n.op == "call_module" and n.target not in params:
            params.append(n.target)
    batched = [_batched(n, _EXAMPLE_BATCH) for n in inputs]
    ctrl_index = next((i for i, (n, b) in enumerate(zip(inputs, batched)) if b and len(_tensor_shape(n)) >= 2), None)
    if ctrl_index is None:
        raise GateifyError(f"block '{block_path}': the residual branch reads no batched (B, C, ...) tensor, "
                           f"so no per-sample decision can be made; pass leaf_modules=['{block_path}'].")

    # the branch as a stateless graph: inputs first, then the block's modules/tensors it uses
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = sub.placeholder(f"x{i}" if i else "x")
    module_args: dict[str, fx.Node] = {}
    for p in params:
        name = (p.target if isinstance(p, fx.Node) else p).replace(".", "_")
        ph = sub.placeholder(f"p_{name}")
        if isinstance(p, fx.Node):
            env[p] = ph
        else:
            module_args[p] = ph
    for n in nodes:
        if n.op == "call_module":
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = sub.create_node("call_function", call_module, (module_args[n.target], *args), kwargs, name=n.name)
            env[n].meta = dict(n.meta)
        else:
            env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[branch])
    branch_gm = fx.GraphModule(nn.Module(), sub, class_name="ResidualBranch")

    channels = _tensor_shape(inputs[ctrl_index])[1]
    gate = ResidualGate(branch_gm, channels, batched, config, ctrl_index)
    gate.owns_shortcut = _owned(shortcut, values)
    name = _unique_attr(gm, "gate")
    gm.add_submodule(name, gate)
    with graph.inserting_before(add):
        param_nodes = tuple(p if isinstance(p, fx.Node) else graph.get_attr(p) for p in params)
        gate_node = graph.call_module(name, (shortcut, tuple(inputs), param_nodes))
    gate_node.meta = dict(add.meta)
    add.replace_all_uses_with(gate_node)
    graph.erase_node(add)
    for n in reversed(nodes):
        graph.erase_node(n)
    return gate


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
        if example_input.shape[0] < _EXAMPLE_BATCH:  # batched tensors are told apart by their leading dim
            example_input = example_input.expand(_EXAMPLE_BATCH, *example_input.shape[1:])
        floating = example_input.is_floating_point()
        return example_input[:_EXAMPLE_BATCH].to(device=device, dtype=dtype if floating else None)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_EXAMPLE_BATCH, *input_shape(model), generator=generator).to(device=device, dtype=dtype)


def _capture_block_inputs(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> dict[str, tuple]:
    """Run ``model(x)`` once in eval mode; each block's first positional inputs, in the order blocks ran."""
    seen: dict[str, tuple] = {}
    handles = []
    for path in paths:
        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            if kwargs:
                raise GateifyError(f"block '{path}' is called with keyword arguments {sorted(kwargs)}; gateify "
                                   f"gates blocks called positionally. Pass leaf_modules=['{path}'] to skip it.")
            seen.setdefault(path, args)
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    flags = training_flags(model)
    try:
        model.eval()
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
        unchanged when any of these is raised. A module that cannot be traced but holds no block costs nothing
        (it is called as a whole); a ``GateifyWarning`` names it.
    """
    _check_convertible(model)
    if config is None:
        config = GateConfig(**config_kwargs)
    elif config_kwargs:
        raise GateifyError("pass either config=GateConfig(...) or its fields as keywords, not both.")
    leaf_types, leaf_names = _leaf_args(leaf_modules)
    start = time.perf_counter()

    work = model if inplace else copy.deepcopy(model)
    candidates, failures = _discover_blocks(work, leaf_types, leaf_names, autowrap_functions)
    failures.pop("", None)  # the root is never replaced, so its own forward need not be traceable
    x = _example_input(work, example_input)
    block_inputs = _capture_block_inputs(work, [p for p in candidates if p], x)  # in call order

    converted: dict[str, fx.GraphModule] = {}
    gate_list: list[ResidualGate] = []
    for path, args in block_inputs.items():
        block = work.get_submodule(path)
        try:
            block_graph = _trace_block(block, path, leaf_types, leaf_names, autowrap_functions)
        except _TraceFailure as f:
            failures[f.failed] = str(f)
            continue
        gm = fx.GraphModule(block, block_graph, class_name=f"Gated{type(block).__name__}")
        gm.meta["gateify_block_class"] = type(block).__name__  # survives deepcopy, unlike the class name
        flags = training_flags(gm)  # the block's own flags, per submodule (GraphModule shares the submodules)
        gm.eval()  # shape propagation must not touch BatchNorm running statistics
        with torch.no_grad():
            recorder = _ValueRecorder(gm)
            recorder.propagate(*args)
        restore_training_flags(gm, flags)
        gm.training = block.training
        _remove_dead_pure_nodes(gm.graph)
        residuals = [(n, *split) for n in list(gm.graph.nodes) if (split := _split_residual(n, gm)) is not None]
        for add, shortcut, branch in residuals:
            gate_list.append(_gate_residual(gm, add, shortcut, branch, config, path, recorder.values))
        if residuals:
            gm.graph.lint()
            gm.recompile()
            converted[path] = gm
    if not converted:
        if failures:
            raise UntraceableModelError(_untraceable_message(failures))
        raise NoResidualBlocksError(_no_residual_message(model))
    if failures:
        warnings.warn(GateifyWarning(
            "some modules were called as a whole instead of traced through; a residual addition in their own "
            "forward, if any, is not gated. " + _untraceable_message(failures)), stacklevel=2)

    for path, gm in converted.items():  # only now is anything swapped in: a failure above changes nothing
        work.set_submodule(path, gm)
    for i, gate in enumerate(gate_list):
        gate.index = i
    _logger.info("gated %d residual blocks in %.2fs", len(gate_list), time.perf_counter() - start)
    return work


def _inline_block(gm: fx.GraphModule, keep: dict[str, bool]) -> fx.GraphModule:
    """The block without gates: each gate call becomes ``branch + shortcut`` (kept) or the shortcut (removed).

    The branch graph's module calls become ``call_module`` nodes of the block again, so submodule names and the
    state dict are the original ones; a removed branch's modules are no longer referenced and are dropped.
    """
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ResidualGate):
            continue
        gate: ResidualGate = gm.get_submodule(node.target)
        shortcut, inputs, params = node.args
        with graph.inserting_before(node):
            if keep[node.target]:
                placeholders = [n for n in gate.branch.graph.nodes if n.op == "placeholder"]
                env = dict(zip(placeholders, [*inputs, *params]))
                for n in gate.branch.graph.nodes:
                    if n.op == "placeholder":
                        continue
                    if n.op == "output":
                        out = graph.call_function(operator.add, (env[n.args[0]], shortcut))
                        break
                    if n.op == "call_function" and n.target is call_module:
                        module = env[n.args[0]]
                        args = fx.node.map_arg(n.args[1:], env.__getitem__)
                        env[n] = graph.call_module(module.target, args, fx.node.map_arg(n.kwargs, env.__getitem__))
                    else:
                        env[n] = graph.node_copy(n, env.__getitem__)
            elif gate.owns_shortcut:
                out = shortcut
            else:  # what follows may act in place (ReLU(inplace=True)): do not hand it the block input
                out = graph.call_method("clone", (shortcut,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for n in reversed(list(graph.nodes)):  # modules and tensors fetched for the gate, now unused
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)
    graph.lint()
    name = gm.meta.get("gateify_block_class", "Block")
    plain = fx.GraphModule(gm, graph, class_name=name)
    plain.train(gm.training)
    return plain


def _replace_gated_blocks(model: nn.Module, keep: Callable[[str, ResidualGate], bool], inplace: bool) -> nn.Module:
    found = gates(model)
    if not found:
        raise NotConvertedError("this model has no gates; it is already plain.")
    work = model if inplace else copy.deepcopy(model)
    blocks: dict[str, dict[str, bool]] = {}
    for name, gate in gates(work).items():
        path = next(p for p, m in work.named_modules() if m is gate)
        block, _, attr = path.rpartition(".")
        blocks.setdefault(block, {})[attr] = keep(name, gate)
    plain = {block: _inline_block(work.get_submodule(block), decisions) for block, decisions in blocks.items()}
    for block, module in plain.items():  # all built first: a failure above leaves the model as it was
        work.set_submodule(block, module)
    return work


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The converted model without its gates: every block computes ``branch + shortcut`` again.

    The top-level class is the original one and the state dict has the original keys and (fine-tuned) values, so
    ``timm.create_model(name).load_state_dict(to_dense(gated).state_dict())`` gives back the library's own classes.
    """
    return _replace_gated_blocks(model, lambda name, gate: True, inplace)


def to_static(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain model with each block's fixed decision baked in: ``static_keep`` blocks compute ``branch +
    shortcut``, the others their shortcut only and no longer contain their branch's modules.

    No gates, no data-dependent shapes: exports with ``torch.export`` and ONNX like any ResNet. Set the
    decisions first with :func:`gateify.static.set_static` (or :func:`gateify.static.select_blocks`).
    """
    return _replace_gated_blocks(model, lambda name, gate: bool(gate.static_keep), inplace)


def _no_residual_message(model: nn.Module) -> str:
    return (f"found no residual addition to gate in {type(model).__name__}. gateify gates `x + F(x)` performed in a "
            f"block module's forward, where x is the block input (or its downsampled/normalised shortcut) and F "
            f"contains a convolution or linear layer. Models without skip connections (VGG, plain CNNs) have nothing "
            f"to skip; if your blocks are traced as leaves, check leaf_modules.")


def gates(model: nn.Module) -> "OrderedDict[str, ResidualGate]":
    """Block name -> its gate, in execution order. ``{}`` for a model that is not converted.

    A DistributedDataParallel / DataParallel wrapper is looked through, so names are the same with or without it.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualGate)]
    found.sort(key=lambda item: getattr(item[1], "index", 0))
    out: OrderedDict[str, ResidualGate] = OrderedDict()
    for name, gate in found:
        block, _, attr = name.rpartition(".")
        out[block if attr == "gate" else name] = gate
    return out


def set_mode(model: nn.Module, mode: str, *, threshold: Optional[Union[float, dict[str, float]]] = None,
             tau: Optional[float] = None, noise: Optional[float] = None) -> nn.Module:
    """Set every gate's mode (and optionally its hard threshold, Gumbel temperature, noise scale).

    Args:
        mode: ``"gumbel"`` (training), ``"hard"`` (deterministic inference, real skip), ``"dense"`` (every gate open:
            the source model's output), ``"static"`` (each block's fixed ``static_keep``), or ``"auto"``
            (``gumbel`` in train(), ``hard`` in eval(); the default after :func:`convert`).
        threshold: keep probability at or above which ``hard`` mode keeps a sample (0 keeps all, >1 skips all);
            one float for every gate or a ``{block name: float}`` dict as keyed by :func:`gates`.
        tau: Gumbel-Softmax temperature. noise: scale of the Gumbel noise (0 = deterministic).

    Returns:
        ``model``, for chaining.
    """
    if mode not in MODES:
        raise GateifyError(f"mode={mode!r} is not a gate mode; use one of {MODES}.")
    found = gates(model)
    if not found:
        raise NotConvertedError("this model has no gates; call gateify.convert(model) first.")
    thresholds = threshold if isinstance(threshold, dict) else {name: threshold for name in found}
    unknown = set(thresholds) - set(found)
    if unknown:
        raise GateifyError(f"threshold names unknown blocks {sorted(unknown)}; blocks are {list(found)}.")
    bad = {k: t for k, t in thresholds.items() if t is not None and not t >= 0}
    if bad:
        raise GateifyError(f"thresholds {bad} must be >= 0 (0 keeps all, >1 skips all).")
    if tau is not None and not tau > 0:
        raise GateifyError(f"tau={tau} must be > 0.")
    if noise is not None and not noise >= 0:
        raise GateifyError(f"noise={noise} must be >= 0.")
    for name, gate in found.items():  # validated above: nothing is half-set
        gate.mode = mode
        if thresholds.get(name) is not None:
            gate.threshold.fill_(float(thresholds[name]))
        if tau is not None:
            gate.tau = float(tau)
        if noise is not None:
            gate.noise = float(noise)
    return model

"""Tracing policy of the conversion pass: which modules are leaves, and where tracing failed.

Leaves are called as a whole instead of traced through: ``torch.nn`` built-ins (fx's default), timm's
``register_notrace_module`` classes and ``register_notrace_function`` functions, ``torchvision.ops`` modules
(e.g. StochasticDepth), gateify's own gate, and whatever the user passes as ``leaf_modules``. A module that fails to
trace is made a leaf where it is used and traced on its own, so an untraceable head or stem costs nothing; only a
block whose own forward cannot be traced is lost, and the error or warning names it with the remedy.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Collection, Iterable, Optional, Sequence

from torch import fx, nn

from .gate import ResidualGate
from .modes import restore_training_flags, training_flags

__all__ = ["GateifyTracer", "TraceFailure", "trace_module", "discover_blocks", "trace_block", "enclosing_module",
           "join_path", "untraceable_message"]

_logger = logging.getLogger(__name__)


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


def _notrace_types() -> tuple[type, ...]:
    """timm's ``register_notrace_module`` classes: called as a whole, but possibly blocks themselves."""
    try:
        from timm.layers import get_notrace_modules

        return tuple(t for t in get_notrace_modules() if t is not ResidualGate)
    except ImportError:
        return ()


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


class TraceFailure(Exception):
    """Tracing failed inside the module at ``failed`` (a model-level path) of class ``cls``."""

    def __init__(self, failed: str, cls: str, error: Exception) -> None:
        super().__init__(f"{cls}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self.failed, self.cls, self.error = failed, cls, error


def join_path(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def trace_module(module: nn.Module, prefix: str, leaf_types: Sequence[type], leaf_names: Iterable[str],
                 autowrap_functions: Sequence[Callable], concrete_none: Collection[str] = ()) -> fx.Graph:
    """Trace ``module`` (found at ``prefix`` in the model); ``leaf_names`` are model-level paths.

    ``concrete_none``: forward parameters traced as the ``None`` they were called with (``mask=None``), so that
    ``if mask is not None:`` takes the branch it took; the graph asserts they are None when it runs, and keeps their
    names, so keyword calls still work.
    """
    cut = len(prefix) + 1 if prefix else 0
    local = [n[cut:] for n in leaf_names if not prefix or n.startswith(prefix + ".")]
    tracer = GateifyTracer(leaf_types, local, autowrap_functions)
    try:
        graph = tracer.trace(module, concrete_args={name: None for name in concrete_none} or None)
    except Exception as e:
        path, cls = tracer.failed_module or ("", type(module).__name__)
        raise TraceFailure(join_path(prefix, path), cls, e) from e
    if concrete_none:  # fx renames a specialised parameter (mask -> mask_1): give it its name back
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        taken = {n.name for n in graph.nodes}
        for param, node in zip(params, placeholders):
            if param.name in concrete_none and node.target != param.name and param.name not in taken:
                node.target = node.name = param.name
    for node in graph.nodes:
        # a forward written under ``from __future__ import annotations`` has string annotations; fx writes them into
        # the generated code as undefined names ('torch.Tensor' -> _torch_Tensor_), which TorchScript then rejects
        # (to_dense/to_static blocks must script as their source did). Unannotated means Tensor to TorchScript.
        if isinstance(node.type, str):
            node.type = None
    return graph


def untraceable_message(failures: dict[str, str]) -> str:
    listed = "; ".join(f"'{p or '<root>'}' ({why})" for p, why in failures.items())
    return (f"torch.fx could not trace {listed}. gateify traces a block's forward to gate it. If the failing code "
            f"sits in a submodule, mark that submodule a leaf so it is called as a whole: "
            f"gateify.convert(model, leaf_modules=[TheClass or 'its.path']), or decorate the class with "
            f"@timm.layers.register_notrace_module; wrap a function with autowrap_functions=[fn]. Data-dependent "
            f"control flow in a block's own forward must be moved into such a submodule.")


def enclosing_module(node: fx.Node) -> str:
    """Path of the module whose forward produced ``node`` (for a leaf call: the module that called it)."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


def discover_blocks(model: nn.Module, leaf_types: Sequence[type], leaf_names: set[str],
                    autowrap_functions: Sequence[Callable],
                    is_addition: Callable[[fx.Node], bool]) -> tuple[list[str], dict[str, str], set[str]]:
    """Paths of the modules whose own forward performs an addition, the modules that could not be traced (and why),
    and the modules timm registers as not traceable that were looked into.

    Every module is traced in eval and in train mode (``if self.training: x = self.extra(x)`` reaches a block in one
    of them only). A module that fails to trace is called as a whole (a leaf) where it is used, and traced on its
    own; if its own forward fails, its children are traced one by one. ``leaf_names`` gains the modules made leaves;
    the modules it names on entry (the caller's ``leaf_modules``) are never looked into, wherever they sit.
    Modules timm registers as not traceable (``NormFreeBlock``, ``TinyVitBlock``) stay leaves where they are used
    and are looked into the same way (a block among them is gated in its own graph).
    """
    found: list[str] = []
    failures: dict[str, str] = {}
    opaque: set[str] = set()
    notrace = _notrace_types()
    todo, seen = [""], {""}
    named_leaves = set(leaf_names)
    flags = training_flags(model)
    try:
        while todo:
            path = todo.pop(0)
            if path in named_leaves:  # inside a module that failed to trace: still a leaf, as the caller said
                continue
            module = model.get_submodule(path)
            graphs = []
            if type(module).forward is nn.Module.forward:  # a container without forward (ModuleList): look inside
                children = [join_path(path, name) for name, _ in module.named_children()]
                todo.extend(c for c in children if c not in seen)
                seen.update(children)
                continue
            for train in (False, True):
                module.train(train)
                while True:
                    try:
                        graphs.append(trace_module(module, path, leaf_types, leaf_names, autowrap_functions))
                    except TraceFailure as f:
                        failures[f.failed] = str(f)
                        if f.failed != path:  # a submodule: call it as a whole here, look inside it on its own
                            leaf_names.add(f.failed)
                            if f.failed not in seen:
                                seen.add(f.failed)
                                todo.append(f.failed)
                            continue
                    break
            if not graphs:  # its own forward: look for blocks among its children
                children = [join_path(path, name) for name, _ in module.named_children()]
                todo.extend(c for c in children if c not in seen)
                seen.update(children)
                continue
            found += [join_path(path, enclosing_module(n)) for g in graphs for n in g.nodes if is_addition(n)]
            for g in graphs:
                for n in g.nodes:
                    target = join_path(path, n.target) if n.op == "call_module" else None
                    if target and target not in seen and target not in leaf_names and isinstance(
                            model.get_submodule(target), notrace) and not isinstance(model.get_submodule(target),
                                                                                      tuple(leaf_types)):
                        seen.add(target)  # timm calls it as a whole (NormFreeBlock): look into it on its own
                        opaque.add(target)
                        todo.append(target)
    finally:
        restore_training_flags(model, flags)
    return list(dict.fromkeys(found)), failures, opaque


def _signature(node: fx.Node) -> tuple:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return node.op, target, enclosing_module(node)


def trace_block(block: nn.Module, path: str, leaf_types: Sequence[type], leaf_names: set[str],
                autowrap_functions: Sequence[Callable], concrete_none: Collection[str] = ()) -> fx.Graph:
    """Trace a block in eval and train mode; make leaves of submodules whose traced code differs, until both agree.

    A submodule whose forward branches on ``self.training`` (drop-path, DropBlock, EvoNorm) would otherwise be
    frozen into its eval behaviour. Returns the eval-mode graph. Raises :class:`TraceFailure` for the block itself.
    ``concrete_none``: see :func:`trace_module`.
    """
    flags = training_flags(block)
    try:
        while True:
            graphs = []
            for train in (False, True):
                block.train(train)
                graphs.append(trace_module(block, path, leaf_types, leaf_names, autowrap_functions, concrete_none))
            eval_nodes, train_nodes = (list(g.nodes) for g in graphs)
            diff = next((i for i, (a, b) in enumerate(zip(eval_nodes, train_nodes)) if _signature(a) != _signature(b)),
                        None if len(eval_nodes) == len(train_nodes) else min(len(eval_nodes), len(train_nodes)))
            if diff is None:
                return graphs[0]
            candidates = {enclosing_module(nodes[diff]) for nodes in (eval_nodes, train_nodes) if diff < len(nodes)}
            candidates = {join_path(path, c) for c in candidates} - leaf_names - {path}
            if not candidates:
                raise TraceFailure(path, type(block).__name__, RuntimeError(
                    "its own forward traces differently in train() and eval() mode, so a converted block could not "
                    "behave like the original in both"))
            leaf = max(candidates, key=lambda p: p.count("."))  # the deepest module is the smallest to give up
            _logger.debug("treating %s as a leaf: it traces differently in train and eval", leaf)
            leaf_names.add(leaf)
    finally:
        restore_training_flags(block, flags)

"""The rewrite and its inverse, side by side: a residual addition becomes a gate call, and back.

:func:`gate_residual` moves the branch nodes of one ``add`` into a stateless :class:`~gateify.gate.ResidualGate`
``branch`` graph that receives the block's modules and tensors at every call, and replaces the ``add`` by the gate.
:func:`inline_block` undoes it for a whole block: each gate call becomes ``branch + shortcut`` again (or the
shortcut alone, for a branch removed by static pruning), with the block's own module calls and names.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GateifyError
from .gate import GateConfig, ResidualGate
from .matching import ancestors, branch_nodes, tensor_shape

__all__ = ["call_module", "gate_residual", "inline_block", "ResidualBranch", "ValueRecorder", "EXAMPLE_BATCH"]

EXAMPLE_BATCH = 2  # the example input's batch; shapes tracking it mark batched tensors


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A branch graph's way of calling a module its block passes in (kept importable for pickling)."""
    return module(*args, **kwargs)


class ResidualBranch(fx.GraphModule):
    """A gate's branch ``F`` as a stateless graph (the block's modules and tensors come in as arguments).

    Every gate holds one, so this is where a gated model refuses TorchScript: ``torch.jit.script`` calls each
    submodule's ``__prepare_scriptable__`` before compiling anything, and the gate's per-sample skip (gather the kept
    samples, run ``F`` on them, scatter back) is Python that TorchScript cannot compile.
    """

    def __prepare_scriptable__(self) -> nn.Module:
        raise GateifyError(
            "torch.jit.script cannot compile a gated model: TorchScript is not supported for gateify gates, whose "
            "per-sample skip is data-dependent Python. Use torch.export.export(model.eval(), (x,)) instead (each gate "
            "becomes a torch.cond that still skips per sample; docs/export.md), or script a model without gates: "
            "gateify.to_dense(model) or gateify.to_static(model).")


def _unique_attr(module: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _batched(node: fx.Node, batch: int) -> bool:
    shape = tensor_shape(node)
    return shape is not None and len(shape) > 0 and shape[0] == batch and any(
        n.op == "placeholder" for n in ancestors(node))


class ValueRecorder(ShapeProp):
    """Shape propagation that also keeps every node's value, to tell fresh tensors from aliases."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _owned(node: fx.Node, values: Mapping[fx.Node, Any]) -> bool:
    """``node``'s tensor is read by nothing else and shares memory with no other value of the block, so an
    addition may write into it. An ``nn.Identity`` shortcut returns the block input itself: not owned."""
    if node.op == "placeholder" or len(node.users) != 1 or not isinstance(values.get(node), torch.Tensor):
        return False
    ptr = values[node].untyped_storage().data_ptr()
    return not any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr
                   for n, v in values.items() if n is not node)


def gate_residual(gm: fx.GraphModule, add: fx.Node, shortcut: fx.Node, branch: fx.Node,
                   config: GateConfig, block_path: str, values: Mapping[fx.Node, Any], primary: bool) -> ResidualGate:
    """Move the branch of ``add`` into a gate and replace ``add`` by the gate call, in place."""
    graph = gm.graph
    nodes = branch_nodes(branch, shortcut, add)
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
    batched = [_batched(n, EXAMPLE_BATCH) for n in inputs]
    ctrl_index = next((i for i, (n, b) in enumerate(zip(inputs, batched)) if b and len(tensor_shape(n)) >= 2), None)
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
    branch_gm = ResidualBranch(nn.Module(), sub, class_name="ResidualBranch")

    channels = tensor_shape(inputs[ctrl_index])[1]
    gate = ResidualGate(branch_gm, channels, batched, config, ctrl_index)
    gate.owns_shortcut = _owned(shortcut, values)
    gate.primary = primary
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


def inline_block(gm: fx.GraphModule, keep: Mapping[str, bool]) -> fx.GraphModule:
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
    plain.training = gm.training  # the block's own flag only: its submodules (a frozen BatchNorm) keep theirs
    return plain

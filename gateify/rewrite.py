"""The rewrite and its inverse, side by side: a residual addition becomes a gate call, and back.

:func:`gate_residual` moves the branch nodes of one ``add`` into a stateless :class:`~gateify.gate.ResidualGate`
``branch`` graph that receives the block's modules and tensors at every call, and replaces the ``add`` by the gate.
:func:`inline_block` undoes it for a whole block: each gate call becomes ``branch + shortcut`` again (or the
shortcut alone, for a branch removed by static pruning), with the block's own module calls and names.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GateifyError
from .gate import GateConfig, ResidualGate
from .matching import ancestors, branch_nodes, is_heavy, tensor_shape

__all__ = ["call_module", "channel_dim", "gate_residual", "NotAResidual", "UnskippableResidual", "inline_block",
           "ResidualBranch", "ValueRecorder", "EXAMPLE_BATCH"]

EXAMPLE_BATCH = 2  # the example input's batch; shapes tracking it mark batched tensors


class NotAResidual(GateifyError):
    """The addition's branch output is read elsewhere too (EdgeNeXt's and Res2Net's hierarchical sums over channel
    splits): it is no skip connection, and is left as it is."""


class UnskippableResidual(GateifyError):
    """A residual addition whose branch cannot be skipped per sample; the message says why."""


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A branch graph's way of calling a module its block passes in (kept importable for pickling)."""
    return module(*args, **kwargs)


def attention_mask(mask: Any, query: torch.Tensor, key: torch.Tensor) -> Any:
    """An attention mask shared by the batch (a relative position bias of shape ``(1, heads, N, N)``), expanded
    (a view) to ``(B, heads, N, N)`` for ``F.scaled_dot_product_attention``.

    Inside a gate the branch runs on a sub-batch whose size is data-dependent; the attention's own broadcasting
    check (``mask.size(0) == 1``?) cannot be decided on it, so torch.export refuses. Expanded, the sizes agree
    symbolically. Only in a graph (export, compile): eager keeps the kernel the block chose, bit for bit."""
    if not isinstance(mask, torch.Tensor) or not torch.compiler.is_compiling():
        return mask
    return mask.expand(*query.shape[:-1], key.shape[-2])


def roll(x: torch.Tensor, shifts: Any, dims: Any = None) -> torch.Tensor:
    """``torch.roll`` (Swin's shifted windows); while a graph is traced, as two slices and a ``cat`` per dimension.

    torch.roll's decomposition first asks whether the tensor is empty, which torch cannot decide for a gate's
    sub-batch (its size comes from ``nonzero``), so torch.export refuses; slices along the rolled (spatial)
    dimensions ask nothing of the batch. Eager calls torch.roll itself."""
    if dims is None or not torch.compiler.is_compiling():
        return torch.roll(x, shifts, dims)
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    for shift, dim in zip(shifts, dims):
        size = x.shape[dim]
        shift = shift % size
        if shift:
            x = torch.cat((x.narrow(dim, size - shift, shift), x.narrow(dim, 0, size - shift)), dim)
    return x


def adaptive_avg_pool(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool2d``; to ``1x1``, while a graph is traced, the mean over the last two dimensions.

    On a sub-batch whose size is data-dependent (routing's escalated samples), the pool's decomposition asks whether
    that size exceeds 1 for a strided input (a ConvNeXt's head), which torch.export cannot decide; the mean asks
    nothing of the batch. Eager calls the pool itself."""
    if torch.compiler.is_compiling() and output_size in (1, (1, 1), [1, 1]):
        return x.mean((-2, -1), keepdim=True)
    return F.adaptive_avg_pool2d(x, output_size)


def exportable_pools(graph: fx.Graph, root: nn.Module) -> None:
    """Route ``graph``'s 2-D adaptive average pools (module calls and ``F.adaptive_avg_pool2d``) through
    :func:`adaptive_avg_pool`: for a graph that runs on a sub-batch of data-dependent size."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            node.target = adaptive_avg_pool
        elif node.op == "call_module":
            pool = root.get_submodule(node.target)
            if not isinstance(pool, nn.AdaptiveAvgPool2d):
                continue
            with graph.inserting_before(node):
                pooled = graph.call_function(adaptive_avg_pool, (node.args[0], pool.output_size))
            node.replace_all_uses_with(pooled)
            graph.erase_node(node)


def _exportable_sub_batch(graph: fx.Graph) -> None:
    """Make a branch graph traceable on a sub-batch of unknown size (undone by :func:`inline_block`): calls to
    ``torch.roll`` go through :func:`roll`, and the ``attn_mask`` of every ``F.scaled_dot_product_attention``
    through :func:`attention_mask`."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.roll:
            node.target = roll
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:  # torch._C._nn's own
            continue
        positional = len(node.args) > 3
        mask = node.args[3] if positional else node.kwargs.get("attn_mask")
        query = node.args[0] if node.args else node.kwargs.get("query")
        key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        if not all(isinstance(n, fx.Node) for n in (mask, query, key)):
            continue
        with graph.inserting_before(node):
            expanded = graph.call_function(attention_mask, (mask, query, key))
        if positional:
            node.update_arg(3, expanded)
        else:
            node.update_kwarg("attn_mask", expanded)


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


# layers whose channel axis is fixed: 1 for convolutions and batch/group/instance norms, -1 for linear layers and
# layer norms (they act on the last dimension of (B, N, C) tokens or (B, H, W, C) maps)
_CHANNELS_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                           nn.modules.instancenorm._InstanceNorm)
_CHANNELS_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
_CHANNELS_FIRST_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm,
                             F.group_norm, F.instance_norm)
_CHANNELS_LAST_FUNCTIONS = (F.linear, F.layer_norm, F.rms_norm)


def _layer_channel_dim(node: fx.Node, root: nn.Module) -> Optional[int]:
    """The axis of its input that ``node``'s layer reads as channels (1 or -1), ``None`` for other nodes."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, _CHANNELS_FIRST_MODULES):
            return 1
        if isinstance(module, _CHANNELS_LAST_MODULES):
            return -1
    elif node.op == "call_function":
        if node.target in _CHANNELS_FIRST_FUNCTIONS:
            return 1
        if node.target in _CHANNELS_LAST_FUNCTIONS:
            return -1
    return None


def channel_dim(x: fx.Node, nodes: Sequence[fx.Node], root: nn.Module) -> int:
    """The channel axis of the branch input ``x``: 1 (``(B, C, H, W)``, ``(B, C, L)``) or -1 (``(B, N, C)`` tokens,
    ``(B, H, W, C)`` maps), as the first layer of the branch that reads ``x`` (through any reshaping) sees it.

    That layer's channel count ``c`` is matched against ``x``'s second and last sizes; where both or neither match
    (a 4x4 map of 4 channels), the layer's own axis decides when it reads ``x`` itself, else axis 1 (the ResNet
    case). A layer-norm reached through a permute (timm's ``LayerNorm2d``) thus gives axis 1 for an NCHW input."""
    shape = tensor_shape(x)
    if shape is None or len(shape) <= 2:
        return 1
    reached = {x}
    for n in nodes:
        if not any(i in reached for i in n.all_input_nodes):
            continue
        reached.add(n)
        axis = _layer_channel_dim(n, root)
        data = n.args[0] if n.args else None
        data_shape = tensor_shape(data) if isinstance(data, fx.Node) else None
        if axis is None or data_shape is None or len(data_shape) < 2:
            continue
        c = data_shape[axis]
        first, last = shape[1] == c, shape[-1] == c
        if first != last:
            return 1 if first else -1
        return axis if data is x else 1
    return 1


_SHAPE_FUNCTIONS = (getattr, operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                    operator.truediv, operator.mod, operator.neg)
_SHAPE_METHODS = ("size", "dim", "numel")


def _shape_arithmetic(node: fx.Node, values: Mapping[fx.Node, Any]) -> Optional[set[fx.Node]]:
    """``node`` and the nodes it is computed from, if it is arithmetic on tensor shapes (``B, H, W, C = x.shape``,
    ``H // 2``) down to the tensors themselves; else ``None``."""
    if node not in values or isinstance(values[node], torch.Tensor):
        return None
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        if node.target is getattr and node.args[1] != "shape":
            return None
    elif not (node.op == "call_method" and node.target in _SHAPE_METHODS):
        return None
    cone = {node}
    for inp in node.all_input_nodes:
        if isinstance(values.get(inp), torch.Tensor):
            continue  # the tensor whose shape is read
        inner = _shape_arithmetic(inp, values)
        if inner is None:
            return None
        cone |= inner
    return cone


def gate_residual(gm: fx.GraphModule, add: fx.Node, shortcut: fx.Node, branch: fx.Node,
                   config: GateConfig, block_path: str, values: Mapping[fx.Node, Any], primary: bool) -> fx.Node:
    """Move the branch of ``add`` into a gate and replace ``add`` by the gate call, in place; returns that call."""
    graph = gm.graph
    nodes = branch_nodes(branch, shortcut, add)
    if branch not in nodes:
        raise NotAResidual(f"the output of its branch '{branch.name}' is also read outside the addition")
    if not any(is_heavy(n, gm) for n in nodes):
        raise UnskippableResidual(
            f"the layers of its branch also compute what the block keeps besides the sum (ReXNet adds the shortcut "
            f"to a slice of the channels and concatenates the rest), so skipping the addition would skip nothing")
    # Shapes the branch reads from outside it (MaxViT takes B, H, W, C = x.shape before asserting on H and W) are
    # computed again inside the branch, from the tensors they describe: on a gathered sub-batch, B is its own size
    shapes: set[fx.Node] = set()
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp not in nodes:
                shapes |= _shape_arithmetic(inp, values) or set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    copied = sorted(set(nodes) | shapes, key=order.__getitem__)  # the branch graph's nodes
    inside = set(copied)
    inputs: list[fx.Node] = []
    # get_attr nodes of the block, submodule targets to fetch, and values that are no tensor (ViT's attn_mask=None,
    # is_causal=False): the same for every sample, so never gathered, and no operand of export's torch.cond
    params: list[fx.Node | str] = []
    for n in copied:
        for inp in n.all_input_nodes:
            if inp not in inside:
                constant = inp in values and not isinstance(values[inp], torch.Tensor)
                bucket = params if inp.op == "get_attr" or constant else inputs
                if inp not in bucket:
                    bucket.append(inp)
        if n.op == "call_module" and n.target not in params:
            params.append(n.target)
    batched = [_batched(n, EXAMPLE_BATCH) for n in inputs]
    # the controller reads the richest batched input: CaiT's class-attention branch reads the class token (the same
    # for every sample in the first such block) and the patch tokens
    candidates = [i for i, (n, b) in enumerate(zip(inputs, batched)) if b and len(tensor_shape(n)) >= 2]
    ctrl_index = max(candidates, key=lambda i: tensor_shape(inputs[i]).numel(), default=None)
    if ctrl_index is None:
        raise UnskippableResidual("its branch reads no tensor whose first dimension is the model's batch (MobileViT "
                                  "folds image patches into it), so no per-sample decision can be made")

    # the branch as a stateless graph: inputs first, then the block's modules/tensors it uses
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = sub.placeholder(f"x{i}" if i else "x")
    module_args: dict[str, fx.Node] = {}
    for p in params:
        name = p if isinstance(p, str) else p.target if p.op == "get_attr" else p.name
        name = name.replace(".", "_")
        ph = sub.placeholder(f"p_{name}")
        if isinstance(p, fx.Node):
            env[p] = ph
        else:
            module_args[p] = ph
    for n in copied:
        if n.op == "call_module":
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = sub.create_node("call_function", call_module, (module_args[n.target], *args), kwargs, name=n.name)
            env[n].meta = dict(n.meta)
        else:
            env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[branch])
    _exportable_sub_batch(sub)
    branch_gm = ResidualBranch(nn.Module(), sub, class_name="ResidualBranch")

    dim = channel_dim(inputs[ctrl_index], copied, gm)
    gate = ResidualGate(branch_gm, tensor_shape(inputs[ctrl_index])[dim], batched, config, ctrl_index)
    if dim != 1 and hasattr(gate.scorer, "channel_dim"):  # a controller pools over tokens, reads channels
        gate.scorer.channel_dim = dim
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
    return gate_node


def inline_block(gm: fx.GraphModule, keep: Mapping[str, bool], *, sub_batch: bool = False) -> fx.GraphModule:
    """The block without gates: each gate call becomes ``branch + shortcut`` (kept) or the shortcut (removed).

    The branch graph's module calls become ``call_module`` nodes of the block again, so submodule names and the
    state dict are the original ones; a removed branch's modules are no longer referenced and are dropped.
    ``sub_batch``: the block will run on a sub-batch of data-dependent size (routing's escalated samples), so
    the branches keep :func:`roll` and :func:`attention_mask`; otherwise they call torch.roll and take the mask as
    the block did.
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
                    if n.op == "call_function" and n.target is attention_mask and not sub_batch:  # as it was
                        env[n] = env[n.args[0]]
                    elif n.op == "call_function" and n.target is roll and not sub_batch:
                        env[n] = graph.node_copy(n, env.__getitem__)
                        env[n].target = torch.roll
                    elif n.op == "call_function" and n.target is call_module:
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

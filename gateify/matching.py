"""Residual matching: which ``add`` nodes of a block's graph are ``S(x) + F(x)``, and which nodes form ``F``.

An ``add`` of two tensors of equal shape is a residual addition when both operands fork from the block's input with
no convolution or linear layer shared by both sides (so the fork is the block input itself, or a normalisation of
it, as in pre-activation ResNets), or from the output of an earlier residual addition of the same block or of a
block it calls (the MLP residual of a pre-norm transformer block, whose shortcut is the attention residual's
output). The side with more parametrised layers is the branch ``F``, the other the shortcut ``S``. Additions inside
a branch (Res2Net's hierarchical sums, attention pooling) fork after a convolution and are left alone.
"""

from __future__ import annotations

import operator
from typing import Collection, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["add_operands", "is_addition", "is_heavy", "split_residual", "branch_nodes", "ancestors", "tensor_shape",
           "remove_dead_pure_nodes"]

_ADD_FUNCTIONS = (operator.add, torch.add)
_HEAVY_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.matmul,
                    torch.bmm, torch.mm, operator.matmul)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def is_heavy(node: fx.Node, root: nn.Module) -> bool:
    """A convolution, linear layer or matmul: what makes a branch worth skipping."""
    if node.op == "call_module":
        return any(p.ndim >= 2 for p in root.get_submodule(node.target).parameters())
    if node.op == "call_function":
        return node.target in _HEAVY_FUNCTIONS
    return False


def _param_count(nodes: Iterable[fx.Node], root: nn.Module) -> int:
    return sum(p.numel() for n in nodes if n.op == "call_module" for p in root.get_submodule(n.target).parameters())


def add_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """The two tensor operands of an ``a + b`` node (``operator.add``, ``torch.add``, ``Tensor.add``), else None."""
    if node.kwargs:
        return None
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (node.op == "call_method" and node.target == "add"):
        if len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            return node.args[0], node.args[1]
    return None


def is_addition(node: fx.Node) -> bool:
    return add_operands(node) is not None


def tensor_shape(node: fx.Node) -> Optional[torch.Size]:
    """The shape shape propagation recorded for ``node`` (``None`` before it ran, or for a non-tensor)."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def split_residual(node: fx.Node, root: nn.Module,
                   earlier: Collection[fx.Node] = ()) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(shortcut, branch)`` if ``node`` is a residual addition of this block's graph, else ``None``.

    ``earlier``: the residual additions already found in this block. A fork at one of them counts as a fork at
    the block input: a pre-norm transformer block is ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, and the
    second shortcut is the first addition's output, which the attention's linear layers precede.
    """
    operands = add_operands(node)
    if operands is None:
        return None
    a, b = operands
    shape_a, shape_b = tensor_shape(a), tensor_shape(b)
    if shape_a is None or shape_a != shape_b:
        return None
    anc_a, anc_b = ancestors(a), ancestors(b)
    shared = anc_a & anc_b
    forks = [r for r in earlier if r in shared]
    before_fork = set().union(*(ancestors(r) for r in forks))  # settled by an earlier residual: may hold layers
    if not any(n.op == "placeholder" for n in shared) or any(is_heavy(n, root) for n in shared - before_fork):
        return None  # not forking from the block input or an earlier residual (e.g. a sum inside a branch)
    only_a, only_b = anc_a - shared, anc_b - shared
    heavy_a = sum(is_heavy(n, root) for n in only_a)
    heavy_b = sum(is_heavy(n, root) for n in only_b)
    if heavy_a == heavy_b:
        size_a, size_b = _param_count(only_a, root), _param_count(only_b, root)
        if size_a == size_b:
            return None
        heavy_a, heavy_b = size_a, size_b
    shortcut, branch = (a, b) if heavy_a < heavy_b else (b, a)
    if not any(is_heavy(n, root) for n in ancestors(branch) - shared):
        return None
    return shortcut, branch


def _in_place(node: fx.Node) -> bool:
    """``t.mul_(g)``, ``torch.relu_(t)``: a call that writes into its first argument."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_")


def branch_nodes(branch: fx.Node, shortcut: fx.Node, add: fx.Node) -> list[fx.Node]:
    """Nodes computed only for the branch, in graph order: they can be skipped for a sample.

    In-place writes into a branch tensor (NFNet's ``out.mul_(self.skipinit_gain)``, whose result nothing reads) are
    part of the branch: they run and are skipped with it."""
    candidates = ancestors(branch) - ancestors(shortcut)
    candidates = {n for n in candidates if n.op not in ("placeholder", "get_attr")}
    grown = True
    while grown:
        writes = {u for n in candidates for u in n.users if u not in candidates and u is not add and _in_place(u)
                  and u.args and u.args[0] is n and not u.users}
        grown = bool(writes)
        candidates |= writes
    changed = True
    while changed:  # a node with a user outside the branch must run for everyone, and so must its inputs
        changed = False
        for n in list(candidates):
            if n in candidates and any(u not in candidates and u is not add for u in n.users):
                candidates -= ancestors(n)
                changed = True
    order = {n: i for i, n in enumerate(branch.graph.nodes)}
    return sorted(candidates, key=order.__getitem__)


def remove_dead_pure_nodes(graph: fx.Graph) -> None:
    """Drop unused results of pure calls (e.g. ``spx[0]`` never read) so they do not pin nodes to the block.

    Conservative on purpose: in-place calls (``relu_``, ``add_``), impure calls, checks (``torch._assert``, fx's
    ``_assert_is_none`` on an argument traced as None) and module calls stay.
    """
    for n in reversed(list(graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method", "get_attr"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op != "get_attr" and (name.endswith("_") or name.startswith("_assert") or n.is_impure()):
            continue
        graph.erase_node(n)

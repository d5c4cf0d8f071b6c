"""Compiled inference for converted models: :func:`compile`, ``torch.compile`` that keeps real skipping in one graph.

Plain ``torch.compile(model)`` runs a converted model correctly but gains little: the kept sub-batch has a
data-dependent size, so dynamo breaks the graph at every hard decision and compiles the pieces between decisions
as separate frames; every gate's branch is its own ``GraphModule`` class, so those frames are new code per block and
a model with more than 8 blocks meets dynamo's recompile limit and runs partly eager.

:func:`compile` lets dynamo capture the decisions instead: each hard gate becomes, inside the graph,

    torch.cond(keep.all(), S + F(x),                            # every sample kept: no gather, no scatter
               torch.cond(keep.any(), S.index_add(idx, F(x[idx])),  # some kept: F on the kept sub-batch only
                          S))                                   # none kept: F never runs

so the whole model is one graph per input shape (no graph break, no recompilation per block or per decision), each
branch one compiled subgraph, and a skipped sample still never enters its branch. The module is named
``compiling`` rather than ``compile`` so that importing it never shadows the function ``gateify.compile``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .modes import require_gates, unwrap

__all__ = ["compile"]


def compile(model: nn.Module, *, channels_last: bool = True, **kwargs: Any) -> nn.Module:  # noqa: A001
    """``torch.compile(model, **kwargs)`` for a converted model, with every hard gate captured as ``torch.cond``.

        fast = gateify.compile(gated.eval())          # any torch.compile argument: backend=, mode=, dynamic=, ...
        y = fast(x)                                    # equals gated(x); compiles once per input shape

    Two settings make the one-graph form possible, both limited to this model:

    * dynamo's ``capture_dynamic_output_shape_ops`` is on while the compiled model runs (it is set around every
      call and reset after, because dynamo traces again whenever a new input shape arrives), so that ``nonzero``
      inside a cond's side is traced rather than breaking the graph;
    * with the default ``inductor`` backend, inductor's ``layout_optimization`` is off unless ``options`` sets it:
      inductor would otherwise store convolution outputs channels_last while each cond's sides were compiled for
      the strides the model ran with (torch 2.14 checks them and fails). What that optimisation buys is kept
      another way: with ``channels_last=True`` (the default) a 4-D input is handed to the graph as a channels_last
      copy, so the graph is traced channels_last throughout and every cond side agrees with it (CPU convolutions
      run markedly faster so: docs/latency.md). The parameters are not touched; a 4-D output comes back
      channels_last (equal values, other strides).

    Only ``"hard"`` gates (``eval()`` with mode ``"auto"``) change; dense, static and gumbel modes compile as plain
    ``torch.compile`` would. Gate statistics (``gate.last``) are not recorded inside the graph unless
    :func:`gateify.record_decisions` was on when it was traced.

    Args:
        model: a converted model (:func:`gateify.convert`) or a routed one (:func:`gateify.route`).
        channels_last: hand 4-D inputs to the compiled graph in channels_last memory format (see above).
        **kwargs: passed to ``torch.compile`` (``mode`` is turned into inductor ``options`` so that it combines
            with the layout setting).

    Returns:
        The compiled module (a ``torch._dynamo.OptimizedModule`` sharing ``model``'s parameters and buffers, so a
        new threshold or ``load_state_dict`` on ``model`` reaches it).
    """
    if not getattr(unwrap(model), "gateify_routed", False):  # a routed model's escalation is a cond as well
        require_gates(model, "gateify.compile")
    kwargs = dict(kwargs)
    if kwargs.get("backend", "inductor") == "inductor":
        mode = kwargs.pop("mode", None)
        options = dict(torch._inductor.list_mode_options(mode, kwargs.get("dynamic"))) if mode else {}
        options.update(kwargs.pop("options", None) or {})
        options.setdefault("layout_optimization", False)
        kwargs["options"] = options
    compiled = torch.compile(model, **kwargs)
    run = compiled.forward
    config = torch._dynamo.config

    @functools.wraps(run)
    def forward(*args: Any, **kw: Any) -> Any:
        if channels_last and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        if config.capture_dynamic_output_shape_ops:  # already on (set by the caller): leave it as it is
            return run(*args, **kw)
        config.capture_dynamic_output_shape_ops = True
        try:
            return run(*args, **kw)
        finally:
            config.capture_dynamic_output_shape_ops = False

    compiled.forward = forward
    return compiled

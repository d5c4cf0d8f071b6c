"""A routed model as one ONNX graph per level, run by a small onnxruntime driver: :func:`export_onnx_segments`,
:class:`OnnxRoutedSession`.

``torch.onnx.export(routed, (x,), dynamo=True)`` gives one graph whose escalation is an ONNX ``If``. It is exact,
but onnxruntime (1.32, CPU) optimises an ``If``'s subgraph less than a main graph: the deeper segment's convolutions
are not moved to its blocked NCHWc layout there, so the routed ResNet-20 ran 1.18-1.19x its two parts exported
alone at batch 16 and 64 (docs/latency.md). Here every level is its own main graph (its logits, the decision for
the next level and the values later levels start from), and the step between levels (pick the unsure rows, run the
next graph on them, put their logits back) is a few lines of NumPy, as :meth:`gateify.RoutedModel.forward` does in
PyTorch.

    gateify.export_onnx_segments(routed.eval(), example, "routed_onnx/")     # segment_0.onnx, ..., routing.json
    session = gateify.OnnxRoutedSession("routed_onnx/")                       # needs only onnxruntime and NumPy
    logits = session(x)                                                       # x: (B, C, H, W) float32 ndarray

The decisions are part of each level's graph, with the threshold the model had when it was exported (export again
after :func:`gateify.calibrate`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .errors import GateConfigError, WeightsFileError
from .routing import _require_routed

__all__ = ["export_onnx_segments", "OnnxRoutedSession", "SegmentModule"]

_FORMAT = "gateify-onnx-segments"
_VERSION = 1
_PLAN = "routing.json"


class SegmentModule(nn.Module):
    """Level ``level`` of a routed model (``eval()``) as a module of its own, for export and compilation.

    ``forward(*inputs) -> (logits, unsure, *carried)``: ``inputs`` the image batch (level 0) or the values live where
    the level departs; ``unsure`` ``(B,)`` bool, the samples the next level takes (absent for the last level);
    ``carried`` the values later levels start from, in the order of the routed model's plan."""

    def __init__(self, routed: nn.Module, level: int) -> None:
        super().__init__()
        self.routed, self.level = _require_routed(routed, "SegmentModule"), level

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.routed._plans[False].segments[self.level](self.routed, *inputs)
        if self.level + 1 < self.routed.levels:
            return (outs[0], self.routed._escalates(outs[0], self.level + 1), *outs[1:])
        return tuple(outs)


def export_onnx_segments(model: nn.Module, example: torch.Tensor, folder: Union[str, os.PathLike], *,
                         dynamic_batch: bool = True, **export_kwargs: Any) -> Path:
    """Write ``segment_<k>.onnx`` for every level of ``model`` and ``routing.json`` (how they connect) to ``folder``.

    Args:
        model: a routed model (:func:`gateify.route` or :func:`gateify.cascade`) in ``eval()``.
        example: an input batch ``(B, C, H, W)``; deeper levels are exported on the values it produces.
        dynamic_batch: every graph takes any batch size (otherwise ``example``'s, and every escalation count would
            need its own graph).
        **export_kwargs: passed to ``torch.onnx.export(..., dynamo=True)`` (``opset_version=``, ...).

    Returns:
        the folder, for :class:`OnnxRoutedSession`.
    """
    routed = _require_routed(model, "export_onnx_segments")
    if routed.training:
        raise GateConfigError("export_onnx_segments exports inference: call routed.eval() first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the plan goes last: while the graphs are (re)written, the folder does not load as a mix of two exports
    (folder / _PLAN).unlink(missing_ok=True)
    plan = routed._plans[False]
    inputs: dict[int, tuple[torch.Tensor, ...]] = {0: (example,)}
    names: list[list[str]] = []
    for k in range(routed.levels):
        values = inputs.pop(k)
        module = SegmentModule(routed, k).eval()
        with torch.no_grad():
            outs = module(*values)
        inputs.update(plan.split(k, outs[2 if k + 1 < routed.levels else 1:]))
        names.append([f"input_{i}" for i in range(len(values))])
        batch = torch.export.Dim("batch", min=1)
        shapes = (tuple({0: batch} for _ in values),) if dynamic_batch else None  # forward(*inputs): one tuple
        with warnings.catch_warnings():  # the exporter's progress notes
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, values, input_names=names[-1], dynamic_shapes=shapes, dynamo=True,
                                        verbose=False, **export_kwargs)
        program.save(str(folder / f"segment_{k}.onnx"))
    meta = {"format": _FORMAT, "version": _VERSION, "levels": routed.levels, "sources": plan.sources,
            "carries": plan.carries, "inputs": names, "threshold": routed.threshold.tolist()}
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        f.write(json.dumps(meta, indent=1))
    os.replace(f.name, folder / _PLAN)  # a reader never sees half a plan
    return folder


class OnnxRoutedSession:
    """Runs the graphs :func:`export_onnx_segments` wrote: ``session(x) -> logits``, ``(B, C, H, W) -> (B, classes)``
    as NumPy arrays, each row the output of the path its sample ended on (as ``routed(x)`` in ``eval()``).

    Args:
        folder: what :func:`export_onnx_segments` wrote.
        threads: onnxruntime's intra-op threads per session (its default where ``None``).
        providers: onnxruntime execution providers (CPU where ``None``).
    """

    def __init__(self, folder: Union[str, os.PathLike], *, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise GateConfigError("OnnxRoutedSession runs the graphs in onnxruntime, which is not installed: "
                                  "pip install 'gateify[onnx]' (or pip install onnxruntime).") from None
        folder = Path(folder)
        try:
            meta = json.loads((folder / _PLAN).read_text())
        except FileNotFoundError:
            raise WeightsFileError(f"{folder} holds no {_PLAN}: write the folder with "
                                   f"gateify.export_onnx_segments(routed, example, folder).") from None
        except json.JSONDecodeError as e:
            raise WeightsFileError(f"{folder / _PLAN} is damaged ({e}); export the segments again.") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise WeightsFileError(f"{folder / _PLAN} is not a gateify ONNX segment plan of version {_VERSION} "
                                   f"(format {meta.get('format')!r}, version {meta.get('version')!r}).")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # one session runs after another: threads left spinning after a level's run would slow the next level's
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.levels: int = int(meta["levels"])
            self.threshold: list[float] = list(meta["threshold"])
            self._carries = [[(int(m), int(n)) for m, n in level] for level in meta["carries"]]
            self._inputs: list[list[str]] = [list(names) for names in meta["inputs"]]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsFileError(f"{folder / _PLAN} is damaged ({type(e).__name__}: {e}); export the segments "
                                   f"again.") from None
        if len(self._carries) != self.levels or len(self._inputs) != self.levels:
            raise WeightsFileError(f"{folder / _PLAN} is damaged (its levels disagree); export the segments again.")
        self._sessions = []
        for k in range(self.levels):
            path = folder / f"segment_{k}.onnx"
            if not path.is_file():
                raise WeightsFileError(f"{path} is missing: export the segments again.")
            self._sessions.append(onnxruntime.InferenceSession(str(path), options,
                                                               providers=list(providers or ["CPUExecutionProvider"])))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_routes(x, want_levels=False)[0]

    def run_routes(self, x: np.ndarray, want_levels: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """``(logits, levels)``: the routed logits and each sample's path ``(B,)`` (``None`` unless ``want_levels``)."""
        outs = self._run(0, [x])
        return self._escalate(1, outs, want_levels)

    def _run(self, k: int, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._sessions[k].run(None, dict(zip(self._inputs[k], inputs)))

    def _split(self, k: int, outs: Sequence[np.ndarray]) -> dict[int, list[np.ndarray]]:
        carried, i = {}, 2 if k + 1 < self.levels else 1
        for later, n in self._carries[k]:
            carried[later] = list(outs[i:i + n])
            i += n
        return carried

    def _escalate(self, k: int, outs: list[np.ndarray], want_levels: bool,
                  carried: Optional[dict[int, list[np.ndarray]]] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Level ``k - 1``'s outputs: send its unsure rows on to level ``k``, and so on (as RoutedModel._escalate)."""
        logits = outs[0]
        carried = {**(carried or {}), **self._split(k - 1, outs)}
        levels = np.full(len(logits), k - 1, dtype=np.int64) if want_levels else None
        if k == self.levels:
            return logits, levels
        idx = np.flatnonzero(outs[1])
        if idx.size == 0:
            return logits, levels
        every = idx.size == len(logits)
        sub = carried if every else {m: [t[idx] for t in ts] for m, ts in carried.items()}
        deeper, deeper_levels = self._escalate(k + 1, self._run(k, sub.pop(k)), want_levels, sub)
        if every:
            return deeper.astype(logits.dtype, copy=False), deeper_levels
        logits = logits.copy()
        logits[idx] = deeper
        if want_levels:
            levels[idx] = deeper_levels
        return logits, levels

"""safetensors I/O: gated models with everything needed to rebuild them, and dense source weights.

A gated file holds every tensor of the model's state dict (base weights, controller parameters, BatchNorm
buffers, calibrated thresholds, static decisions) and flat string metadata: the format version, the gateify
version, the source architecture (timm or ``torchvision:`` name and its keyword arguments), the gate
configuration and each gate's mode. Nothing is ever unpickled; loading checks keys and shapes before copying, so
a mismatched file leaves the model untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .conversion import convert, gates
from .errors import GateifyError
from .gate import MODES, GateConfig
from .models import architecture_of, create_model

__all__ = ["save", "load", "load_dense", "atomic_save", "WeightsFileError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_FORMAT_KEY = "gateify_format"


class WeightsFileError(GateifyError):
    """A weights file is missing, not safetensors, damaged, from a newer gateify, or does not fit the model."""


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` to a temporary name, then an atomic rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _version() -> str:
    from . import __version__

    return __version__


def save(model: nn.Module, path: Union[str, os.PathLike], *, architecture: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``model`` (converted or plain) to ``path`` as safetensors, atomically.

    Args:
        architecture: ``{"name": ..., "kwargs": {...}}`` to rebuild the source model with
            :func:`gateify.create_model`; default: what :func:`gateify.create_model` or timm recorded. Without
            it the file still loads into a model you pass to :func:`load`.
    """
    module = getattr(model, "module", model)
    found = gates(module)
    arch = dict(architecture) if architecture is not None else architecture_of(module)
    configs = {json.dumps(g.config.to_dict(), sort_keys=True) for g in found.values()}
    if len(configs) > 1:
        raise WeightsFileError("gates with different configurations cannot be described by one file header.")
    metadata = {
        _FORMAT_KEY: str(FORMAT_VERSION),
        "gateify_version": _version(),
        "torch_version": torch.__version__,
        "architecture": json.dumps(arch),
        "gate_config": configs.pop() if configs else "null",
        "gates": json.dumps({name: {"mode": g.mode} for name, g in found.items()}),
    }
    state = module.state_dict()
    storages: dict[tuple, str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in storages:
            raise WeightsFileError(f"'{key}' shares memory with '{storages[ident]}' (tied weights); gateify.save "
                                   f"writes each tensor once: untie them or save with safetensors.torch.save_model.")
        storages[ident] = key
    atomic_save(state, os.fspath(path), metadata)


def read_safetensors(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; pickle files and damaged files are refused with the fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"no file at '{path}'.")
    if path.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")):
        with open(path, "rb") as f:
            head = f.read(2)
        if head in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise WeightsFileError(
                f"'{path}' is a pickle-based PyTorch file; gateify never unpickles files. If you trust it, convert "
                f"it once: safetensors.torch.save_file(torch.load(p, weights_only=True), 'weights.safetensors').")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFileError(f"'{path}' is not a readable safetensors file: it is truncated, corrupt or of "
                               f"another format ({type(e).__name__}: {e}).") from e
    return tensors, metadata


def _check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str, *, ignore_missing: str = "") -> None:
    """Raise before anything is copied if keys or shapes differ (``ignore_missing``: a key fragment allowed absent)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not (ignore_missing and ignore_missing in k)]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k}: file {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
              for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    if problems:
        raise WeightsFileError(f"'{path}' does not fit this model: " + "; ".join(problems) +
                               ". Was it saved from another architecture or with other num_classes/in_chans?")


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> nn.Module:
    """Load a file written by :func:`save`; returns the model with every tensor and gate mode restored.

    Args:
        model: ``None`` to rebuild the architecture recorded in the file (timm or torchvision name) and convert it
            with the recorded gate configuration; or your own model, plain (it is converted with the recorded
            configuration) or already converted. It is only modified once the file is known to fit.
    """
    path = os.fspath(path)
    tensors, metadata = read_safetensors(path)
    if _FORMAT_KEY not in metadata:
        raise WeightsFileError(f"'{path}' was not written by gateify.save (no '{_FORMAT_KEY}' metadata). For dense "
                               f"weights of the source model use gateify.load_dense(model, '{path}').")
    try:
        version = int(metadata[_FORMAT_KEY])
        arch = json.loads(metadata.get("architecture", "null"))
        config = json.loads(metadata.get("gate_config", "null"))
        modes = json.loads(metadata.get("gates", "{}"))
    except (ValueError, TypeError) as e:
        raise WeightsFileError(f"'{path}' has damaged gateify metadata ({e}).") from e
    if version > FORMAT_VERSION:
        raise WeightsFileError(f"'{path}' uses gateify file format {version}, newer than this gateify "
                               f"({_version()}, format {FORMAT_VERSION}); upgrade gateify to read it.")
    if model is None:
        if not arch:
            raise WeightsFileError(f"'{path}' does not record its architecture; pass the model: "
                                   f"gateify.load('{path}', model=<the source model>).")
        model = create_model(arch["name"], **arch.get("kwargs", {}))
    target = model
    if config is not None and not gates(model):
        target = convert(model, GateConfig.from_dict(config))
    if config is None and gates(model):
        raise WeightsFileError(f"'{path}' holds a plain (ungated) model but the model passed is converted.")
    _check_fits(target, tensors, path)
    unknown = {m["mode"] for m in modes.values()} - set(MODES)
    if unknown or set(modes) != set(gates(target)):
        raise WeightsFileError(f"'{path}' lists gates {sorted(modes)} with modes {sorted(unknown) or 'ok'}, but the "
                               f"model has gates {list(gates(target))}.")
    target.load_state_dict(tensors, strict=True)
    for name, gate in gates(target).items():
        gate.mode = modes[name]["mode"]
    return target


def load_dense(model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Load dense source weights (a timm/torchvision state dict, or a safetensors file of one) into ``model``.

    ``model`` may be the plain source model or its converted version: then only gate entries stay as they are.
    Keys and shapes are checked first; on a mismatch nothing is copied.
    """
    if isinstance(weights, Mapping):
        tensors, where = dict(weights), "the state dict"
    else:
        tensors, _ = read_safetensors(weights)
        where = os.fspath(weights)
    tensors = {k: v for k, v in tensors.items() if ".gate." not in k} if gates(model) else tensors
    _check_fits(model, tensors, where, ignore_missing=".gate.")
    model.load_state_dict(tensors, strict=False)
    return model

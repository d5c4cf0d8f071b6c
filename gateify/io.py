"""safetensors I/O: gated models with everything needed to rebuild them, and dense source weights.

A gated file holds every tensor of the model's state dict (base weights, controller parameters, BatchNorm
buffers, calibrated thresholds, static decisions) and flat string metadata: the format version, the gateify
version, the source architecture (timm or ``torchvision:`` name and its keyword arguments), the gate
configuration and each gate's mode, Gumbel temperature and noise scale. Nothing is ever unpickled; loading checks
keys and shapes before copying, so a mismatched file leaves the model untouched. Files are written atomically
(temporary name, then rename) with the permissions the process umask gives a new file.

A routed model (:func:`gateify.route`) is stored as its plain network (keys ``network.<source key>``) and its
``threshold_bits``, with its paths in the ``routing`` metadata (each path as the blocks it removes).

Format history: 1 (gateify 0.1.0) stored each threshold as a float32 ``threshold`` and a CIR gate's parameters as
``cir_scale``/``cir_offset`` beside an unused controller; 2 stores ``threshold_bits`` (the float32's int32 bits, so
weight averaging cannot touch it) and ``cir.scale``/``cir.offset``; 3 stores a routed model without gates (format 2
stored it as a converted model whose gates held the paths). Files of formats 1 and 2 still load.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Collection, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .conversion import convert
from ._version import __version__
from .errors import GateifyError, WeightsFileError
from .gate import MODES, GateConfig, ResidualGate
from .models import architecture_of, create_model
from .modes import gates, unwrap
from .routing import RoutedModel, is_routed, route_from_metadata, routing_metadata, routing_paths

__all__ = ["save", "load", "load_dense", "atomic_save", "read_safetensors", "read_metadata", "check_fits",
           "is_gateify_file", "FORMAT_VERSION", "FORMAT_KEY"]

FORMAT_VERSION = 3
#: metadata key that marks a file written by :func:`save`; its value is the format version
FORMAT_KEY = "gateify_format"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and put back at once
    os.umask(mask)
    return mask


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` to a temporary name, then an atomic rename: a kill never leaves half a file.

    The file gets the mode a new file gets under the umask (0644 under umask 022), like ``torch.save``'s:
    safetensors alone creates 0600 files that others on a shared machine cannot read.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(model: nn.Module, path: Union[str, os.PathLike], *, architecture: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``model`` (converted or plain) to ``path`` as safetensors, atomically.

    Args:
        architecture: ``{"name": ..., "kwargs": {...}}`` to rebuild the source model with
            :func:`gateify.create_model`; default: what :func:`gateify.create_model` or timm recorded. Without
            it the file still loads into a model you pass to :func:`load`.
    """
    module = unwrap(model)
    found = gates(module)
    routed = is_routed(module)
    arch = dict(architecture) if architecture is not None else architecture_of(module.network if routed else module)
    configs = {json.dumps(g.config.to_dict(), sort_keys=True) for g in found.values()}
    if len(configs) > 1:
        raise WeightsFileError("gates with different configurations cannot be described by one file header.")
    metadata = {
        FORMAT_KEY: str(FORMAT_VERSION),
        "gateify_version": __version__,
        "torch_version": torch.__version__,
        "architecture": json.dumps(arch),
        "gate_config": configs.pop() if configs else "null",
        # tau and noise are plain attributes (set_mode changes them), not buffers: kept here
        "gates": json.dumps({name: {"mode": g.mode, "tau": g.tau, "noise": g.noise} for name, g in found.items()}),
        "routing": json.dumps(routing_metadata(module) if routed else None),
    }
    state = module.state_dict()
    versions = _module_versions(state)
    if versions:
        metadata["module_versions"] = json.dumps(versions)
    # tied weights (one module held under several names, CoaT's shared position encodings; a tied head) are
    # written once, as safetensors.torch.save_model does; the other names are listed and filled in by load
    storages: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and ident in storages:
            tied[key] = storages[ident]
        else:
            storages[ident] = key
    if tied:
        metadata["tied"] = json.dumps(tied)
    atomic_save({k: v for k, v in state.items() if k not in tied}, os.fspath(path), metadata)


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def _diagnose(path: str, error: Exception) -> str:
    """Why ``path`` is not safetensors, from its first bytes: pickle/zip (torch.save), truncated, or other."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        zipped = head[:4] == b"PK\x03\x04"  # torch.save's default: a zip archive holding a pickle
        pickled = len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)  # PROTO opcode, protocol 2-5
        if zipped or pickled or path.endswith(_PICKLE_SUFFIXES):
            return (f"'{path}' is a pickle-based PyTorch file (torch.save), not safetensors; gateify never unpickles "
                    f"files. If you trust it, convert it once: safetensors.torch.save_file("
                    f"torch.load(path, weights_only=True), 'weights.safetensors'), then use that file.")
        if len(head) == 8:
            header_len = int.from_bytes(head, "little")
            if 8 + header_len <= size:
                try:
                    header = json.loads(f.read(header_len))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    end = None
                if end is not None and 8 + header_len + end > size:
                    return (f"'{path}' is truncated: its header describes {8 + header_len + end} bytes but the file "
                            f"has {size} (an interrupted copy or download?). Copy or write it again.")
            elif header_len < 100_000_000 and f.read(1) == b"{":  # a JSON header, cut short
                return (f"'{path}' is truncated inside its header ({size} bytes; the header alone is {header_len}). "
                        f"Copy or write it again.")
    return (f"'{path}' is not a readable safetensors file: it is truncated, corrupt or of another format "
            f"({type(error).__name__}: {error}).")


def read_safetensors(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; pickle files and damaged files are refused with the fix.

    Nothing is unpickled: the file is parsed by ``safetensors`` only, and a failure is diagnosed from its bytes.
    """
    path = os.fspath(path)
    metadata = read_metadata(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFileError(_diagnose(path, e)) from e
    return tensors, metadata


def read_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """The metadata of a safetensors file, from its header alone; refusals as :func:`read_safetensors`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"no file at '{path}' (working directory: '{os.getcwd()}').")
    if not os.path.isfile(path):
        raise WeightsFileError(f"'{path}' is a directory, not a safetensors file.")
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFileError(_diagnose(path, e)) from e


def is_gateify_file(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors file's metadata says :func:`save` wrote it."""
    return FORMAT_KEY in metadata


def check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str, *,
               may_lack: Collection[str] = (), hint: str = "") -> None:
    """Raise before anything is copied if keys or shapes differ (``may_lack``: model keys the file may lack)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and k not in may_lack]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k}: file {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
              for k, t in tensors.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"the file lacks {len(missing)} keys the model has (missing, e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"the file has {len(unexpected)} keys the model lacks (unexpected, e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    if problems:
        raise WeightsFileError(f"'{path}' does not fit this model: " + "; ".join(problems) + ". " + (
            hint or "Was it saved from another architecture or with other num_classes/in_chans?"))


def _json_field(path: str, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata.get(key, "null"))
    except ValueError as e:
        raise WeightsFileError(f"'{path}' has damaged gateify metadata ({key}: {e}); write it again with "
                               f"gateify.save.") from e


def _describe(arch: Optional[Mapping[str, Any]]) -> str:
    if not arch:
        return "an unrecorded architecture"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(arch.get("kwargs", {}).items()))
    return f"'{arch['name']}'" + (f" ({kwargs})" if kwargs else "")


def _parse_metadata(path: str, metadata: Mapping[str, str]) -> tuple[int, Optional[dict], Optional[dict], dict]:
    """``(format version, architecture, gate config, {gate: {"mode", ...}})`` from a file's header, checked."""
    try:
        version = int(metadata[FORMAT_KEY])
        arch = json.loads(metadata.get("architecture", "null"))
        config = json.loads(metadata.get("gate_config", "null"))
        modes = json.loads(metadata.get("gates", "{}"))
        if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get("name"), str)
                                     and isinstance(arch.get("kwargs", {}), dict)):
            raise ValueError(f"architecture {arch!r} is not {{'name': str, 'kwargs': dict}}")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"gate_config {config!r} is not a dict")
        if not (isinstance(modes, dict) and all(isinstance(m, dict) and "mode" in m for m in modes.values())):
            raise ValueError(f"gates {modes!r} is not {{block: {{'mode': ...}}}}")
    except (ValueError, TypeError) as e:
        raise WeightsFileError(f"'{path}' has damaged gateify metadata ({e}); write it again with gateify.save.") from e
    if version > FORMAT_VERSION:
        raise WeightsFileError(f"'{path}' uses gateify file format {version}, newer than this gateify "
                               f"({__version__}, format {FORMAT_VERSION}); upgrade gateify to read it.")
    return version, arch, config, modes


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None, **convert_kwargs: Any) -> nn.Module:
    """Load a file written by :func:`save`; returns the model with every tensor and gate mode restored.

    Args:
        model: ``None`` to rebuild the architecture recorded in the file (timm or torchvision name) and convert it
            with the recorded gate configuration; or your own model, plain (a converted copy is returned; the plain
            model itself is not modified) or already converted (loaded in place and returned). Either way nothing
            is modified unless the whole file fits. A routed file gives a :class:`gateify.RoutedModel` with the
            file's paths; a routed model passed as ``model`` must route the same paths (loaded in place).
        convert_kwargs: passed to :func:`gateify.convert` when the model has to be converted (``example_input``,
            ``leaf_modules``, ``autowrap_functions``), for models whose conversion needs them.

    Raises:
        WeightsFileError: missing or damaged file, a pickle file, a newer file format, a file not written by
            :func:`save` (use :func:`load_dense`), or a file that does not fit the model (keys, shapes, gates).
    """
    path = os.fspath(path)
    tensors, metadata = read_safetensors(path)
    if not is_gateify_file(metadata):
        raise WeightsFileError(f"'{path}' was not written by gateify.save (no '{FORMAT_KEY}' metadata). For dense "
                               f"weights of the source model use gateify.load_dense(model, '{path}').")
    version, arch, config, modes = _parse_metadata(path, metadata)
    routing = _json_field(path, metadata, "routing")
    tied = _json_field(path, metadata, "tied") or {}  # names written once by save
    if not isinstance(tied, dict):
        raise WeightsFileError(f"'{path}' has damaged gateify metadata (tied: {tied!r}); write it again with "
                               f"gateify.save.")
    for key, kept in tied.items():
        if kept not in tensors:
            raise WeightsFileError(f"'{path}' lists '{key}' as tied to '{kept}', which the file does not hold; the "
                                   f"file is damaged: save the model again.")
        tensors[key] = tensors[kept]
    if version == 1:
        tensors = _from_format_1(tensors, modes, config)
    if routing and version <= 2:
        tensors = _routed_from_format_2(tensors, modes, routing)
    if model is None:
        if not arch:
            raise WeightsFileError(f"'{path}' does not record its architecture; pass the model: "
                                   f"gateify.load('{path}', model=<the source model>).")
        try:
            model = create_model(arch["name"], **arch.get("kwargs", {}))
        except (GateifyError, TypeError, ValueError, RuntimeError) as e:
            raise WeightsFileError(f"'{path}' records architecture {_describe(arch)}, which this installation "
                                   f"cannot build ({type(e).__name__}: {e}); build it yourself and pass it: "
                                   f"gateify.load('{path}', model=...).") from e
    if routing:
        versions = _json_field(path, metadata, "module_versions")
        return _load_routed(path, tensors, routing, arch, config, model, convert_kwargs, versions)
    if is_routed(model):
        raise WeightsFileError(f"'{path}' holds a model that does not route, and the model passed routes; pass the "
                               f"model the file was written from (plain or converted).")
    target = model
    if config is not None and not gates(model):
        target = convert(model, GateConfig.from_dict(config), **convert_kwargs)
    if config is None and gates(model):
        raise WeightsFileError(f"'{path}' holds a plain (ungated) model but the model passed is converted; pass "
                               f"the plain source model, or load the file with gateify.load_dense.")
    theirs = architecture_of(model)
    hint = (f"The file was saved from {_describe(arch)}, the model passed is {_describe(theirs)}."
            if arch and theirs and arch != theirs else "")
    check_fits(target, tensors, path, hint=hint)
    unknown = {m["mode"] for m in modes.values()} - set(MODES)
    if unknown or set(modes) != set(gates(target)):
        raise WeightsFileError(f"'{path}' lists gates {sorted(modes)} with modes {sorted(unknown) or 'ok'}, but the "
                               f"model has gates {list(gates(target))}.")
    target.load_state_dict(_versioned(target, tensors, _json_field(path, metadata, "module_versions")), strict=True)
    for name, gate in gates(target).items():
        gate.mode = modes[name]["mode"]
        gate.tau = float(modes[name].get("tau", gate.tau))  # absent in files written before they were stored
        gate.noise = float(modes[name].get("noise", gate.noise))
    return target


def _load_routed(path: str, tensors: dict[str, torch.Tensor], routing: Mapping[str, Any], arch: Optional[dict],
                 config: Optional[dict], model: nn.Module, convert_kwargs: Mapping[str, Any],
                 versions: Optional[Mapping[str, int]]) -> RoutedModel:
    """A routed file into ``model``: rebuilt and routed with the file's paths, or checked against them if it routes."""
    removed = [sorted(p) for p in routing.get("paths", [])]
    if is_routed(model):
        theirs = [sorted(n for n, keep in p.items() if not keep) for p in routing_paths(model)]
        if theirs != removed:
            raise WeightsFileError(f"'{path}' routes among paths removing {removed}, the model passed among paths "
                                   f"removing {theirs}; load the file without model= to rebuild it as saved, or "
                                   f"route the source model with the file's paths first.")
        target = unwrap(model)
    else:
        tracer = {k: v for k, v in convert_kwargs.items() if k in ("leaf_modules", "autowrap_functions")}
        converted = model if gates(model) else convert(model, GateConfig.from_dict(config) if config else None,
                                                       **convert_kwargs)
        target = route_from_metadata(converted, routing, **tracer)
    theirs = architecture_of(target.network)
    hint = (f"The file was saved from {_describe(arch)}, the model passed is {_describe(theirs)}."
            if arch and theirs and arch != theirs else "")
    check_fits(target, tensors, path, hint=hint)
    target.load_state_dict(_versioned(target, tensors, versions), strict=True)
    return target


def _routed_from_format_2(tensors: dict[str, torch.Tensor], modes: Mapping[str, Any],
                          routing: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A format-2 routed file (a converted model whose gates held the paths) as format 3: its network's tensors
    under ``network.``, and per deeper level the threshold of the gate where that level's path departed."""
    prefixes = {}
    for name in modes:  # in execution order, as gateify.gates lists them
        prefixes[name] = next((p for p in (f"{name}.gate.", f"{name}.") if f"{p}threshold_bits" in tensors), None)
    if None in prefixes.values():
        return tensors  # not the layout format 2 wrote: check_fits will name what is missing
    removed = [set(p) for p in routing.get("paths", [])]
    thresholds = []
    for k in range(1, len(removed)):
        depart = next((n for n in modes if (n in removed[k]) != (n in removed[k - 1])), next(iter(modes)))
        thresholds.append(tensors[f"{prefixes[depart]}threshold_bits"].reshape(()))
    out = {f"network.{k}": v for k, v in tensors.items() if not any(k.startswith(p) for p in prefixes.values())}
    out["threshold_bits"] = torch.stack(thresholds) if thresholds else torch.zeros(0, dtype=torch.int32)
    return out


def _module_versions(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{module prefix: _version}`` of a state dict, as ``state_dict()`` records them in ``_metadata``."""
    meta = getattr(state, "_metadata", None) or {}
    return {prefix: m["version"] for prefix, m in meta.items() if isinstance(m, dict) and m.get("version") is not None}


def _versioned(model: nn.Module, tensors: Mapping[str, torch.Tensor],
               versions: Optional[Mapping[str, int]]) -> "OrderedDict[str, torch.Tensor]":
    """``tensors`` as a state dict with per-module versions, which safetensors does not keep: the file's own where
    :func:`save` wrote them, else the model's (a layout this library builds today). A module whose
    ``_load_from_state_dict`` reads its version (torchvision's MNASNet) refuses a state dict without."""
    out = OrderedDict(tensors)
    own = getattr(model.state_dict(), "_metadata", None)
    meta = OrderedDict((prefix, dict(m)) for prefix, m in own.items()) if own is not None else OrderedDict()
    for prefix, version in (versions or {}).items():
        meta.setdefault(prefix, {})["version"] = version
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def _gate_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the gates gateify inserted (exactly those: a model's own ``gate`` modules are not)."""
    prefixes = [path + "." for path, m in model.named_modules() if isinstance(m, ResidualGate)]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def _from_format_1(tensors: dict[str, torch.Tensor], modes: Mapping[str, Any],
                   config: Optional[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """A format-1 file's tensors under format-2 keys (see module doc); the gates are the ones its header lists."""
    out = dict(tensors)
    cir = bool(config) and config.get("gate") == "cir"
    for block in modes:
        prefix = next((p for p in (f"{block}.gate.", f"{block}.") if f"{p}threshold" in tensors), None)
        if prefix is None:
            continue  # check_fits will name what is missing
        out[f"{prefix}threshold_bits"] = out.pop(f"{prefix}threshold").to(torch.float32).view(torch.int32)
        if cir:
            for old, new in (("cir_scale", "cir.scale"), ("cir_offset", "cir.offset")):
                if f"{prefix}{old}" in out:
                    out[f"{prefix}{new}"] = out.pop(f"{prefix}{old}")
            for key in [k for k in out if k.startswith(f"{prefix}controller.")]:
                del out[key]
    return out


def load_dense(model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Load dense source weights (a timm/torchvision state dict, or a safetensors file of one) into ``model``.

    ``model`` may be the plain source model or its converted version: then the gates gateify inserted keep their
    values, and every other key (a model's own modules named ``gate`` included) must be in the weights. Keys and
    shapes are checked first; on a mismatch nothing is copied. Returns ``model``.
    """
    metadata: dict[str, str] = {}
    if isinstance(weights, Mapping):
        tensors, where = dict(weights), "the state dict"
        versions = _module_versions(weights)
    else:
        tensors, metadata = read_safetensors(weights)
        where = os.fspath(weights)
        versions = _json_field(where, metadata, "module_versions")
    inserted = _gate_keys(model)
    tensors = {k: v for k, v in tensors.items() if k not in inserted}
    hint = (f"'{where}' was written by gateify.save: load it with gateify.load('{where}') instead."
            if is_gateify_file(metadata) and not inserted else "")
    check_fits(model, tensors, where, may_lack=inserted, hint=hint)
    model.load_state_dict(_versioned(model, tensors, versions), strict=False)
    return model

"""gateify: per-sample gated residual blocks for existing ResNets, by one torch.fx pass.

    >>> import timm, gateify
    >>> model = timm.create_model("resnet20")      # registered into timm by ``import gateify``
    >>> gated = gateify.convert(model)             # every residual block now gated, per sample

Names are imported on first use (PEP 562), so ``import gateify`` (and ``gateify --help``) costs no torch or timm
import. The CIFAR ResNets are registered into timm as soon as timm is imported, before or after gateify.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    # conversion
    "convert": "conversion",
    "to_dense": "conversion",
    "to_static": "conversion",
    # gates and their modes
    "gates": "modes",
    "set_mode": "modes",
    "gate_mode": "modes",
    "evaluating": "modes",
    "keep_rates": "modes",
    "record_decisions": "modes",
    "unwrap": "modes",
    "GateConfig": "gate",
    "GateRecord": "gate",
    "ResidualGate": "gate",
    "Controller": "gate",
    "CIRScorer": "gate",
    "cosine_incompatibility": "gate",
    # compiled inference
    "compile": "compiling",
    # FLOPs
    "flops": "accounting",
    "calibrate": "accounting",
    "FlopsReport": "accounting",
    "BlockFlops": "accounting",
    "CostModel": "accounting",
    # routing among nested static paths
    "route": "routing",
    "cascade": "routing",
    "RoutedModel": "routing",
    "select_paths": "routing",
    "routing_paths": "routing",
    "is_routed": "routing",
    "level_shares": "routing",
    "RouteLoss": "routing",
    "RoutePreset": "routing",
    "ROUTE_PRESETS": "routing",
    "export_onnx_segments": "onnx_segments",
    "OnnxRoutedSession": "onnx_segments",
    # static depth pruning
    "set_static": "static",
    "select_blocks": "static",
    "static_twin": "static",
    "static_flops_fraction": "static",
    "seed_gates": "static",
    "pin_gates": "static",
    "reshaping_gates": "static",
    # training
    "GateRegularizer": "regularizer",
    "RegularizerConfig": "regularizer",
    "PRESETS": "regularizer",
    "LossTerms": "regularizer",
    "TrainConfig": "training",
    "fit": "training",
    "evaluate": "training",
    "EvalResult": "training",
    "Checkpoint": "training",
    "make_optimizer": "training",
    "distill_loss": "regularizer",
    # models and files
    "create_model": "models",
    "save": "io",
    "load": "io",
    "load_dense": "io",
    # errors
    "GateifyError": "errors",
    "GateifyWarning": "errors",
    "GateConfigError": "errors",
    "AlreadyConvertedError": "errors",
    "InputShapeError": "errors",
    "MetaDeviceError": "errors",
    "NoResidualBlocksError": "errors",
    "NotConvertedError": "errors",
    "UntraceableModelError": "errors",
    "WeightsFileError": "errors",
    "DatasetError": "errors",
    "TrainingError": "errors",
}

_SUBMODULES = ("accounting", "cifar_resnet", "cli", "compiling", "conversion", "data", "errors", "gate", "io",
               "matching", "models", "modes", "onnx_segments", "regularizer", "rewrite", "routing", "segments",
               "static", "timing", "tracing", "training")

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # the next access is a plain attribute lookup
        return value
    if name in _SUBMODULES:  # ``gateify.training`` without ``import gateify.training``, as before
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


if TYPE_CHECKING:  # what static checkers and IDEs see
    from .accounting import BlockFlops, CostModel, FlopsReport, calibrate, flops
    from .conversion import convert, to_dense, to_static
    from .errors import (AlreadyConvertedError, DatasetError, GateConfigError, GateifyError, GateifyWarning,
                         InputShapeError, MetaDeviceError, NoResidualBlocksError, NotConvertedError, TrainingError,
                         UntraceableModelError, WeightsFileError)
    from .gate import CIRScorer, Controller, GateConfig, GateRecord, ResidualGate, cosine_incompatibility
    from .io import load, load_dense, save
    from .models import create_model
    from .compiling import compile
    from .modes import evaluating, gate_mode, gates, keep_rates, record_decisions, set_mode, unwrap
    from .regularizer import PRESETS, GateRegularizer, LossTerms, RegularizerConfig, distill_loss
    from .onnx_segments import OnnxRoutedSession, export_onnx_segments
    from .routing import (ROUTE_PRESETS, RouteLoss, RoutedModel, RoutePreset, cascade, is_routed, level_shares,
                          route, routing_paths, select_paths)
    from .static import (pin_gates, reshaping_gates, seed_gates, select_blocks, set_static,
                         static_flops_fraction, static_twin)
    from .training import Checkpoint, EvalResult, TrainConfig, evaluate, fit, make_optimizer


# resnet20/32/44/56/110 go into timm's registry when timm is imported: now if it is already, else right after
# timm's own import finishes (a one-shot import hook), so ``timm.create_model("resnet20")`` works in either order.
class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; and the lookup below must not come back here
        spec = importlib.util.find_spec("timm")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            importlib.import_module(".cifar_resnet", __name__)

        loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    from . import cifar_resnet as _cifar_resnet  # noqa: F401
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())

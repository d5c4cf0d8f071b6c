"""gateify: per-sample gated residual blocks for existing ResNets, by one torch.fx pass.

    >>> import timm, gateify
    >>> model = timm.create_model("resnet20")      # registered into timm by ``import gateify``
    >>> gated = gateify.convert(model)             # every residual block now gated, per sample
"""

from . import cifar_resnet as _cifar_resnet  # noqa: F401  (registers resnet20/32/44/56/110 into timm)
from .accounting import BlockFlops, FlopsReport, calibrate, flops
from .conversion import convert, gates, set_mode, to_dense, to_static
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
from .gate import GateConfig, GateRecord, ResidualGate, cosine_incompatibility
from .io import WeightsFileError, load, load_dense, save
from .models import create_model
from .regularizer import PRESETS, GateRegularizer, LossTerms, RegularizerConfig
from .static import select_blocks, set_static, static_twin

from ._version import __version__

__all__ = [
    "convert",
    "gates",
    "set_mode",
    "to_dense",
    "to_static",
    "save",
    "load",
    "load_dense",
    "create_model",
    "set_static",
    "select_blocks",
    "static_twin",
    "GateRegularizer",
    "RegularizerConfig",
    "PRESETS",
    "LossTerms",
    "flops",
    "calibrate",
    "FlopsReport",
    "BlockFlops",
    "GateConfig",
    "GateRecord",
    "ResidualGate",
    "cosine_incompatibility",
    "GateifyError",
    "GateifyWarning",
    "AlreadyConvertedError",
    "InputShapeError",
    "MetaDeviceError",
    "NoResidualBlocksError",
    "NotConvertedError",
    "UntraceableModelError",
    "WeightsFileError",
    "__version__",
]

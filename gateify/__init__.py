"""gateify: per-sample gated residual blocks for existing ResNets, by one torch.fx pass.

    >>> import timm, gateify
    >>> model = timm.create_model("resnet20")      # registered into timm by ``import gateify``
    >>> gated = gateify.convert(model)             # every residual block now gated, per sample
"""

from . import cifar_resnet as _cifar_resnet  # noqa: F401  (registers resnet20/32/44/56/110 into timm)
from .accounting import BlockFlops, FlopsReport, calibrate, flops
from .conversion import convert, gates, set_mode
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

__version__ = "0.1.0"

__all__ = [
    "convert",
    "gates",
    "set_mode",
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
    "__version__",
]

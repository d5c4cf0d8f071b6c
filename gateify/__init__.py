"""gateify: per-sample gated residual blocks for existing ResNets, by one torch.fx pass.

    >>> import timm, gateify
    >>> model = timm.create_model("resnet20")      # registered into timm by ``import gateify``
    >>> gated = gateify.convert(model)             # every residual block now gated, per sample
"""

from . import cifar_resnet as _cifar_resnet  # noqa: F401  (registers resnet20/32/44/56/110 into timm)
from .accounting import BlockFlops, CostModel, FlopsReport, calibrate, flops
from .conversion import convert, to_dense, to_static
from .errors import (
    AlreadyConvertedError,
    DatasetError,
    GateConfigError,
    GateifyError,
    GateifyWarning,
    InputShapeError,
    MetaDeviceError,
    NoResidualBlocksError,
    NotConvertedError,
    TrainingError,
    UntraceableModelError,
    WeightsFileError,
)
from .gate import CIRScorer, Controller, GateConfig, GateRecord, ResidualGate, cosine_incompatibility
from .io import load, load_dense, save
from .models import create_model
from .modes import evaluating, gate_mode, gates, keep_rates, set_mode, unwrap
from .regularizer import PRESETS, GateRegularizer, LossTerms, RegularizerConfig
from .static import seed_gates, select_blocks, set_static, static_flops_fraction, static_twin
from .training import Checkpoint, EvalResult, TrainConfig, distill_loss, evaluate, fit, make_optimizer

from ._version import __version__

__all__ = [
    # conversion
    "convert",
    "to_dense",
    "to_static",
    # gates and their modes
    "gates",
    "set_mode",
    "gate_mode",
    "evaluating",
    "keep_rates",
    "unwrap",
    "GateConfig",
    "GateRecord",
    "ResidualGate",
    "Controller",
    "CIRScorer",
    "cosine_incompatibility",
    # FLOPs
    "flops",
    "calibrate",
    "FlopsReport",
    "BlockFlops",
    "CostModel",
    # static depth pruning
    "set_static",
    "select_blocks",
    "static_twin",
    "static_flops_fraction",
    "seed_gates",
    # training
    "GateRegularizer",
    "RegularizerConfig",
    "PRESETS",
    "LossTerms",
    "TrainConfig",
    "fit",
    "evaluate",
    "EvalResult",
    "Checkpoint",
    "make_optimizer",
    "distill_loss",
    # models and files
    "create_model",
    "save",
    "load",
    "load_dense",
    # errors
    "GateifyError",
    "GateifyWarning",
    "GateConfigError",
    "AlreadyConvertedError",
    "InputShapeError",
    "MetaDeviceError",
    "NoResidualBlocksError",
    "NotConvertedError",
    "UntraceableModelError",
    "WeightsFileError",
    "DatasetError",
    "TrainingError",
    "__version__",
]

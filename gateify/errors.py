"""Every refusal gateify makes is a :class:`GateifyError`; each message says what was found and what to do."""

__all__ = [
    "GateifyError",
    "GateConfigError",
    "NoResidualBlocksError",
    "UntraceableModelError",
    "AlreadyConvertedError",
    "NotConvertedError",
    "MetaDeviceError",
    "InputShapeError",
    "WeightsFileError",
    "DatasetError",
    "TrainingError",
    "GateifyWarning",
]


class GateifyError(Exception):
    """Base class of every error gateify raises on purpose."""


class GateConfigError(GateifyError, ValueError):
    """A gate, mode or regulariser setting is out of range or unknown."""


class NoResidualBlocksError(GateifyError):
    """The model has no residual addition ``x + F(x)`` that gateify can gate."""


class UntraceableModelError(GateifyError):
    """``torch.fx`` could not trace a module; the message names it and the leaf-module remedy."""


class AlreadyConvertedError(GateifyError):
    """The model already contains gates."""


class NotConvertedError(GateifyError):
    """A gate operation was asked of a model that has no gates."""


class MetaDeviceError(GateifyError):
    """The model's weights live on the ``meta`` device, so nothing can be run or traced with values."""


class InputShapeError(GateifyError):
    """An input tensor does not have the shape the model or a gate expects."""


class WeightsFileError(GateifyError):
    """A weights file is missing, not safetensors, damaged, from a newer gateify, or does not fit the model."""


class DatasetError(GateifyError):
    """A dataset is missing, incomplete or not in the expected layout; the message says how to get it right."""


class TrainingError(GateifyError):
    """Training cannot go on (e.g. the loss became NaN); the message says what is kept and what to try."""


class GateifyWarning(UserWarning):
    """Something was done with a caveat the user should know about (a module not traced through, a target missed)."""

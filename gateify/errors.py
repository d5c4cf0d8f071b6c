"""Every refusal gateify makes is a :class:`GateifyError`; each message says what was found and what to do."""

__all__ = [
    "GateifyError",
    "NoResidualBlocksError",
    "UntraceableModelError",
    "AlreadyConvertedError",
    "NotConvertedError",
    "MetaDeviceError",
    "InputShapeError",
    "GateifyWarning",
]


class GateifyError(Exception):
    """Base class of every error gateify raises on purpose."""


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


class GateifyWarning(UserWarning):
    """Something was converted with a caveat the user should know about (e.g. a module not traced through)."""

"""Create a timm or torchvision ResNet by name, and remember how, so saved gated models can be rebuilt.

``create_model("resnet20")`` and ``create_model("resnet50", num_classes=10, in_chans=1)`` go to timm (where
``import gateify`` registered the CIFAR ResNets); ``create_model("torchvision:resnet50")`` goes to torchvision.
No weights are ever downloaded: gateify builds architectures; weights come from your files.
"""

from __future__ import annotations

from typing import Any

import timm
import torchvision
from torch import nn

from .errors import GateifyError

__all__ = ["create_model", "architecture_of", "input_shape"]

TORCHVISION_PREFIX = "torchvision:"
_ARCH_ATTR = "gateify_architecture"


def _torchvision(name: str, num_classes: int | None, in_chans: int | None, **kwargs: Any) -> nn.Module:
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder):
        raise GateifyError(f"torchvision has no model '{name}'; see torchvision.models.list_models().")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = builder(weights=None, **kwargs)
    if in_chans is not None and in_chans != 3:  # torchvision ResNets take no in_chans: rebuild the stem conv
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                bias=old.bias is not None)
    return model


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised ResNet: a timm name (``resnet50``, ``resnet20``) or ``torchvision:<name>``.

    ``num_classes`` and ``in_chans`` work for both libraries; other keywords go to the library's builder. The
    returned model records ``{"name", "kwargs"}`` so that :func:`gateify.save` can store how to rebuild it.
    """
    if kwargs.pop("pretrained", False):
        raise GateifyError("gateify never downloads weights: create the model, then load your own "
                           "(gateify.load_dense(model, 'weights.safetensors')).")
    requested = dict(kwargs)
    if name.startswith(TORCHVISION_PREFIX):
        model = _torchvision(name[len(TORCHVISION_PREFIX):], kwargs.pop("num_classes", None),
                             kwargs.pop("in_chans", None), **kwargs)
    else:
        if not timm.is_model(name):
            raise GateifyError(f"unknown model '{name}': not in timm's registry (timm.list_models('resnet*')); "
                               f"use 'torchvision:<name>' for torchvision models.")
        model = timm.create_model(name, pretrained=False, **kwargs)
    setattr(model, _ARCH_ATTR, {"name": name, "kwargs": dict(requested, **_io_kwargs(model))})
    return model


_SIZE_KEYWORDS = ("img_size", "image_size", "input_size")


def _as_hw(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def _own_image_size(model: nn.Module) -> tuple[int, int] | None:
    """``(H, W)`` the model was built for, where it records one: the size keyword it was built with by
    :func:`create_model` (and so by :func:`gateify.load`), timm's ``img_size`` (MaxViT, CrossViT, ...) or its patch
    embedding's (ViT, DeiT, BEiT, Swin: ``patch_embed``; MLP-Mixer: ``stem``), torchvision's ``image_size`` (ViT)."""
    kwargs = (getattr(model, _ARCH_ATTR, None) or {}).get("kwargs", {})
    for keyword in _SIZE_KEYWORDS:
        size = _as_hw(kwargs.get(keyword))
        if size is not None:
            return size
    for attr in ("img_size", "image_size"):
        size = _as_hw(getattr(model, attr, None))
        if size is not None:
            return size
    for module in model.modules():  # timm's PatchEmbed, wherever the model keeps it
        if hasattr(module, "patch_size") and getattr(module, "strict_img_size", True):
            size = _as_hw(getattr(module, "img_size", None))
            if size is not None:
                return size
    return None


def input_shape(model: nn.Module, size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` the model takes: the first convolution's input channels, and ``size``, or else the size the
    model was built for (``timm.create_model("vit_tiny_patch16_224", img_size=64)`` takes 64x64, whatever its
    registry default; see :func:`_own_image_size`), or else the ``pretrained_cfg`` input size timm records (224 for
    models without one)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    if size is not None:
        return channels, size, size
    own = _own_image_size(model)
    if own is not None:
        return (channels, *own)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return (channels, *tuple(int(s) for s in cfg.get("input_size", (3, 224, 224))[-2:]))


def _io_kwargs(model: nn.Module) -> dict[str, int]:
    """num_classes and in_chans as built, so a rebuilt model has the same shapes."""
    out: dict[str, int] = {"in_chans": input_shape(model)[0]}
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
    else:  # torchvision: fc (ResNet), classifier (MobileNet, EfficientNet, MNASNet, ConvNeXt), heads (ViT)
        classifier = next((getattr(model, a) for a in ("fc", "classifier", "heads", "head") if hasattr(model, a)), None)
    if isinstance(classifier, nn.Sequential):
        classifier = next((m for m in reversed(classifier) if isinstance(m, nn.Linear)), None)
    if isinstance(classifier, nn.Linear):
        out["num_classes"] = classifier.out_features
    return out


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """How ``model`` was built (``{"name", "kwargs"}``), if gateify or timm knows it; else ``None``."""
    arch = getattr(model, _ARCH_ATTR, None)
    if arch is not None:
        return arch
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if name and timm.is_model(name):
        return {"name": name, "kwargs": _io_kwargs(model)}
    return None


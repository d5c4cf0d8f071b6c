"""CIFAR ResNets (He et al. 2016, section 4.2), registered into timm's model registry on ``import gateify``.

Depth 6n+2: a 3x3 stem with 16 channels, three stages of n basic blocks with 16/32/64 channels (stride 2 at the
start of stages 2 and 3), option-A shortcuts (parameter-free: subsample and zero-pad channels), global average
pool and a linear classifier. ResNet-20 has 0.27M parameters and 40.6M multiply-accumulates (MACs) at 32x32.

    >>> import timm, gateify
    >>> model = timm.create_model("resnet20", num_classes=10)

The model keeps the interface of timm's own ``ResNet`` (``timm/models/resnet.py``), which timm's model tests check:
``reset_classifier``, ``forward_features``/``forward_head``, ``forward_intermediates`` and
``prune_intermediate_layers`` (so every ``features_only`` ``feature_cls`` works), ``set_grad_checkpointing``,
``group_matcher``, ``device``/``dtype`` factory arguments, TorchScript and FX + TorchScript.
"""

# No ``from __future__ import annotations`` here: torch.fx copies a forward's annotations into the code it generates,
# and PEP 563 strings become undefined names there (TorchScript: "Unknown type name '_torch_Tensor_'").
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs, is_model, is_model_in_modules,
                         register_model)
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "PadShortcut", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)`` by striding and zero-padding channels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers on the branch, ``act(F(x) + S(x))``: ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        drop_path: float = 0.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = PadShortcut(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.act2 = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.drop_path(self.bn2(self.conv2(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


def _create_head(
    num_features: int,
    num_classes: int,
    pool_type: str,
    device: Optional[torch.device],
    dtype: Optional[torch.dtype],
) -> Tuple[nn.Module, nn.Module]:
    """timm's global pool and classifier, built on ``device``/``dtype`` (timm's own ``create_classifier`` takes them
    only from timm 1.0.20 on; gateify supports 1.0.9)."""
    global_pool, fc = create_classifier(num_features, num_classes, pool_type=pool_type)
    return global_pool, fc.to(device=device, dtype=dtype)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: ``(B, in_chans, H, W) -> (B, num_classes)``, with the interface of timm's ``ResNet``.

    Args:
        layers: blocks per stage (n, n, n) for depth 6n+2.
        num_classes: classifier outputs (0 for features only).
        in_chans: input channels.
        widths: channels of the three stages.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        global_pool: timm pool type ('avg', 'max', 'avgmax', 'catavgmax', ...; '' for none).
        zero_init_last: start each block's last BatchNorm at zero weight, so F(x)=0 at init. Off by default, as in
            He et al.: timm's ImageNet ResNets default to on, but on small data it stalls the first epochs.
        device, dtype: where and in which dtype to create parameters and buffers (timm's factory arguments).
    """

    def __init__(
        self,
        layers: Tuple[int, int, int] = (3, 3, 3),
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Tuple[int, int, int] = (16, 32, 64),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_last: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        total, done = sum(layers), 0
        in_chs = widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        for stage, (depth, width) in enumerate(zip(layers, widths)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_chs, width, stride, drop_path_rate * done / max(total - 1, 1), **dd))
                in_chs, done = width, done + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=2**stage, module=f"layer{stage + 1}"))
        self.num_features = in_chs
        self.global_pool, self.fc = _create_head(self.num_features, num_classes, global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Parameter groups for layer-wise learning-rate decay: the stem, then one group per stage or block."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (timm's ``checkpoint_seq``)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none, ``forward`` returns pooled features) on the model's device
        and dtype. ``global_pool``: a timm pool type, ``''`` for none (``forward`` then returns ``(B, C, H, W)``);
        ``None`` keeps the current one."""
        param = next(self.parameters(), None)
        dd = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = _create_head(self.num_features, num_classes, global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features and the intermediates at ``indices`` of ``feature_info`` (0: stem, 1-3: stages), as timm's.

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: the last n intermediates if an int, all if None, else these indices (negative from the end).
            norm: unused (no final norm), accepted for timm's interface.
            stop_early: stop after the last stage whose output is taken.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return the intermediates only.

        Returns:
            ``(features, [intermediates])``, or ``[intermediates]``: ``(B, C_i, H / r_i, W / r_i)`` each.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: CifarResNet only gives 'NCHW' intermediates.")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        layer_names = ("layer1", "layer2", "layer3")
        if stop_early:
            layer_names = layer_names[:max_index]
        for feat_idx, name in enumerate(layer_names, start=1):
            layer = getattr(self, name)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(layer, x)  # per block, as forward_features
            else:
                x = layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the classifier, unless ``prune_head=False`` and nothing
        was dropped); returns the absolute indices to take, as ``forward_intermediates`` expects them."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in ("layer1", "layer2", "layer3")[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity, so checkpoint_seq can iterate it
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:  # features now end at the last kept tap; the head, sized for the final features, goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, 64, H/4, W/4)``."""
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_classes)``, or ``(B, head_hidden_size)`` with ``pre_logits``."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # no url / hub id: gateify ships no weights and never downloads any
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
default_cfgs = generate_default_cfgs({name: _cfg() for name in _DEPTHS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """timm's ``build_model_with_cfg``; ``features_only`` takes all four ``feature_info`` levels by default, and a
    ``feature_cfg`` the caller passes (``dict(feature_cls="fx")``) is merged over that default."""
    n = _DEPTHS[variant]
    feature_cfg = {"out_indices": (0, 1, 2, 3), **(kwargs.pop("feature_cfg", None) or {})}
    return build_model_with_cfg(CifarResNet, variant, pretrained, layers=(n, n, n), feature_cfg=feature_cfg,
                                **kwargs)


def _register(fn: Callable[..., CifarResNet]) -> Callable[..., CifarResNet]:
    """timm's ``register_model``, unless timm itself already defines the name (never shadow timm's models)."""
    if is_model(fn.__name__) and not is_model_in_modules(fn.__name__, [__name__.rpartition(".")[2]]):
        warnings.warn(f"timm already defines '{fn.__name__}'; gateify's CIFAR variant is not registered.")
        return fn
    return register_model(fn)


@_register
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 blocks per stage, 0.27M parameters, 40.6M MACs at 32x32."""
    return _create("resnet20", pretrained, **kwargs)


@_register
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR: 5 blocks per stage."""
    return _create("resnet32", pretrained, **kwargs)


@_register
def resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR: 7 blocks per stage."""
    return _create("resnet44", pretrained, **kwargs)


@_register
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR: 9 blocks per stage."""
    return _create("resnet56", pretrained, **kwargs)


@_register
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR: 18 blocks per stage."""
    return _create("resnet110", pretrained, **kwargs)

"""The CIFAR ResNet zoo is registered into timm and matches He et al. (2016)."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import gateify  # noqa: F401  (registers the zoo)
from gateify.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


def test_registered_in_timm():
    assert set(DEPTHS) <= set(timm.list_models("resnet*"))
    assert timm.list_models(module="cifar_resnet") == sorted(DEPTHS, key=lambda n: timm.list_models().index(n))


@pytest.mark.parametrize("name,n", DEPTHS.items())
def test_depth_and_output(name, n):
    model = timm.create_model(name).eval()
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * n
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 6 * n + 2  # depth counts the convs and the classifier; option A adds no conv
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_size_and_macs():
    model = timm.create_model("resnet20").eval()
    params = sum(p.numel() for p in model.parameters())
    assert params == 269_722  # 0.27M, as in He et al. (2016)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    flops = counter.get_total_flops()
    assert round(flops / 2 / 1e6, 1) == 40.6  # multiply-accumulates
    assert round(flops / 1e6, 1) == 81.1  # FLOPs = 2 x MACs


def test_timm_kwargs_and_cfg():
    model = timm.create_model("resnet32", num_classes=100, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    assert model.fc.out_features == 100 and model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == CIFAR10_MEAN and tuple(cfg["std"]) == CIFAR10_STD
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # nothing to download
    model.reset_classifier(5)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert model.forward_features(torch.randn(2, 1, 32, 32)).shape == (2, 64, 8, 8)


def test_features_only():
    model = timm.create_model("resnet20", features_only=True)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_pretrained_true_downloads_nothing():
    # gateify ships no weights: timm refuses clearly instead of reaching for the network
    with pytest.raises(RuntimeError, match="No pretrained weights exist for resnet20"):
        timm.create_model("resnet20", pretrained=True)

"""Shared fixtures: small real models with non-trivial weights, and gates forced into mixed decisions."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import gateify

# The tests use small batches, which gain little from threads; on a busy 2-core machine OpenMP spin-waiting
# with 2 threads made them up to 50x slower. One thread keeps the suite's time predictable.
torch.set_num_threads(1)


def perturb_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine/statistics so outputs depend on every block (timm's zero_init_last zeroes branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def randomise_controllers(model: nn.Module, g: torch.Generator) -> None:
    """Random controller weights (keep logits spread differently per block); the output bias is zeroed."""
    with torch.no_grad():
        for gate in gateify.gates(model).values():
            fc1, fc2 = gate.controller.fc1, gate.controller.fc2
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=g) * 3.0)
            fc1.bias.copy_(torch.randn(fc1.bias.shape, generator=g))
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g))
            fc2.bias.zero_()


def mix_decisions(model: nn.Module, batch: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random controllers, each centred on ``batch`` so that about half of the samples skip each block."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    randomise_controllers(model, g)
    with torch.no_grad():
        for gate in gateify.gates(model).values():  # in execution order: earlier decisions shape later inputs
            logits = []
            handle = gate.controller.register_forward_hook(lambda m, i, o: logits.append(o))
            model(batch)
            handle.remove()
            gate.controller.fc2.bias.sub_(logits[0].median() + 1e-3)
    model.train(was_training)
    return model


class Wrapped(nn.Module):
    """A backbone in an attribute called ``module`` (as wrappers often name it) with a head of its own: not a DDP
    wrapper, so unwrapping it would lose the head."""

    def __init__(self):
        super().__init__()
        self.module = gateify.create_model("resnet20", num_classes=16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.module(x))


@pytest.fixture
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return perturb_batchnorm(timm.create_model("resnet20")).eval()


@pytest.fixture
def cifar_batch() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def split_decisions(model: nn.Module, batch: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random controllers, each gate's decision boundary (keep probability 0.5 = the hard threshold) placed in the
    middle of the widest gap between ``batch``'s keep logits that leaves a sample on either side: every block keeps
    some samples and skips the others, with a margin that float noise (a sample run alone) cannot cross. One
    forward pass places every boundary, in execution order, because earlier decisions shape later gates' inputs."""
    g = torch.Generator().manual_seed(seed)
    handles = []

    def place_boundary(gate, args):
        _, inputs, _ = args
        logits = gate.controller(inputs[gate.ctrl_index]).double().sort().values
        i = int((logits[1:] - logits[:-1]).argmax())
        gate.controller.fc2.bias.sub_(float((logits[i] + logits[i + 1]) / 2))

    randomise_controllers(model, g)
    with torch.no_grad():
        for gate in gateify.gates(model).values():
            handles.append(gate.register_forward_pre_hook(place_boundary))
        gateify.set_mode(model, "hard", threshold=0.5)
        try:
            model(batch)
        finally:
            for h in handles:
                h.remove()
    return model

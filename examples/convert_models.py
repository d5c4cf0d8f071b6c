"""Convert ResNets with gateify and print their gated blocks.

    python examples/convert_models.py                      # resnet20 (CIFAR) and resnet50 (timm, ImageNet)
    python examples/convert_models.py --models resnet18 torchvision:resnet34
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torchvision

import gateify


def create(name: str) -> torch.nn.Module:
    if name.startswith("torchvision:"):
        return getattr(torchvision.models, name.split(":", 1)[1])()
    return timm.create_model(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"],
                        help="timm names, or torchvision:NAME")
    args = parser.parse_args()
    for name in args.models:
        model = create(name).eval()
        start = time.perf_counter()
        gated = gateify.convert(model)
        seconds = time.perf_counter() - start
        gates = gateify.gates(gated)
        print(f"\n{name}: {len(gates)} gated residual blocks (converted in {seconds:.2f} s)")
        print(f"{'block':<28} {'block class':<22} {'controller in':>13} {'block params':>14}")
        for block_name, gate in gates.items():
            block = gated.get_submodule(block_name)
            block_params = sum(p.numel() for n, p in block.named_parameters() if not n.startswith("gate"))
            print(f"{block_name:<28} {type(block).__name__:<22} {gate.controller.fc1.in_features:>13} "
                  f"{block_params:>14,}")


if __name__ == "__main__":
    main()

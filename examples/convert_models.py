"""Convert ResNets with gateify and print their gated blocks with each branch's cost.

    python examples/convert_models.py                      # resnet20 (CIFAR) and resnet50 (timm, ImageNet)
    python examples/convert_models.py --models resnet18 torchvision:resnet34
"""

from __future__ import annotations

import argparse
import time

import torch

import gateify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"],
                        help="timm names, or torchvision:NAME")
    args = parser.parse_args()
    for name in args.models:
        model = gateify.create_model(name).eval()
        start = time.perf_counter()
        gated = gateify.convert(model).eval()
        seconds = time.perf_counter() - start
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        report = gateify.flops(gated, torch.randn(1, *size))
        print(f"\n{name}: {len(report.blocks)} gated residual blocks, converted in {seconds:.2f} s; "
              f"dense {report.dense_macs / 1e6:.1f}M MACs per {'x'.join(map(str, size))} image")
        print(f"{'block':<24}{'block class':<22}{'controller in':>14}{'branch MMACs':>14}{'share':>8}")
        for block in report.blocks:
            gate = gateify.gates(gated)[block.name]
            cls = gated.get_submodule(block.name).meta.get("gateify_block_class", "?")
            print(f"{block.name:<24}{cls:<22}{gate.controller.fc1.in_features:>14}"
                  f"{block.branch_flops / 2 / 1e6:>14.2f}{100 * block.branch_flops / report.dense_flops:>7.1f}%")


if __name__ == "__main__":
    main()

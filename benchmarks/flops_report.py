"""FLOPs reports at a calibrated operating point: ResNet-20 (a trained gated file, or random controllers) and
ResNet-50 (random controllers), each calibrated with gateify.calibrate to --target, then counted by gateify.flops.

    python benchmarks/flops_report.py                                        # random controllers, random images
    python benchmarks/flops_report.py --gated runs/demo/gated.safetensors    # the main job's model, digits data

Random controllers stand in for trained ones (their decisions depend on the input, which is all that calibration
and counting need); accuracy is not the point here, the accounting is.
"""

from __future__ import annotations

import argparse

import torch

import gateify
from gateify.data import load_dataset


def random_controllers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gateify.gates(model).values():
            gate.controller.fc2.weight.copy_(torch.randn(gate.controller.fc2.weight.shape, generator=g))
    return model


def report(name: str, model: torch.nn.Module, calib: torch.Tensor, test: torch.Tensor, target: float) -> None:
    threshold = gateify.calibrate(model, calib, target=target)
    result = gateify.flops(model.eval(), test)
    print(f"\n{name}: threshold {threshold:.4g} calibrated to {target:.2f} of dense on {len(calib)} calibration "
          f"images; counted on {len(test)} other images")
    print(result.table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--gated", default=None, help="a gated ResNet-20 file trained on digits (make run writes one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gated:
        model = gateify.load(args.gated)
        digits = load_dataset("digits")
        calib = torch.stack([digits.calibration[i][0] for i in range(512)])
        test = torch.stack([digits.test[i][0] for i in range(len(digits.test))])
        report(f"resnet20 from {args.gated}, digits", model, calib, test, args.target)
    else:
        model = random_controllers(gateify.convert(gateify.create_model("resnet20")))
        report("resnet20, random controllers, random images", model, torch.randn(256, 3, 32, 32),
               torch.randn(256, 3, 32, 32), args.target)
    model = random_controllers(gateify.convert(gateify.create_model("resnet50")))
    report("resnet50, random controllers, random images", model, torch.randn(16, 3, 224, 224),
           torch.randn(16, 3, 224, 224), args.target)


if __name__ == "__main__":
    main()

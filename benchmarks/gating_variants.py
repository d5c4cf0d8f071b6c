"""Every per-block gating variant tried (controller gates, the CosineGate family), from one dense model, with the same
fine-tuning budget; a markdown table out.

Each row is one run of examples/finetune_cifar.py (its exact command is in the table) starting from the same
dense weights, for the same epochs, optimiser, distillation and data. The static-pruning and dense-continued
baselines are rows too. docs/results.md reproduces the table this writes.

    python benchmarks/gating_variants.py --out runs/variants          # offline default (~25 min on 2 CPU cores)
    python benchmarks/gating_variants.py --dataset cifar10 --data-dir data --dense-epochs 160 --epochs 60 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import finetune_cifar  # noqa: E402

# (name, what it tests, extra flags)
VARIANTS = [
    ("balanced", "the shipped preset: model-level FLOPs term, keep floor 0.25, CIR consistency 0.1", []),
    ("no-floor", "model-level FLOPs term only (min_keep 0)", ["--reg", "min_keep=0"]),
    ("block-target", "per-block keep-rate target (ConvNet-AIG style), no floor",
     ["--reg", "granularity=block", "--reg", "min_keep=0"]),
    ("block-target-w100", "per-block target, FLOPs weight 100",
     ["--reg", "granularity=block", "--reg", "min_keep=0", "--reg", "flops_weight=100"]),
    ("floor-0.5", "keep floor 0.5", ["--reg", "min_keep=0.5"]),
    ("no-consistency", "CIR consistency off", ["--reg", "consistency_weight=0"]),
    ("consistency-1", "CIR consistency weight 1.0", ["--reg", "consistency_weight=1.0"]),
    ("noise-kept", "Gumbel noise never annealed below 0.3, temperature 1",
     ["--reg", "noise_end=0.3", "--reg", "tau_end=1.0", "--reg", "anneal=1.0"]),
    ("static-init", "gates start at the static selection for the target", ["--gate-init", "static"]),
    ("hidden-8", "controller width 8", ["--gate-hidden", "8"]),
    ("hidden-128", "controller width 128", ["--gate-hidden", "128"]),
    ("no-distill", "no distillation from the dense model", ["--distill", "0"]),
    ("calibrated", "threshold calibrated to the target on training images after fine-tuning", ["--calibrate"]),
    ("cir-gate", "paper-faithful CIR gate (decides from F(x): saves no compute)", ["--gate", "cir"]),
    ("static", "BASELINE static depth pruning at the preset's target", ["--baseline", "static"]),
    ("dense-continued", "BASELINE dense model trained as long", ["--baseline", "dense"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--init", default=None, help="dense weights to start every variant from")
    parser.add_argument("--out", default="runs/variants")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model, "--dense-epochs",
              str(args.dense_epochs), "--epochs", str(args.epochs), "--seed", str(args.seed), "--workers",
              str(args.workers), "--no-plots", "--method", "gated"] + (["--device", args.device] if args.device else [])
    finetune = finetune_cifar.build_parser()
    os.makedirs(args.out, exist_ok=True)
    init = args.init
    if init is None:  # the shared dense model, trained once
        dense_dir = os.path.join(args.out, "dense")
        finetune_cifar.run(finetune.parse_args(common + ["--out", dense_dir, "--baseline", "dense"]))
        init = os.path.join(dense_dir, "dense.safetensors")
    rows = []
    for name, what, flags in VARIANTS:
        if args.only and name not in args.only:
            continue
        argv = common + ["--init", init, "--out", os.path.join(args.out, name)] + flags
        metrics = finetune_cifar.run(finetune.parse_args(argv))
        rows.append({"name": name, "what": what, "metrics": metrics,
                     "command": "python examples/finetune_cifar.py " + shlex.join(argv)})
        with open(os.path.join(args.out, "variants.json"), "w") as f:
            json.dump(rows, f, indent=2)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| variant | what | test acc | FLOPs saved (realised) | routing blocks | static twin | command |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        m = r["metrics"]
        routing = sum(v >= 0.05 for v in m.get("minority_share_per_block", {}).values())
        twin = (f"{100 * m['static_twin_acc']:.2f}% @ {100 * m['static_twin_flops_saved']:.1f}%"
                if "static_twin_acc" in m else "-")
        lines.append(f"| {r['name']} | {r['what']} | {100 * m['test_acc']:.2f}% | {100 * m['flops_saved']:.1f}% | "
                     f"{routing} | {twin} | `{r['command']}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

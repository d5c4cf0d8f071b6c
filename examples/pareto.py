"""Accuracy vs realised FLOPs saved: gated presets against static depth pruning and the dense model, same budget.

One dense model (trained once, or --init), then from that same start and for the same fine-tuning epochs,
optimiser, teacher and data:

* ``dense_continued``: the dense model trained --epochs more (the ceiling that extra training alone reaches),
* ``gated``: one run per preset (--presets),
* ``static``: static depth pruning fine-tuned as long, at the realised FLOPs of each gated run (so every gated
  point has a static point at equal FLOPs, within one block's cost) plus --static-budgets.

Writes pareto.json (a list of points: kind, label, test_acc, flops_saved, epochs, ...), pareto.png and one folder
per run (metrics.json, log.csv, weights). Takes every flag of finetune_cifar.py; on the offline default:

    python examples/pareto.py --dataset digits --dense-epochs 15 --epochs 15 --out runs/pareto
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_cifar  # noqa: E402  (the example this sweep repeats with different flags)

_logger = logging.getLogger("pareto")
MATCH = 0.03  # "equal FLOPs": realised savings within 3 points


def build_parser() -> argparse.ArgumentParser:
    parser = finetune_cifar.build_parser()
    parser.description = __doc__
    parser.set_defaults(out="runs/pareto")
    parser.add_argument("--presets", nargs="+", default=["aggressive", "balanced", "conservative"])
    parser.add_argument("--static-budgets", nargs="*", type=float, default=[],
                        help="extra static targets (executed FLOPs fractions) beside those matched to the presets")
    return parser


def point(metrics: dict[str, Any], kind: str, label: str, run_dir: str) -> dict[str, Any]:
    return {"kind": kind, "label": label, "test_acc": metrics["test_acc"], "flops_saved": metrics["flops_saved"],
            "epochs": metrics["epochs"], "executed_macs": metrics["executed_macs"],
            "dense_macs": metrics["dense_macs"], "minority_share_mean": _mean(metrics.get("minority_share_per_block")),
            "static_twin_acc": metrics.get("static_twin_acc"),
            "static_twin_flops_saved": metrics.get("static_twin_flops_saved"), "run": run_dir}


def _mean(values: Optional[dict[str, float]]) -> Optional[float]:
    return sum(values.values()) / len(values) if values else None


def run_one(args: argparse.Namespace, name: str, **changes: Any) -> tuple[dict[str, Any], str]:
    sub = copy.copy(args)
    sub.reg = list(args.reg)
    for key, value in changes.items():
        setattr(sub, key, value)
    sub.out = os.path.join(args.out, name)
    _logger.info("=== %s", name)
    return finetune_cifar.run(sub), sub.out


def margins(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each gated point, the static point of closest realised FLOPs, if within MATCH: accuracy margin."""
    statics = [p for p in points if p["kind"] == "static"]
    out = []
    for g in (p for p in points if p["kind"] == "gated"):
        best = min(statics, key=lambda s: abs(s["flops_saved"] - g["flops_saved"]), default=None)
        if best is not None and abs(best["flops_saved"] - g["flops_saved"]) <= MATCH:
            out.append({"gated": g["label"], "static": best["label"], "gated_acc": g["test_acc"],
                        "static_acc": best["test_acc"], "gated_saved": g["flops_saved"],
                        "static_saved": best["flops_saved"], "margin": g["test_acc"] - best["test_acc"]})
    return out


def plot(points: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "*"), "dense_continued": ("grey", "P"), "gated": ("tab:blue", "o"),
             "static": ("tab:orange", "s")}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, (color, marker) in style.items():
        pts = [p for p in points if p["kind"] == kind]
        if pts:
            ax.scatter([100 * p["flops_saved"] for p in pts], [100 * p["test_acc"] for p in pts], c=color,
                       marker=marker, s=70, label=kind)
            for p in pts:
                ax.annotate(p["label"], (100 * p["flops_saved"], 100 * p["test_acc"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("realised FLOPs saved (%, test set, gate overhead included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    args.no_plots = True
    os.makedirs(args.out, exist_ok=True)
    try:
        dense_metrics, dense_dir = run_one(args, "dense_continued", baseline="dense")
        init = args.init or os.path.join(dense_dir, "dense.safetensors")
        points = [
            {"kind": "dense", "label": "dense", "test_acc": dense_metrics["source_test_acc"], "flops_saved": 0.0,
             "epochs": 0, "executed_macs": dense_metrics["dense_macs"], "dense_macs": dense_metrics["dense_macs"],
             "run": dense_dir},
            point(dense_metrics, "dense_continued", "dense +ft", dense_dir),
        ]
        targets = list(args.static_budgets)
        for preset in args.presets:
            metrics, run_dir = run_one(args, f"gated_{preset}", baseline="none", preset=preset, init=init)
            points.append(point(metrics, "gated", preset, run_dir))
            targets.append(1 - metrics["flops_saved"])  # static at the FLOPs this gated run realised
        for target in sorted(set(round(t, 4) for t in targets), reverse=True):
            metrics, run_dir = run_one(args, f"static_{target:.3f}", baseline="static", target=target, init=init)
            points.append(point(metrics, "static", f"static@{target:.2f}", run_dir))
    except finetune_cifar.gateify.GateifyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {"points": points, "margins": margins(points), "command": " ".join(sys.argv),
              "model": args.model, "dataset": args.dataset, "epochs": args.epochs, "dense_epochs": args.dense_epochs}
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(points, os.path.join(args.out, "pareto.png"),
         f"{args.model} on {args.dataset}: {args.epochs} fine-tuning epochs from one dense model")
    print(f"\n{'kind':<16}{'label':<16}{'test acc':>9}{'FLOPs saved':>13}{'epochs':>8}")
    for p in points:
        print(f"{p['kind']:<16}{p['label']:<16}{100 * p['test_acc']:>8.2f}%{100 * p['flops_saved']:>12.1f}%"
              f"{p['epochs']:>8}")
    for m in result["margins"]:
        print(f"gated {m['gated']} vs {m['static']}: {100 * m['margin']:+.2f} points at "
              f"{100 * m['gated_saved']:.1f}% vs {100 * m['static_saved']:.1f}% saved")
    print(f"written: {os.path.join(args.out, 'pareto.json')}, pareto.png")


if __name__ == "__main__":
    main()

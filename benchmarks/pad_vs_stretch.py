"""Issue 24's A/B: 28x28 images padded into the 32x32 input (a 2-pixel zero border) or stretched to it (bilinear),
the same recipe otherwise; a JSON file and a markdown table out.

Each run is examples/finetune_cifar.py's dense phase alone (``--baseline dense --epochs 0``: ResNet-20, its default
optimiser and augmentation), with ``--fit pad`` or ``--fit stretch`` and nothing else changed, for every dataset
and seed. Reported per dataset: test accuracy per seed and arm, mean ± sample std per arm, and the paired
difference pad - stretch per seed (same seed: same initialisation and data order). docs/results.md holds the table.

    python benchmarks/pad_vs_stretch.py --out runs/pad_vs_stretch            # animals-c and digits-c, 3 seeds
    python benchmarks/pad_vs_stretch.py --datasets digits-c --out runs/pvs   # one dataset (runs can be split up)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import finetune_cifar  # noqa: E402

ARMS = ("pad", "stretch")


def run_args(dataset: str, fit: str, seed: "int | str", args: argparse.Namespace) -> list[str]:
    """finetune_cifar flags of one run: its dense phase only, one fit policy."""
    return ["--dataset", dataset, "--fit", fit, "--seed", str(seed), "--model", args.model, "--dense-epochs",
            str(args.dense_epochs), "--epochs", "0", "--baseline", "dense", "--workers", "0", "--eval-every", "0",
            "--no-plots", "--device", args.device, "--out", os.path.join(args.out, dataset, fit, f"seed{seed}")]


def one(flags: list[str], resume: bool) -> dict[str, Any]:
    run = finetune_cifar.build_parser().parse_args(flags)
    done = os.path.join(run.out, "metrics.json")
    if resume and os.path.isfile(done):  # a split-up or interrupted A/B does not train finished runs again
        with open(done) as f:
            return json.load(f)
    start = time.perf_counter()
    metrics = finetune_cifar.run(run)
    metrics["wall_seconds"] = time.perf_counter() - start
    with open(done, "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Per dataset: each arm's test accuracies (mean, std, per seed) and the paired pad - stretch differences."""
    out = {}
    for dataset, arms in runs.items():
        seeds = sorted(set.intersection(*(set(arms[a]) for a in ARMS)))
        acc = {a: [arms[a][s]["test_acc"] for s in seeds] for a in ARMS}
        diff = [p - q for p, q in zip(acc["pad"], acc["stretch"])]
        first = arms["pad"][seeds[0]]
        out[dataset] = {"seeds": seeds, "dataset_version": first.get("dataset_version"),
                        "test_samples": first["test_samples"], **{a: _stats(acc[a]) for a in ARMS},
                        "pad_minus_stretch": _stats(diff),
                        "wall_seconds": sum(arms[a][s].get("wall_seconds", 0.0) for a in ARMS for s in seeds)}
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| dataset | seed | pad | stretch | pad - stretch |", "|---|---:|---:|---:|---:|"]
    for dataset, r in summary.items():
        for i, seed in enumerate(r["seeds"]):
            lines.append(f"| {dataset} | {seed} | {100 * r['pad']['values'][i]:.2f} | "
                         f"{100 * r['stretch']['values'][i]:.2f} | {100 * r['pad_minus_stretch']['values'][i]:+.2f} |")
        pm = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"  # noqa: E731
        d = r["pad_minus_stretch"]
        lines.append(f"| {dataset} | mean ± std | {pm(r['pad'])} | {pm(r['stretch'])} | "
                     f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="animals-c,digits-c", metavar="NAME,...")
    parser.add_argument("--seeds", default="0,1,2", metavar="S,...")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/pad_vs_stretch")
    parser.add_argument("--resume", action="store_true", help="reuse the runs that finished (their metrics.json)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            for fit in ARMS:  # both arms of a seed back to back: machine load drifts less between them
                flags = run_args(dataset, fit, seed, args)
                metrics = one(flags, args.resume)
                if metrics.get("fit") != fit:
                    raise SystemExit(f"{flags[-1]} holds a run with fit={metrics.get('fit')!r}, not {fit!r}")
                runs.setdefault(dataset, {}).setdefault(fit, {})[seed] = metrics
    summary = summarise(runs)
    recipe = "python examples/finetune_cifar.py " + " ".join(run_args("{dataset}", "{fit}", "{seed}", args))
    result = {"summary": summary, "command": " ".join(sys.argv), "recipe": recipe,
              "minutes": (time.perf_counter() - start) / 60}
    with open(os.path.join(args.out, "pad_vs_stretch.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(table(summary))
    print(f"written: {os.path.join(args.out, 'pad_vs_stretch.json')} ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()

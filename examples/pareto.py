"""Accuracy vs realised FLOPs saved, over seeds: routed (and gated) models against static depth pruning, the dense
model continued as long, and a cascade of separately pruned models; the same data, epochs and teacher for all.

For every seed: one dense model (trained once), then from that same start and for the same fine-tuning epochs,
optimiser, teacher and data:

* ``dense_continued``: the dense model trained --epochs more;
* ``static``: static depth pruning at each of --static-saved (FLOPs saved), fine-tuned as long: the static curve;
* ``routed``: one run per --route-presets, each calibrated on the validation split to its target and to
  --route-targets (one trained model, several operating points);
* ``gated``: one run per --gated-presets (CosineGate controllers; none by default);
* ``cascade``: two of the static models in a row, the deeper one only for the samples the cheaper one is unsure of
  (threshold on its top softmax probability chosen on the validation split), paying for both, nothing shared.

Every point is reported as mean and standard deviation over the seeds. A routed point is compared with the static
curve interpolated at its own realised FLOPs, seed by seed (same dense model); a margin smaller than two standard
deviations of those per-seed margins is a tie. Writes pareto.json, pareto.png (error bars) and one folder per run.

    python examples/pareto.py                         # offline default: animals-c, ResNet-20, 3 seeds (25 min, 2 cores)
    python examples/pareto.py --quick --out /tmp/p    # a smoke run (CI): 1 seed, 1 epoch per phase
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_cifar  # noqa: E402  (the example this sweep repeats with different flags)
from gateify.data import VERSIONS  # noqa: E402

_logger = logging.getLogger("pareto")


def build_parser() -> argparse.ArgumentParser:
    parser = finetune_cifar.build_parser()
    parser.description = __doc__
    # the sweep reads each run's final figures only: no test pass after every epoch
    parser.set_defaults(out="runs/pareto", dataset="animals-c", dense_epochs=10, epochs=5, lr=0.05, workers=0,
                        eval_every=0)
    group = parser.add_argument_group("sweep")
    group.add_argument("--seeds", type=int, default=3, help="independent repeats, each from its own dense model")
    group.add_argument("--jobs", type=int, default=3,
                       help="seeds trained in parallel processes (threads are split; more processes than cores keeps "
                            "every core busy when the seeds do not divide evenly)")
    group.add_argument("--static-saved", default="0.35,0.56,0.67,0.79", metavar="F,F,...",
                       help="FLOPs saved of the static pruning points (the static curve)")
    group.add_argument("--route-presets", default="balanced", metavar="NAME,...",
                       help="routed runs, by gateify.ROUTE_PRESETS name")
    group.add_argument("--route-targets", default="0.35,0.45", metavar="F,F,...",
                       help="more executed FLOPs fractions to calibrate every routed run to")
    group.add_argument("--gated-presets", default="", metavar="NAME,...",
                       help="CosineGate runs, by gateify.PRESETS name (none by default)")
    group.add_argument("--quick", action="store_true",
                       help="smoke run: 1 seed, 1 dense and 1 fine-tuning epoch, 2 static points, 1 routed preset")
    return parser


# ------------------------------------------------------------------------------------------------- running


def run_one(args: argparse.Namespace, seed: int, name: str, **changes: Any) -> dict[str, Any]:
    sub = copy.copy(args)
    sub.reg = list(args.reg)
    sub.seed = seed
    sub.no_plots = True
    for key, value in changes.items():
        setattr(sub, key, value)
    sub.out = os.path.join(args.out, f"seed{seed}", name)
    done = os.path.join(sub.out, "metrics.json")
    if args.resume and os.path.isfile(done):  # an interrupted sweep does not train its finished runs again
        with open(done) as f:
            metrics = json.load(f)
        _logger.info("=== seed %d: %s (finished before: %s)", seed, name, done)
        metrics["run"] = sub.out
        return metrics
    _logger.info("=== seed %d: %s", seed, name)
    metrics = finetune_cifar.run(sub)
    metrics["run"] = sub.out
    return metrics


def run_seed(args: argparse.Namespace, seed: int, threads: int) -> list[dict[str, Any]]:
    """Every run of one seed; returns its points (one per run, or per operating point of a routed run)."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [seed {seed}] %(message)s", datefmt="%H:%M:%S")
    dense = run_one(args, seed, "dense_continued", baseline="dense")
    init = os.path.join(dense["run"], "dense.safetensors")
    points = [point(dense, "dense", "dense", seed, test_acc=dense["source_test_acc"], flops_saved=0.0, epochs=0),
              point(dense, "dense_continued", "dense +ft", seed)]
    for saved in finetune_cifar.floats(args.static_saved):
        m = run_one(args, seed, f"static_{saved:.2f}", baseline="static", target=1 - saved, init=init)
        points.append(point(m, "static", f"static@{saved:.2f}", seed, logits=os.path.join(m["run"], "logits.safetensors")))
    for preset in [p for p in args.route_presets.split(",") if p]:
        m = run_one(args, seed, f"routed_{preset}", baseline="none", method="routed", preset=preset, init=init,
                    targets=args.route_targets)
        for rp in m["routed_points"]:
            label = f"routed {preset} " + (f"@{rp['target']:.2f}" if rp["target"] is not None else rp["label"])
            kind = "routed" if rp["target"] is not None else "routed_path"
            points.append(point(m, kind, label, seed, test_acc=rp["test_acc"], flops_saved=rp["flops_saved"],
                                val_acc=rp["val_acc"], level_shares=rp["level_shares"], target=rp["target"]))
    for preset in [p for p in args.gated_presets.split(",") if p]:
        m = run_one(args, seed, f"gated_{preset}", baseline="none", method="gated", preset=preset, init=init,
                    target=None)
        points.append(point(m, "gated", f"gated {preset}", seed))
    return points


def point(metrics: dict[str, Any], kind: str, label: str, seed: int, **override: Any) -> dict[str, Any]:
    p = {"kind": kind, "label": label, "seed": seed, "test_acc": metrics["test_acc"],
         "val_acc": metrics.get("val_acc"), "flops_saved": metrics["flops_saved"], "epochs": metrics["epochs"],
         "executed_macs": metrics["executed_macs"], "dense_macs": metrics["dense_macs"], "run": metrics["run"]}
    p.update(override)
    return p


# ------------------------------------------------------------------------------------------------- analysis


def cascades(points: list[dict[str, Any]], targets: list[float]) -> list[dict[str, Any]]:
    """Per seed, the best cascade of two static models (cheap first, deep for the unsure) at each executed-FLOPs
    target: pairs and threshold chosen on the validation split, accuracy and FLOPs on the test set."""
    import torch
    from safetensors.torch import load_file

    out = []
    for seed in sorted({p["seed"] for p in points}):
        statics = sorted((p for p in points if p["seed"] == seed and p["kind"] == "static"),
                         key=lambda p: -p["flops_saved"])
        logits = {p["label"]: load_file(p["logits"]) for p in statics}
        dense_macs = statics[0]["dense_macs"] if statics else 1.0
        for target in targets:
            best = None
            for i, cheap in enumerate(statics):
                for deep in statics[i + 1:]:
                    c, d = logits[cheap["label"]], logits[deep["label"]]
                    cost_c, cost_d = cheap["executed_macs"], deep["executed_macs"]
                    if cost_c > target * dense_macs:
                        continue
                    p_max = (target * dense_macs - cost_c) / cost_d  # the share that may go deeper
                    conf_val = c["val_logits"].softmax(1).max(1).values
                    tau = float(torch.quantile(conf_val, min(max(p_max, 0.0), 1.0))) if p_max > 0 else 0.0
                    val_acc = _cascade_acc(c["val_logits"], d["val_logits"], c["val_labels"], tau)[0]
                    if best is None or val_acc > best[0]:
                        test_acc, share = _cascade_acc(c["test_logits"], d["test_logits"], c["test_labels"], tau)
                        saved = 1 - (cost_c + share * cost_d) / dense_macs
                        best = (val_acc, test_acc, saved, f"{cheap['label']} -> {deep['label']}")
            if best is not None:
                out.append({"kind": "cascade", "label": f"cascade@{target:.2f}", "seed": seed, "test_acc": best[1],
                            "val_acc": best[0], "flops_saved": best[2], "pair": best[3],
                            "epochs": statics[0]["epochs"]})
    return out


def _cascade_acc(cheap, deep, labels, tau: float) -> tuple[float, float]:
    go = cheap.softmax(1).max(1).values < tau
    pred = deep.argmax(1).where(go, cheap.argmax(1))
    return float((pred == labels).float().mean()), float(go.float().mean())


def static_curve(points: list[dict[str, Any]], seed: int) -> list[tuple[float, float]]:
    """(FLOPs saved, accuracy) of one seed's static points and its dense continued model, by FLOPs saved."""
    pts = [p for p in points if p["seed"] == seed and p["kind"] in ("static", "dense_continued")]
    return sorted((p["flops_saved"], p["test_acc"]) for p in pts)


def interpolate(curve: list[tuple[float, float]], saved: float) -> Optional[float]:
    """Linear interpolation of the curve at ``saved``; None outside it."""
    for (s0, a0), (s1, a1) in zip(curve, curve[1:]):
        if s0 <= saved <= s1:
            return a0 if s1 == s0 else a0 + (a1 - a0) * (saved - s0) / (s1 - s0)
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (kind, label): test accuracy and FLOPs saved as mean, std and per-seed values."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["kind"], p["label"]), []).append(p)
    out = []
    for (kind, label), ps in groups.items():
        ps = sorted(ps, key=lambda p: p["seed"])
        entry = {"kind": kind, "label": label, "test_acc": _stats([p["test_acc"] for p in ps]),
                 "flops_saved": _stats([p["flops_saved"] for p in ps]), "epochs": ps[0]["epochs"],
                 "seeds": [p["seed"] for p in ps]}
        if all(p.get("level_shares") for p in ps):
            entry["level_shares"] = [statistics.fmean(v) for v in zip(*(p["level_shares"] for p in ps))]
        out.append(entry)
    return out


def margins(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each routed (a threshold or one path alone), gated and cascade label: accuracy minus the static curve interpolated at the same realised
    FLOPs, per seed (its own static curve), then mean and std over the seeds."""
    out = []
    labels = dict.fromkeys((p["kind"], p["label"]) for p in points
                           if p["kind"] in ("routed", "routed_path", "gated", "cascade"))
    for kind, label in labels:
        per_seed, saved = [], []
        for p in (q for q in points if q["label"] == label):
            static = interpolate(static_curve(points, p["seed"]), p["flops_saved"])
            if static is not None:
                per_seed.append(p["test_acc"] - static)
                saved.append(p["flops_saved"])
        if not per_seed:
            continue
        m = _stats(per_seed)
        out.append({"kind": kind, "label": label, "flops_saved": statistics.fmean(saved), "margin": m["mean"],
                    "margin_std": m["std"], "margin_values": per_seed, "seeds": len(per_seed),
                    "beyond_2std": len(per_seed) > 1 and abs(m["mean"]) > 2 * m["std"]})
    return out


def plot(entries: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "*"), "dense_continued": ("grey", "P"), "static": ("tab:orange", "s"),
             "routed": ("tab:blue", "o"), "routed_path": ("tab:cyan", "v"), "gated": ("tab:green", "^"),
             "cascade": ("tab:purple", "D")}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind, (color, marker) in style.items():
        pts = sorted((e for e in entries if e["kind"] == kind), key=lambda e: e["flops_saved"]["mean"])
        if not pts:
            continue
        xs = [100 * e["flops_saved"]["mean"] for e in pts]
        ys = [100 * e["test_acc"]["mean"] for e in pts]
        ax.errorbar(xs, ys, xerr=[100 * e["flops_saved"]["std"] for e in pts],
                    yerr=[100 * e["test_acc"]["std"] for e in pts], fmt=marker, color=color, ms=6, capsize=3,
                    label=kind, ls="-" if kind == "static" else "none")
    ax.set_xlabel("realised FLOPs saved (%, test set, routing and gate overhead included)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def table(entries: list[dict[str, Any]], found: list[dict[str, Any]]) -> str:
    lines = [f"{'kind':<16}{'label':<28}{'test acc (mean ± std)':>24}{'FLOPs saved':>14}{'epochs':>8}"]
    for e in sorted(entries, key=lambda e: (e["flops_saved"]["mean"], e["kind"])):
        acc, saved = e["test_acc"], e["flops_saved"]
        lines.append(f"{e['kind']:<16}{e['label']:<28}{100 * acc['mean']:>14.2f} ± {100 * acc['std']:.2f}"
                     f"{100 * saved['mean']:>13.1f}%{e['epochs']:>8}")
    lines.append("\nmargin over the static curve at equal realised FLOPs (per seed, then mean ± std):")
    for m in sorted(found, key=lambda m: m["flops_saved"]):
        verdict = "beyond 2 std" if m["beyond_2std"] else "tie (within 2 std)"
        lines.append(f"  {m['label']:<28} at {100 * m['flops_saved']:5.1f}% saved: {100 * m['margin']:+.2f} ± "
                     f"{100 * m['margin_std']:.2f} points ({verdict})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.dense_epochs, args.epochs = 1, 1, 1
        args.static_saved, args.route_presets, args.route_targets = "0.35,0.70", "balanced", ""
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = max(1, min(args.jobs, len(seeds)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    try:
        if jobs == 1:
            results = [run_seed(args, seed, threads) for seed in seeds]
        else:  # seeds are independent: a process each (spawned: no torch state is forked)
            with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(run_seed, [args] * len(seeds), seeds, [threads] * len(seeds)))
    except finetune_cifar.gateify.GateifyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    points = [p for seed_points in results for p in seed_points]
    # the cascade at each executed-FLOPs target a routed model was calibrated to (on validation data, as they are)
    points += cascades(points, sorted({p["target"] for p in points if p["kind"] == "routed"}))
    entries = aggregate(points)
    found = margins(points)
    result = {"points": entries, "margins": found, "runs": points, "command": " ".join(sys.argv),
              "model": args.model, "dataset": args.dataset, "dataset_version": VERSIONS[args.dataset],
              "fit": args.fit, "epochs": args.epochs, "dense_epochs": args.dense_epochs,
              "seeds": seeds, "minutes": (time.perf_counter() - start) / 60}
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(entries, os.path.join(args.out, "pareto.png"),
         f"{args.model} on {args.dataset}: {args.epochs} fine-tuning epochs from one dense model per seed "
         f"({len(seeds)} seeds)")
    print(table(entries, found))
    print(f"written: {os.path.join(args.out, 'pareto.json')}, pareto.png ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()

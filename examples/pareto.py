"""Accuracy vs realised FLOPs saved, over seeds: routed (and gated) models against the strongest fair controls.

For every seed: one dense model (trained once), then from that same start, with the same optimiser, teacher and
data:

* ``dense_continued``: the dense model trained --epochs more;
* ``static``: static depth pruning at each of --static-saved (FLOPs saved), fine-tuned as long: the static curve;
* ``routed``: one run per --route-presets entry, each calibrated on the validation split to its target and to
  --route-targets (one trained model, several operating points); an entry may add options to the preset:
  ``balanced:path_norms=0`` (gateify.route(path_norms=False)), ``balanced:survivors=0.5`` (RouteLoss(survivors=0.5));
* ``gated``: one run per --gated-presets (CosineGate controllers, every block gated, as every recorded sweep ran
  them; finetune_cifar's default gated recipe adds a static floor, compared in examples/budget.py; none by default);
* ``cascade``: two of the static models in a row, the deeper one only for the samples the cheaper one is unsure of
  (threshold on its top softmax probability chosen on the validation split), paying for both, nothing shared.

and, with --fair (the default), the two controls a routed model must beat to claim anything:

* ``static_fair``: static pruning at each --static-saved point of at least 50% saved, trained with as many FLOPs as
  the first routed run (more epochs: a routed model trains every path on every sample);
* ``cascade_sd``: a cascade whose cheap model was distilled from its deep one (fit's self_teacher), as a routed
  model's cheap path is from its deep path: the pair is the static points nearest the first preset's paths.

A routed point is compared with each control, seed by seed (same dense model): with the static curves interpolated at
its own realised FLOPs, with the cascades calibrated to the same target. Per control: the paired margins' mean,
standard deviation and the paired t-test's two-sided p-value; the verdict is against the strongest control at that
budget (the one the routed point beats by least). Writes pareto.json, pareto.png (error bars) and one folder per run.

    python examples/pareto.py                         # offline default: animals-c, ResNet-20, 5 seeds, fair controls
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
import threading
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
    group.add_argument("--seeds", type=int, default=5, help="independent repeats, each from its own dense model")
    group.add_argument("--jobs", type=int, default=3,
                       help="seeds trained in parallel processes (threads are split; more processes than cores keeps "
                            "every core busy when the seeds do not divide evenly)")
    group.add_argument("--static-saved", default="0.35,0.56,0.67,0.79", metavar="F,F,...",
                       help="FLOPs saved of the static pruning points (the static curve)")
    group.add_argument("--route-presets", default="balanced", metavar="NAME[:OPTION[=V]],...",
                       help="routed runs, by gateify.ROUTE_PRESETS name, each with optional options: path_norms=0 "
                            "(one BatchNorm mixture for every path), survivors=F, self_distill=W (e.g. "
                            "balanced,balanced:path_norms=0)")
    group.add_argument("--route-targets", default="0.35,0.45", metavar="F,F,...",
                       help="more executed FLOPs fractions to calibrate every routed run to")
    group.add_argument("--gated-presets", default="", metavar="NAME,...",
                       help="CosineGate runs, by gateify.PRESETS name (none by default)")
    group.add_argument("--fair", action=argparse.BooleanOptionalAction, default=True,
                       help="the fair controls: static pruning trained with the routed model's training FLOPs, and a "
                            "cascade whose cheap model is distilled from its deep one (default on)")
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


def log_as(tag: Optional[str] = None) -> None:
    """Log INFO lines to stderr prefixed with ``[tag]``, the run this process is on now. One handler of its own,
    whose format changes with each call: a worker process takes run after run (a second ``basicConfig`` would keep
    the first run's prefix), and handlers others installed (pytest's) stay."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "sweep_log", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.sweep_log = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    prefix = f"[{tag}] " if tag else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))


def _exit_with(parent: int) -> None:
    """A worker's initializer: exit as soon as the sweep that started it is gone. Spawned workers outlive a parent
    killed alone (``kill``, a timeout) and would go on training into the run folders a ``--resume`` rerun uses."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_pool(jobs: int) -> futures.ProcessPoolExecutor:
    """``jobs`` spawned processes (no torch state is forked) that die with this one."""
    return futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with,
                                       initargs=(os.getpid(),))


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` processes: the cores split between them, never more than this process may
    use (OMP_NUM_THREADS=1 on a shared machine stays one thread per process)."""
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))


def run_seed(args: argparse.Namespace, seed: int, threads: int) -> list[dict[str, Any]]:
    """Every run of one seed; returns its points (one per run, or per operating point of a routed run)."""
    import torch

    torch.set_num_threads(threads)
    log_as(f"seed {seed}")
    dense = run_one(args, seed, "dense_continued", baseline="dense")
    init = os.path.join(dense["run"], "dense.safetensors")
    points = [point(dense, "dense", "dense", seed, test_acc=dense["source_test_acc"], flops_saved=0.0, epochs=0),
              point(dense, "dense_continued", "dense +ft", seed)]
    for saved in finetune_cifar.floats(args.static_saved):
        m = run_one(args, seed, f"static_{saved:.2f}", baseline="static", target=1 - saved, init=init)
        points.append(point(m, "static", f"static@{saved:.2f}", seed, logits=os.path.join(m["run"], "logits.safetensors")))
    statics = {p["label"]: p for p in points if p["kind"] == "static"}
    routed_runs = []
    for spec in [p for p in args.route_presets.split(",") if p]:
        preset, options = route_spec(spec)
        m = run_one(args, seed, f"routed_{spec.replace(':', '_').replace('=', '')}", baseline="none", method="routed",
                    preset=preset, init=init, targets=args.route_targets, **options)
        routed_runs.append(m)
        for rp in m["routed_points"]:
            label = f"routed {spec} " + (f"@{rp['target']:.2f}" if rp["target"] is not None else rp["label"])
            kind = "routed" if rp["target"] is not None else "routed_path"
            points.append(point(m, kind, label, seed, test_acc=rp["test_acc"], flops_saved=rp["flops_saved"],
                                val_acc=rp["val_acc"], level_shares=rp["level_shares"], target=rp["target"]))
    if args.fair and routed_runs:
        points += fair_controls(args, seed, init, routed_runs[0], list(statics.values()))
    for preset in [p for p in args.gated_presets.split(",") if p]:
        # the recipe every recorded sweep used (every block gated); budget.py compares it with the static floor
        m = run_one(args, seed, f"gated_{preset}", baseline="none", method="gated", preset=preset, init=init,
                    target=None, static_floor=0.0, gate_downsampling=True)
        points.append(point(m, "gated", f"gated {preset}", seed))
    return points


def route_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"balanced:path_norms=0:survivors=0.5"`` -> ``("balanced", {"path_norms": False, "survivors": 0.5})``."""
    name, *options = spec.split(":")
    known = {"path_norms": bool, "survivors": float, "self_distill": float}
    out: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in known:
            raise finetune_cifar.gateify.GateifyError(f"routed option '{key}' in '{spec}' is not one of {list(known)}.")
        if known[key] is bool:  # "path_norms" or "path_norms=1" / "path_norms=0"
            if value not in ("", "0", "1"):
                raise finetune_cifar.gateify.GateifyError(f"'{option}' in '{spec}': write {key}, {key}=1 or {key}=0.")
            out[key] = value != "0"
        else:
            out[key] = known[key](value)
    return name, out


def fair_controls(args: argparse.Namespace, seed: int, init: str, routed: dict[str, Any],
                  statics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The controls a routed run must beat (module doc): static pruning trained with the routed run's training FLOPs
    at every static point of at least 50% saved, and the cheap model of a cascade distilled from its deep one."""
    points = []
    for s in statics:
        saved = float(s["label"].split("@")[1])
        epochs = round(args.epochs * routed["train_macs"] / s["executed_macs"])
        if saved >= 0.5 and epochs > args.epochs:
            m = run_one(args, seed, f"static_fair_{saved:.2f}", baseline="static", target=1 - saved, init=init,
                        epochs=epochs)
            points.append(point(m, "static_fair", f"static fair@{saved:.2f}", seed,
                                logits=os.path.join(m["run"], "logits.safetensors")))
    # the cascade pair nearest the routed run's paths: its cheap model learns from its deep one
    fractions = routed["route"]["paths_flops"]
    by_cost = sorted(statics, key=lambda p: p["executed_macs"])
    cheap = min(by_cost, key=lambda p: abs(p["executed_macs"] / p["dense_macs"] - fractions[0]))
    deep = min(by_cost, key=lambda p: abs(p["executed_macs"] / p["dense_macs"] - fractions[-1]))
    if cheap is not deep:
        saved = float(cheap["label"].split("@")[1])
        m = run_one(args, seed, f"static_sd_{saved:.2f}", baseline="static", target=1 - saved, init=init,
                    self_teacher=os.path.join(deep["run"], "static.safetensors"), self_distill=1.0)
        points.append(point(m, "static_sd", f"static sd@{saved:.2f}", seed, deep=deep["label"],
                            logits=os.path.join(m["run"], "logits.safetensors")))
    return points


def point(metrics: dict[str, Any], kind: str, label: str, seed: int, **override: Any) -> dict[str, Any]:
    p = {"kind": kind, "label": label, "seed": seed, "test_acc": metrics["test_acc"],
         "val_acc": metrics.get("val_acc"), "flops_saved": metrics["flops_saved"], "epochs": metrics["epochs"],
         "executed_macs": metrics["executed_macs"], "dense_macs": metrics["dense_macs"], "run": metrics["run"]}
    p.update(override)
    return p


# ------------------------------------------------------------------------------------------------- analysis


def cascades(points: list[dict[str, Any]], targets: list[float], kind: str = "cascade") -> list[dict[str, Any]]:
    """Per seed, the best cascade of two static models (cheap first, deep for the unsure) at each executed-FLOPs
    target: pairs and threshold chosen on the validation split, accuracy and FLOPs on the test set. ``cascade``:
    any two of the seed's static models; ``cascade_sd``: the distilled cheap model (``static_sd``) and its teacher."""
    import torch
    from safetensors.torch import load_file

    out = []
    for seed in sorted({p["seed"] for p in points}):
        statics = sorted((p for p in points if p["seed"] == seed and p["kind"] == "static"),
                         key=lambda p: -p["flops_saved"])
        if kind == "cascade":
            pairs = [(cheap, deep) for i, cheap in enumerate(statics) for deep in statics[i + 1:]]
        else:
            by_label = {p["label"]: p for p in statics}
            pairs = [(p, by_label[p["deep"]]) for p in points if p["seed"] == seed and p["kind"] == "static_sd"]
        logits = {p["label"]: load_file(p["logits"]) for pair in pairs for p in pair}
        dense_macs = statics[0]["dense_macs"] if statics else 1.0
        for target in targets:
            best = None
            for cheap, deep in pairs:
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
                out.append({"kind": kind, "label": f"{kind}@{target:.2f}", "seed": seed, "test_acc": best[1],
                            "target": target, "val_acc": best[0], "flops_saved": best[2], "pair": best[3],
                            "epochs": statics[0]["epochs"]})
    return out


def _cascade_acc(cheap, deep, labels, tau: float) -> tuple[float, float]:
    go = cheap.softmax(1).max(1).values < tau
    pred = deep.argmax(1).where(go, cheap.argmax(1))
    return float((pred == labels).float().mean()), float(go.float().mean())


def static_curve(points: list[dict[str, Any]], seed: int, fair: bool = False) -> list[tuple[float, float]]:
    """(FLOPs saved, accuracy) of one seed's static points and its dense continued model, by FLOPs saved; with
    ``fair``, a static point trained with the routed run's FLOPs (``static_fair``) replaces its equal-epoch twin."""
    pts = {p["label"].split("@")[-1]: p for p in points
           if p["seed"] == seed and p["kind"] in ("static", "dense_continued")}
    if fair:
        pts.update({p["label"].split("@")[-1]: p for p in points if p["seed"] == seed and p["kind"] == "static_fair"})
    return sorted((p["flops_saved"], p["test_acc"]) for p in pts.values())


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


def paired(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation and the two-sided p-value of a paired t-test (per-seed differences against 0)."""
    from scipy import stats

    out = _stats(values)
    out["p"] = float(stats.ttest_1samp(values, 0.0).pvalue) if len(values) > 1 and out["std"] > 0 else None
    return out


#: the controls a routed point is compared with: the static curves at its realised FLOPs, the cascades at its target
CONTROLS = ("static", "static_fair", "cascade", "cascade_sd")


def control_accuracy(points: list[dict[str, Any]], p: dict[str, Any], control: str) -> Optional[float]:
    """The control's accuracy for the routed (or gated, ...) point ``p``'s seed and budget; None where it has none."""
    if control in ("static", "static_fair"):
        return interpolate(static_curve(points, p["seed"], fair=control == "static_fair"), p["flops_saved"])
    if p.get("target") is None:
        return None
    twin = next((q for q in points if q["kind"] == control and q["seed"] == p["seed"]
                 and q.get("target") == p["target"]), None)
    return twin["test_acc"] if twin is not None else None


def margins(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each routed (a threshold or one path alone), gated and cascade label: accuracy minus each control's at the
    same seed and budget (the static curves interpolated at the same realised FLOPs, the cascades at the same target),
    per seed, then paired statistics; ``strongest`` is the control the point beats by least."""
    out = []
    labels = dict.fromkeys((p["kind"], p["label"]) for p in points
                           if p["kind"] in ("routed", "routed_path", "gated", "cascade", "cascade_sd"))
    for kind, label in labels:
        mine = [q for q in points if q["label"] == label]
        entry: dict[str, Any] = {"kind": kind, "label": label,
                                 "flops_saved": statistics.fmean(q["flops_saved"] for q in mine), "controls": {}}
        for control in CONTROLS:
            if control == kind:
                continue
            diffs = [(q["test_acc"] - a) for q in mine if (a := control_accuracy(points, q, control)) is not None]
            if len(diffs) == len(mine):  # every seed has the control: a paired comparison
                entry["controls"][control] = paired(diffs)
        if not entry["controls"]:
            continue
        strongest = min(entry["controls"], key=lambda c: entry["controls"][c]["mean"])
        m = entry["controls"]["static"] if "static" in entry["controls"] else entry["controls"][strongest]
        entry.update(margin=m["mean"], margin_std=m["std"], margin_values=m["values"], seeds=len(mine),
                     beyond_2std=len(mine) > 1 and abs(m["mean"]) > 2 * m["std"], strongest=strongest)
        out.append(entry)
    return out


def plot(entries: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "*"), "dense_continued": ("grey", "P"), "static": ("tab:orange", "s"),
             "static_fair": ("tab:red", "s"), "routed": ("tab:blue", "o"), "routed_path": ("tab:cyan", "v"),
             "gated": ("tab:green", "^"), "cascade": ("tab:purple", "D"), "cascade_sd": ("tab:pink", "D")}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind, (color, marker) in style.items():
        pts = sorted((e for e in entries if e["kind"] == kind), key=lambda e: e["flops_saved"]["mean"])
        if not pts:
            continue
        xs = [100 * e["flops_saved"]["mean"] for e in pts]
        ys = [100 * e["test_acc"]["mean"] for e in pts]
        ax.errorbar(xs, ys, xerr=[100 * e["flops_saved"]["std"] for e in pts],
                    yerr=[100 * e["test_acc"]["std"] for e in pts], fmt=marker, color=color, ms=6, capsize=3,
                    label=kind, ls="-" if kind in ("static", "static_fair") else "none")
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
    lines.append("\nmargins, per seed then mean ± std (points) and paired t-test p, against each control at the same "
                 "budget; * = the strongest control there:")
    for m in sorted(found, key=lambda m: m["flops_saved"]):
        parts = []
        for control, c in m["controls"].items():
            p = f", p={c['p']:.3f}" if c["p"] is not None else ""
            star = "*" if control == m["strongest"] else ""
            parts.append(f"{control}{star} {100 * c['mean']:+.2f} ± {100 * c['std']:.2f}{p}")
        lines.append(f"  {m['label']:<30} at {100 * m['flops_saved']:5.1f}% saved: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    log_as()
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.dense_epochs, args.epochs = 1, 1, 1
        args.static_saved, args.route_presets, args.route_targets = "0.35,0.70", "balanced", ""
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    jobs = max(1, min(args.jobs, len(seeds)))
    threads = threads_per_job(jobs)
    try:
        if jobs == 1:
            results = [run_seed(args, seed, threads) for seed in seeds]
        else:  # seeds are independent: a process each
            with worker_pool(jobs) as pool:
                results = list(pool.map(run_seed, [args] * len(seeds), seeds, [threads] * len(seeds)))
    except finetune_cifar.gateify.GateifyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log_as()  # the sweep's own lines again, not the last seed's (--jobs 1 ran them in this process)
    points = [p for seed_points in results for p in seed_points]
    # the cascades at each executed-FLOPs target a routed model was calibrated to (on validation data, as they are)
    targets = sorted({p["target"] for p in points if p["kind"] == "routed"})
    points += cascades(points, targets) + cascades(points, targets, kind="cascade_sd")
    entries = aggregate(points)
    found = margins(points)
    result = {"points": entries, "margins": found, "runs": points, "command": " ".join(sys.argv),
              "model": args.model, "model_kwargs": args.model_kwargs, "dataset": args.dataset,
              "dataset_version": VERSIONS[args.dataset],
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

"""CosineGate gates against static depth pruning at several fine-tuning budgets, over seeds: the budget curve.

For every seed: one dense model (--dense-epochs, trained once), then for every budget E in --budgets, from that same
model, for E epochs each, with the same optimiser, learning rate schedule, teacher and data:

* ``dense_continued``: the dense model trained E epochs more;
* ``static``: static depth pruning at each of --static-saved (FLOPs saved), fine-tuned E epochs: the static curve;
* ``gated``: every recipe of --recipes (``RECIPES`` below; combine them with ``+``, e.g. ``static-init+recal``) at
  every entry of --gated: a gateify.PRESETS name (the presets differ by their FLOPs target only) or an executed-FLOPs
  fraction for the ``balanced`` preset. A run with BatchNorm recalibration also reports its accuracy before it, as
  ``... (no recal)``.

Each budget is compared as examples/pareto.py compares one: a gated point against the same seed's static curve
(``dense_continued`` at 0% saved, then the static points) interpolated at the gated point's own realised FLOPs; the
paired margins' mean, standard deviation and t-test p-value over seeds (``pareto.margins``). A gated point outside
the static curve's FLOPs range gets no margin (logged). Writes to --out:

* pareto.json: ``budgets``; ``points`` (pareto.aggregate's entries, each with ``budget`` and ``epochs``);
  ``margins`` (per gated label and budget: ``margin``, ``margin_std``, ``controls.static.p``, ``epochs``);
  ``runs`` (every run's per-seed point) and the configuration;
* pareto_e<E>.png per budget (pareto.py's plot) and budget.png (margin over static against the budget);
* one folder per run: <out>/seed<S>/dense, <out>/seed<S>/e<E>/<run>. --resume skips every run that finished.

Runs are independent work items on --jobs processes (threads split between them), the smallest budget first, so an
interrupted sweep has its short budgets complete.

Cost on animals-c (4,856 training images, ResNet-20 at 32 px), one thread per run, measured on 2 cores at load ~3: a
fine-tuning epoch (38 steps and the teacher's forward passes) takes ~29 s dense continued or gated, ~14 s static at 70%
saved, and each run adds ~30-90 s (static selection, evaluation, FLOPs counted on the test set, the static twin). The
default (3 seeds; budgets 5,15,30; 2 recipes x 3 presets; 5 static points: 108 runs, 1,800 fine-tuning epochs) is
~52,000 core-seconds: ~7 h with --jobs 2 on 2 such cores, less on idle ones; 60 epochs a run (--budgets 60) costs
~1.2x the default. Runs finish the smallest budget first and --resume keeps them. --quick (1 seed, 1 dense epoch,
budgets 1 and 2, 1 static point, 2 recipes at the balanced preset: 9 runs, 13 epochs) took 11 min of CPU (23 min of
wall time on that loaded machine); the test's smoke run (--quick --dataset digits --input-size 16) takes ~40 s.

    python examples/budget.py --resume                                        # the issue's curve (defaults)
    python examples/budget.py --budgets 5,15,30,60 --recipes default --resume # a longer curve, one recipe
    python examples/budget.py --quick --out /tmp/b                            # smoke run (CI)
    python examples/budget.py --resume --report                               # the finished runs so far, no training

From scratch, the paper's protocol (gates trained from epoch 0; no teacher; ``dense_continued`` is then the dense
model trained as long, ``dense`` the untrained one, and a static point a network pruned before training, its blocks
chosen on the untrained model's validation loss, so close to arbitrary; --static-saved "" leaves them out):

    python examples/budget.py --dense-epochs 0 --distill 0 --lr 0.1 --budgets 30 --recipes default \\
        --gated balanced --static-saved 0.24,0.35 --out runs/scratch --resume
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_cifar  # noqa: E402  (every run is finetune_cifar.run with other flags)
import pareto  # noqa: E402  (run_one, point, aggregate, margins, plot, table: one copy of the sweep's helpers)

_logger = logging.getLogger("budget")

#: Gated recipes as changes to finetune_cifar's flags (``reg``: --reg KEY=VALUE items, appended in order).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},  # the preset as shipped: keep floor 0.25, CIR consistency 0.1, noise 1 -> 0, tau 1 -> 0.5
    "no-floor": {"reg": ["min_keep=0"]},
    "static-init": {"gate_init": "static", "reg": ["min_keep=0"]},  # start at the static selection for the target
    "bounds": {"reg": ["min_keep=0", "bounds=0.33"]},  # LAUDNet: per-block bounds relaxed over the first third
    "shaping": {"reg": ["shaping_weight=1"]},  # batch-shaping prior, on top of the preset
    "no-cir": {"reg": ["consistency_weight=0"]},  # CIR's own contribution
    "tau": {"reg": ["tau_start=5", "tau_end=0.1"]},  # LAUDNet's temperature schedule
    "recal": {"recal_bn": True},  # BatchNorm recalibration on the hard decisions after training
    "keep-ds": {"gate_downsampling": False},  # downsampling blocks keep every sample (their gates pinned open)
    "floor": {"static_floor": 0.75, "reg": ["min_keep=0"]},  # 3/4 of the saving static (blocks removed), 1/4 gated
}

#: what --quick runs (the sweep's shape at the smallest size that still has a curve and a margin per budget)
QUICK = {"seeds": 1, "dense_epochs": 1, "budgets": "1,2", "static_saved": "0.70",
         "recipes": "default,static-init+recal", "gated": "balanced"}


def build_parser() -> argparse.ArgumentParser:
    """finetune_cifar's flags with pareto.py's sweep defaults, and the budget sweep's own. --epochs, --baseline,
    --method, --preset and --target are set per run."""
    parser = finetune_cifar.build_parser()
    parser.description = __doc__
    sweep = pareto.build_parser()
    parser.set_defaults(**{key: sweep.get_default(key) for key in ("dataset", "dense_epochs", "lr", "workers",
                                                                     "eval_every")})
    parser.set_defaults(out="runs/budget")
    group = parser.add_argument_group("budget sweep")
    group.add_argument("--budgets", default="5,15,30", metavar="E,E,...",
                       help="fine-tuning epochs, the same for every kind at a budget (default: 5,15,30)")
    group.add_argument("--seeds", type=int, default=3, help="independent repeats, each from its own dense model")
    group.add_argument("--jobs", type=int, default=2,
                       help="runs trained in parallel processes, the CPU threads split between them (default: 2)")
    group.add_argument("--static-saved", default="0.12,0.24,0.35,0.47,0.56", metavar="F,F,...",
                       help="FLOPs saved of the static pruning points: the static curve every gated point is "
                            "interpolated on; it should span the gated points' realised FLOPs")
    group.add_argument("--recipes", default="default,static-init", metavar="NAME[+NAME],...",
                       help=f"gated recipes, from {sorted(RECIPES)}; '+' combines them")
    group.add_argument("--gated", default="conservative,balanced,aggressive", metavar="PRESET|F,...",
                       help="operating points every gated recipe is trained for: gateify.PRESETS names or "
                            "executed FLOPs fractions (the balanced preset with that target)")
    group.add_argument("--report", action="store_true",
                       help="train nothing: write pareto.json and the plots from the runs under --out that finished "
                            "(a sweep still running, or one cut short, as it stands); the others are listed as missing")
    group.add_argument("--quick", action="store_true",
                       help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return parser


def parse_budgets(text: str) -> list[int]:
    """'30,5,15' -> [5, 15, 30]; whole positive epochs only."""
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"error: --budgets {text!r}: expected whole epochs, e.g. 5,15,30") from None
    if not budgets or budgets[0] < 1:
        raise SystemExit(f"error: --budgets {text!r}: expected at least one budget, each of 1 epoch or more")
    return budgets


def parse_gated(text: str) -> list[tuple[str, str, float]]:
    """[(preset, tag, executed FLOPs target)]: ``"balanced,0.42"`` -> ``[("balanced", "balanced", 0.70),
    ("balanced", "0.42", 0.42)]``."""
    out = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        if item in finetune_cifar.PRESETS:
            out.append((item, item, finetune_cifar.PRESETS[item].target))
            continue
        try:
            target = float(item)
        except ValueError:
            raise SystemExit(f"error: --gated {item!r}: expected a preset from {sorted(finetune_cifar.PRESETS)} "
                             f"or an executed FLOPs fraction such as 0.42") from None
        if not 0 < target <= 1:
            raise SystemExit(f"error: --gated {item!r}: an executed FLOPs fraction lies in (0, 1]")
        out.append(("balanced", f"{target:.2f}", target))
    return out


def recipe(name: str, reg: Optional[list[str]] = None) -> dict[str, Any]:
    """A recipe, or several joined by '+' (their --reg items concatenated after ``reg``, other flags merged)."""
    # every recipe starts from the gates as the sweeps before stop 32 ran them (every block gated, the presets' keep
    # floor), so that recorded results rerun; "floor" and "keep-ds" opt into what is now finetune_cifar's default
    changes: dict[str, Any] = {"reg": list(reg or []), "static_floor": 0.0, "gate_downsampling": True}
    for part in name.split("+"):
        if part not in RECIPES:
            raise SystemExit(f"error: unknown recipe {part!r}; known: {sorted(RECIPES)}")
        for key, value in RECIPES[part].items():
            if key == "reg":
                changes["reg"] = changes["reg"] + list(value)
            else:
                changes[key] = value
    return changes


def tasks(args: argparse.Namespace, seeds: list[int]) -> list[dict[str, Any]]:
    """Every fine-tuning run, the smallest budget first: seed, budget, kind, run (folder under the seed's), label
    and the flag changes pareto.run_one applies."""
    out = []
    for budget in parse_budgets(args.budgets):
        runs = [("dense_continued", "dense_continued", "dense +ft", {"baseline": "dense"})]
        runs += [("static", f"static_{saved:.2f}", f"static@{saved:.2f}", {"baseline": "static", "target": 1 - saved})
                 for saved in finetune_cifar.floats(args.static_saved)]
        for name in filter(None, args.recipes.split(",")):
            for preset, tag, target in parse_gated(args.gated):
                runs.append(("gated", f"gated_{name}_{tag}", f"gated {name} @{tag}",
                             {"baseline": "none", "method": "gated", "preset": preset, "target": target,
                              **recipe(name, args.reg)}))
        out += [{"seed": seed, "budget": budget, "kind": kind, "run": f"e{budget}/{run}", "label": label,
                 "changes": changes} for seed in seeds for kind, run, label, changes in runs]
    return out


def dense_phase(args: argparse.Namespace, seed: int, threads: int) -> dict[str, Any]:
    """The seed's dense model (trained once, no fine-tuning): every budget starts from its dense.safetensors."""
    import torch

    torch.set_num_threads(threads)
    pareto.log_as(f"seed {seed}")
    return pareto.run_one(args, seed, "dense", baseline="dense", epochs=0)


def run_task(args: argparse.Namespace, task: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    """One fine-tuning run; returns its points (two for a gated run with BatchNorm recalibration)."""
    import torch

    torch.set_num_threads(threads)
    seed, budget = task["seed"], task["budget"]
    pareto.log_as(f"seed {seed} e{budget}")
    # --init: every seed starts from those weights (the dense phase then only evaluates them)
    init = args.init or os.path.join(args.out, f"seed{seed}", "dense", "dense.safetensors")
    m = pareto.run_one(args, seed, task["run"], init=init, epochs=budget, **task["changes"])
    points = [pareto.point(m, task["kind"], task["label"], seed, budget=budget)]
    if "before_recal_bn" in m:  # the same run before recalibration: what the recalibration itself changed
        before = m["before_recal_bn"]
        points.append(pareto.point(m, task["kind"], task["label"] + " (no recal)", seed, budget=budget,
                                   test_acc=before["test_acc"], flops_saved=before["flops_saved"],
                                   executed_macs=(1 - before["flops_saved"]) * m["dense_macs"]))
    return points


def finished_only(args: argparse.Namespace, seeds: list[int], work: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """--report: the tasks whose run folder holds a whole metrics.json, the missing ones logged; every seed's dense
    phase must have finished."""
    for seed in seeds:
        if not readable(os.path.join(args.out, f"seed{seed}", "dense", "metrics.json")):
            raise SystemExit(f"error: --report: seed {seed} has no finished dense phase under {args.out}; run the "
                             f"sweep without --report first (--resume keeps what finished)")
    done = [t for t in work if readable(os.path.join(args.out, f"seed{t['seed']}", t["run"], "metrics.json"))]
    for t in work:
        if t not in done:
            _logger.warning("--report: seed %d %s has not finished; left out", t["seed"], t["run"])
    return done


def readable(path: str) -> bool:
    """Whether ``path`` holds a whole JSON file (finetune_cifar writes metrics.json last and atomically; a damaged
    or half-copied one still counts as unfinished)."""
    try:
        with open(path) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def dense_points(args: argparse.Namespace, seeds: list[int], budgets: list[int]) -> list[dict[str, Any]]:
    """The source model at every budget (0 fine-tuning epochs), from each seed's dense phase."""
    out = []
    for seed in seeds:
        run = os.path.join(args.out, f"seed{seed}", "dense")
        with open(os.path.join(run, "metrics.json")) as f:
            dense = {**json.load(f), "run": run}
        out += [pareto.point(dense, "dense", "dense", seed, test_acc=dense["source_test_acc"], flops_saved=0.0,
                             epochs=0, budget=budget) for budget in budgets]
    return out


def static_margins(runs: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """pareto.margins of one budget's runs, against the static curve only: the other controls of pareto.CONTROLS do
    not exist here (its ``static_fair`` falls back to the same equal-epoch curve and would repeat it)."""
    out = []
    for m in pareto.margins(runs):
        m["controls"] = {"static": m["controls"]["static"]} if "static" in m["controls"] else {}
        m["strongest"] = "static"
        if m["controls"]:
            out.append(m)
    why = ("realised FLOPs outside the static curve (--static-saved) for some seed" if any(
        p["kind"] == "static" for p in runs) else "no static run at this budget (--static-saved empty, or none finished)")
    for label in sorted({p["label"] for p in runs if p["kind"] == "gated"} - {m["label"] for m in out}):
        _logger.warning("%d epochs, %s: %s; no margin", budget, label, why)
    return out


def plot_budget(found: list[dict[str, Any]], path: str, title: str) -> None:
    """Margin over static (mean ± 2 std over seeds) against the fine-tuning budget, one line per gated label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label in dict.fromkeys(m["label"] for m in found):
        ms = sorted((m for m in found if m["label"] == label), key=lambda m: m["epochs"])
        saved = statistics.fmean(m["flops_saved"] for m in ms)
        ax.errorbar([m["epochs"] for m in ms], [100 * m["margin"] for m in ms],
                    yerr=[200 * m["margin_std"] for m in ms], marker="o", capsize=3,
                    label=f"{label} (~{100 * saved:.0f}% saved)")
    ax.axhline(0, color="k", lw=1, ls="--", label="static pruning at the same realised FLOPs")
    ax.set_xscale("log")  # budgets such as 5, 15, 30, 60: evenly spread
    budgets = sorted({m["epochs"] for m in found})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning epochs (every kind alike)")
    ax.set_ylabel("accuracy - static at equal FLOPs (points)\nerror bars: 2 std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def main(argv: Optional[list[str]] = None) -> None:
    pareto.log_as()
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    budgets, names = parse_budgets(args.budgets), [n for n in args.recipes.split(",") if n]
    for name in names:
        recipe(name)  # an unknown recipe or preset fails before any training
    parse_gated(args.gated)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    work = tasks(args, seeds)
    if args.report:  # the finished runs, read back as --resume reads them
        args.resume = True
        work = finished_only(args, seeds, work)
    jobs = max(1, min(args.jobs, len(work)))
    threads = pareto.threads_per_job(jobs)
    _logger.info("%d seeds x %d budgets: %d fine-tuning runs, %d epochs in all, on %d processes of %d threads",
                 len(seeds), len(budgets), len(work), sum(t["budget"] for t in work), jobs, threads)
    try:
        if jobs == 1:
            for seed in seeds:
                dense_phase(args, seed, threads)
            results = [run_task(args, task, threads) for task in work]
        else:  # independent runs: a process each
            with pareto.worker_pool(jobs) as pool:
                list(pool.map(dense_phase, [args] * len(seeds), seeds, [threads] * len(seeds)))
                results = list(pool.map(run_task, [args] * len(work), work, [threads] * len(work)))
    except finetune_cifar.gateify.GateifyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pareto.log_as()  # the sweep's own lines again, not the last run's (--jobs 1 ran them in this process)
    runs = [p for ps in results for p in ps] + dense_points(args, seeds, budgets)
    points, found, tables = [], [], []
    for budget in budgets:
        at = [p for p in runs if p["budget"] == budget]
        entries = pareto.aggregate(at)
        margins = static_margins(at, budget)
        for e in entries:
            e["budget"] = budget
        for m in margins:
            m["epochs"] = budget
        points += entries
        found += margins
        pareto.plot(entries, os.path.join(args.out, f"pareto_e{budget}.png"),
                    f"{args.model} on {args.dataset}: {budget} fine-tuning epochs from one dense model per seed "
                    f"({plural(len(seeds), 'seed')})")
        tables.append(f"== {budget} fine-tuning epochs ==\n" + pareto.table(entries, margins))
    result = {"budgets": budgets, "points": points, "margins": found, "runs": runs, "command": " ".join(sys.argv),
              "model": args.model, "model_kwargs": args.model_kwargs, "dataset": args.dataset,
              "dataset_version": pareto.VERSIONS[args.dataset],
              "fit": args.fit, "dense_epochs": args.dense_epochs, "seeds": seeds,
              "recipes": {n: recipe(n, args.reg) for n in names},
              "gated": [{"preset": p, "tag": t, "target": x} for p, t, x in parse_gated(args.gated)],
              "static_saved": finetune_cifar.floats(args.static_saved), "minutes": (time.perf_counter() - start) / 60}
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(result, f, indent=2)
    if found:
        plot_budget(found, os.path.join(args.out, "budget.png"),
                    f"{args.model} on {args.dataset}: gated vs static pruning by fine-tuning budget "
                    f"({plural(len(seeds), 'seed')})")
    print("\n\n".join(tables))
    print(f"written: {os.path.join(args.out, 'pareto.json')}, pareto_e*.png" + (", budget.png" if found else "")
          + f" ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()

"""examples/budget.py: the budget curve's files, points per budget, margins against each budget's own static curve
(a smoke run on digits), resuming, recipes and operating points as flag changes."""

import json
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import budget  # noqa: E402
import finetune_cifar  # noqa: E402  (the module budget.py trains with: patched below to watch what trains)
import pareto  # noqa: E402


def test_recipes_combine_into_flag_changes():
    base = {"static_floor": 0.0, "gate_downsampling": True}  # every block gated: how the recorded sweeps ran
    assert budget.recipe("default") == {"reg": [], **base}
    both = budget.recipe("static-init+bounds+recal", ["flops_weight=10"])
    assert both == {"reg": ["flops_weight=10", "min_keep=0", "min_keep=0", "bounds=0.33"], "gate_init": "static",
                    "recal_bn": True, **base}
    assert budget.recipe("floor+keep-ds") == {"reg": ["min_keep=0"], "static_floor": 0.75, "gate_downsampling": False}
    with pytest.raises(SystemExit, match="unknown recipe"):
        budget.recipe("static+magic")


def test_operating_points_and_budgets_parse_or_refuse():
    assert budget.parse_gated("aggressive, 0.42") == [("aggressive", "aggressive", 0.55), ("balanced", "0.42", 0.42)]
    with pytest.raises(SystemExit, match="preset"):
        budget.parse_gated("balancd")
    with pytest.raises(SystemExit, match=r"\(0, 1\]"):
        budget.parse_gated("1.5")
    assert budget.parse_budgets("30,5,15,5") == [5, 15, 30]
    for bad in ("5,7.5", "0,5", ""):
        with pytest.raises(SystemExit, match="--budgets"):
            budget.parse_budgets(bad)


def test_every_budget_trains_every_kind_for_that_many_epochs():
    args = budget.build_parser().parse_args(["--budgets", "10,3", "--seeds", "2", "--static-saved", "0.3,0.6",
                                             "--recipes", "default,no-cir", "--gated", "balanced,0.5"])
    work = budget.tasks(args, [0, 1])
    assert len(work) == 2 * 2 * (1 + 2 + 2 * 2)  # budgets x seeds x (dense +ft, static points, recipes x points)
    assert [t["budget"] for t in work] == sorted(t["budget"] for t in work)  # the short budget first
    gated = [t for t in work if t["kind"] == "gated" and t["budget"] == 3 and t["seed"] == 1]
    assert {t["run"] for t in gated} == {"e3/gated_default_balanced", "e3/gated_default_0.50",
                                         "e3/gated_no-cir_balanced", "e3/gated_no-cir_0.50"}
    no_cir = next(t for t in gated if t["run"] == "e3/gated_no-cir_0.50")["changes"]
    assert (no_cir["preset"], no_cir["target"], no_cir["reg"]) == ("balanced", 0.5, ["consistency_weight=0"])


def test_a_worker_logs_each_run_under_that_runs_prefix():
    # a worker process trains run after run: its log lines must name the run it is on now, not its first one
    try:
        pareto.log_as("seed 0 e5")
        pareto.log_as("seed 2 e15")
        ours = [h for h in logging.getLogger().handlers if getattr(h, "sweep_log", False)]
        assert len(ours) == 1  # one handler, re-formatted: no line printed twice
        record = logging.LogRecord("budget", logging.INFO, __file__, 1, "gated epoch 3/15", None, None)
        assert ours[0].format(record).endswith("[seed 2 e15] gated epoch 3/15")
    finally:
        for h in [h for h in logging.getLogger().handlers if getattr(h, "sweep_log", False)]:
            logging.getLogger().removeHandler(h)


def test_quick_curve_writes_every_budget_with_margins_and_resumes(tmp_path, monkeypatch):
    # digits at 16x16 pixels: a quarter of the convolutions' cost, the same sweep
    quick = ["--quick", "--dataset", "digits", "--input-size", "16", "--jobs", "1", "--device", "cpu",
             "--out", str(tmp_path)]
    budget.main(quick)
    result = json.loads((tmp_path / "pareto.json").read_text())
    assert result["budgets"] == [1, 2] and result["seeds"] == [0]
    for b in (1, 2):
        at = [p for p in result["points"] if p["budget"] == b]
        assert {p["kind"] for p in at} == {"dense", "dense_continued", "static", "gated"}
        # every fine-tuned point of a budget was fine-tuned for exactly that many epochs; the source for none
        assert {p["epochs"] for p in at if p["kind"] != "dense"} == {b}
        assert {p["epochs"] for p in at if p["kind"] == "dense"} == {0}
        assert {p["label"] for p in at if p["kind"] == "gated"} == {
            "gated default @balanced", "gated static-init+recal @balanced",
            "gated static-init+recal @balanced (no recal)"}
        # realised FLOPs, counted on the test set: static pruning saves what it removed, gates save something
        saved = {p["label"]: p["flops_saved"]["mean"] for p in at}
        assert saved["dense"] == saved["dense +ft"] == 0.0
        assert 0.6 < saved["static@0.70"] < 0.8
        assert all(0 < saved[label] < 1 for label in saved if label.startswith("gated"))
        assert (tmp_path / f"pareto_e{b}.png").stat().st_size > 10_000
        # each gated point against this budget's own static curve, at its own realised FLOPs
        for m in (m for m in result["margins"] if m["epochs"] == b):
            ours = next(r for r in result["runs"] if r["label"] == m["label"] and r["budget"] == b)
            curve = pareto.static_curve([r for r in result["runs"] if r["budget"] == b], 0)
            assert m["margin"] == pytest.approx(ours["test_acc"] - pareto.interpolate(curve, ours["flops_saved"]))
            assert set(m["controls"]) == {"static"} and m["controls"]["static"]["p"] is None  # one seed: no test
    assert {(m["label"], m["epochs"]) for m in result["margins"]} <= {
        (p["label"], p["budget"]) for p in result["points"] if p["kind"] == "gated"}
    assert len(result["margins"]) >= 2  # a realised FLOPs point outside [0, 70%] saved would have no margin
    assert (tmp_path / "budget.png").stat().st_size > 10_000
    m = json.loads((tmp_path / "seed0" / "e2" / "gated_static-init+recal_balanced" / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["regularizer"]["min_keep"] == 0 and "gate_init_blocks" in m
    assert "before_recal_bn" in m

    # --resume: a finished sweep trains nothing and writes the same points; a run without metrics.json trains again
    trained = []
    real_run = finetune_cifar.run

    def watch(args):
        trained.append(args.out)
        return real_run(args)

    monkeypatch.setattr(finetune_cifar, "run", watch)
    quick.append("--resume")
    budget.main(quick)
    assert trained == []
    again = json.loads((tmp_path / "pareto.json").read_text())
    assert again["points"] == result["points"] and again["margins"] == result["margins"]
    redo = tmp_path / "seed0" / "e1" / "static_0.70"
    (redo / "metrics.json").unlink()
    # --report: trains nothing, reports the finished runs as they stand (the unfinished one left out)
    budget.main([a for a in quick if a != "--resume"] + ["--report"])  # --report alone reads back, trains nothing
    assert trained == []
    report = json.loads((tmp_path / "pareto.json").read_text())
    assert {(r["label"], r["budget"]) for r in report["runs"]} == {
        (r["label"], r["budget"]) for r in result["runs"]} - {("static@0.70", 1)}
    with pytest.raises(SystemExit, match="no finished dense phase"):
        budget.main(quick + ["--report", "--out", str(tmp_path / "elsewhere")])
    budget.main(quick)
    assert trained == [str(redo)] and (redo / "metrics.json").is_file()


"""examples/pareto.py: the multi-seed sweep's files, points, interpolated margins and cascades (smoke run on digits),
and its statistics on numbers whose answer is known."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import pareto  # noqa: E402


def test_quick_sweep_writes_every_kind_with_mean_std_and_seeds(tmp_path):
    # digits at 16x16 pixels: a quarter of the convolutions' cost, the same sweep
    pareto.main(["--quick", "--dataset", "digits", "--input-size", "16", "--jobs", "1", "--device", "cpu",
                 "--out", str(tmp_path)])
    result = json.loads((tmp_path / "pareto.json").read_text())
    assert (result["dataset_version"], result["fit"]) == ("digits/2", "pad")
    kinds = {p["kind"] for p in result["points"]}
    assert {"dense", "dense_continued", "static", "routed", "routed_path", "cascade", "static_fair", "static_sd",
            "cascade_sd"} <= kinds
    for p in result["points"]:
        assert {"kind", "label", "test_acc", "flops_saved", "epochs", "seeds"} <= set(p)
        assert set(p["test_acc"]) == {"mean", "std", "values"} and len(p["test_acc"]["values"]) == len(p["seeds"])
    fine_tuned = [p for p in result["points"] if p["kind"] not in ("dense", "static_fair")]
    assert {p["epochs"] for p in fine_tuned} == {1}  # equal fine-tuning budget for every kind but the fair static
    # the fair static model trains with the routed model's FLOPs: more epochs of a cheaper model
    runs = {r["label"]: r for r in result["runs"]}
    fair = next(r for r in result["runs"] if r["kind"] == "static_fair")
    routed_run = json.loads((tmp_path / "seed0" / "routed_balanced" / "metrics.json").read_text())
    assert fair["epochs"] > 1
    assert fair["epochs"] * fair["executed_macs"] == pytest.approx(routed_run["train_macs"], rel=0.5 / fair["epochs"])
    assert runs[fair["label"].replace(" fair", "")]["executed_macs"] == pytest.approx(fair["executed_macs"], rel=0.05)
    routed = next(p for p in result["points"] if p["kind"] == "routed")
    paths = sorted((p for p in result["points"] if p["kind"] == "routed_path"), key=lambda p: p["flops_saved"]["mean"])
    # a calibrated routed point lies between its deepest and its cheapest path in FLOPs
    assert paths[0]["flops_saved"]["mean"] <= routed["flops_saved"]["mean"] <= paths[-1]["flops_saved"]["mean"]
    assert all(m["seeds"] == 1 and m["margin_std"] == 0.0 and not m["beyond_2std"] for m in result["margins"])
    routed_margins = next(m for m in result["margins"] if m["kind"] == "routed")
    assert {"static", "static_fair", "cascade", "cascade_sd"} <= set(routed_margins["controls"])
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "seed0" / "routed_balanced" / "metrics.json").is_file()


def test_margins_interpolate_each_seeds_own_static_curve():
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02)):  # seed 1's static curve lies 2 points higher
        runs += [{"kind": "dense_continued", "label": "dense +ft", "seed": seed, "flops_saved": 0.0,
                  "test_acc": 0.90 + shift},
                 {"kind": "static", "label": "s40", "seed": seed, "flops_saved": 0.4, "test_acc": 0.86 + shift},
                 {"kind": "static", "label": "s80", "seed": seed, "flops_saved": 0.8, "test_acc": 0.70 + shift},
                 {"kind": "routed", "label": "r", "seed": seed, "flops_saved": 0.6, "test_acc": 0.81 + 2 * shift}]
    (m,) = pareto.margins(runs)
    # static at 60%: halfway between 0.86 and 0.70 = 0.78 (seed 0), 0.80 (seed 1); routed 0.81, 0.85
    assert m["margin_values"] == pytest.approx([0.03, 0.05])
    assert m["margin"] == pytest.approx(0.04) and m["margin_std"] == pytest.approx(0.02 ** 0.5 / 10)
    assert m["beyond_2std"]  # 0.04 > 2 x 0.0141
    assert pareto.interpolate([(0.0, 0.9), (0.4, 0.86)], 0.5) is None  # no extrapolation


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    runs = [{"kind": "static", "label": "s", "seed": s, "test_acc": a, "flops_saved": 0.5, "epochs": 5}
            for s, a in enumerate((0.80, 0.82, 0.84))]
    (entry,) = pareto.aggregate(runs)
    assert entry["test_acc"]["mean"] == pytest.approx(0.82)
    assert entry["test_acc"]["std"] == pytest.approx(0.02)  # sample standard deviation (n - 1)
    assert entry["seeds"] == [0, 1, 2]


def test_each_control_gets_a_paired_t_test_and_the_strongest_is_named():
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        runs += [{"kind": "dense_continued", "label": "dense +ft", "seed": seed, "flops_saved": 0.0,
                  "test_acc": 0.90 + shift},
                 {"kind": "static", "label": "static@0.40", "seed": seed, "flops_saved": 0.4, "test_acc": 0.86 + shift},
                 {"kind": "static", "label": "static@0.80", "seed": seed, "flops_saved": 0.8, "test_acc": 0.70 + shift},
                 {"kind": "cascade", "label": "cascade@0.40", "seed": seed, "flops_saved": 0.6, "target": 0.4,
                  "test_acc": 0.84 + shift},
                 {"kind": "routed", "label": "r", "seed": seed, "flops_saved": 0.6, "target": 0.4,
                  "test_acc": 0.81 + 2 * shift}]
    routed = next(m for m in pareto.margins(runs) if m["label"] == "r")
    static = routed["controls"]["static"]
    assert static["values"] == pytest.approx([0.03, 0.05])
    # t = mean / (std / sqrt(n)) = 0.04 / 0.01 = 4 on 1 degree of freedom: p = 1 - 2 atan(4) / pi
    assert static["p"] == pytest.approx(1 - 2 * __import__("math").atan(4) / __import__("math").pi)
    assert routed["controls"]["cascade"]["values"] == pytest.approx([-0.03, -0.01])
    assert routed["strongest"] == "cascade" and "static_fair" in routed["controls"]  # no fair point: equal-epoch one


def test_each_job_gets_its_share_of_the_cores_within_the_thread_limit(monkeypatch):
    import torch

    monkeypatch.setattr(pareto.os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert [pareto.threads_per_job(j) for j in (1, 2, 3, 16)] == [8, 4, 2, 1]
        torch.set_num_threads(1)  # OMP_NUM_THREADS=1: one thread per process, however many cores
        assert pareto.threads_per_job(1) == 1
    finally:
        torch.set_num_threads(before)


def test_a_killed_sweeps_workers_exit_with_it(tmp_path):
    """Killed alone, a sweep left its spawned workers training into the run folders a --resume rerun uses."""
    import os
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    script = (f"import os, sys, time; sys.path.insert(0, {str(Path(pareto.__file__).parent)!r}); import pareto\n"
              f"with pareto.worker_pool(1) as pool:\n"
              f"    pid = pool.submit(os.getpid).result()\n"
              f"    open({str(pid_file)!r}, 'w').write(str(pid))\n"
              f"    pool.submit(time.sleep, 600).result()\n")
    sweep = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline and sweep.poll() is None, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        try:  # a zombie, reaped by nobody here, has exited too
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(worker, 9)
    pytest.fail("the worker outlived its sweep by 30 s")

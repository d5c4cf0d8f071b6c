"""benchmarks/pad_vs_stretch.py (issue 24's A/B): each run is the example's dense phase alone with one fit policy,
and the summary pairs the arms seed by seed."""

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import pad_vs_stretch  # noqa: E402


def test_a_run_is_the_dense_phase_alone_with_one_fit():
    args = argparse.Namespace(model="resnet20", dense_epochs=10, device="cpu", out="runs/x")
    flags = pad_vs_stretch.run_args("animals-c", "stretch", 2, args)
    run = pad_vs_stretch.finetune_cifar.build_parser().parse_args(flags)
    assert (run.dataset, run.fit, run.seed, run.dense_epochs) == ("animals-c", "stretch", 2, 10)
    assert (run.baseline, run.epochs, run.init) == ("dense", 0, None)  # trained here, no fine-tuning after it
    assert run.out.endswith("animals-c/stretch/seed2")


def test_summary_pairs_the_arms_seed_by_seed():
    accs = {"pad": (0.90, 0.88, 0.89), "stretch": (0.87, 0.88, 0.86)}
    runs = {"d": {fit: {seed: {"test_acc": a, "test_samples": 100, "dataset_version": "d/1", "fit": fit}
                        for seed, a in enumerate(values)} for fit, values in accs.items()}}
    s = pad_vs_stretch.summarise(runs)["d"]
    assert s["pad"]["mean"] == pytest.approx(0.89) and s["pad"]["std"] == pytest.approx(0.01)
    assert s["pad_minus_stretch"]["values"] == pytest.approx([0.03, 0.0, 0.03])
    assert s["pad_minus_stretch"]["mean"] == pytest.approx(0.02)
    assert s["pad_minus_stretch"]["std"] == pytest.approx(0.03 / 3 ** 0.5)  # sample std of (3, 0, 3) points
    assert "| d | mean ± std | 89.00 ± 1.00 | 87.00 ± 1.00 | +2.00 ± 1.73 |" in pad_vs_stretch.table({"d": s})

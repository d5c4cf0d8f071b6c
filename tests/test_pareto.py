"""examples/pareto.py on the offline default, shrunk to one epoch per phase: points, matching, files."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import pareto  # noqa: E402


def test_pareto_sweep_on_offline_default(tmp_path):
    pareto.main(["--dataset", "digits", "--dense-epochs", "1", "--epochs", "1", "--workers", "0", "--device", "cpu",
                 "--presets", "balanced", "--static-budgets", "0.5", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "pareto.json").read_text())
    points = result["points"]
    assert [p["kind"] for p in points] == ["dense", "dense_continued", "gated", "static", "static"]
    for p in points:
        assert {"kind", "label", "test_acc", "flops_saved", "epochs"} <= set(p)
        assert 0.0 <= p["test_acc"] <= 1.0
    assert all(p["epochs"] == 1 for p in points[1:])  # equal fine-tuning budget for every kind
    gated, statics = points[2], points[3:]
    assert any(abs(s["flops_saved"] - gated["flops_saved"]) <= 0.12 for s in statics)  # within one block's cost
    assert min(s["flops_saved"] for s in statics) < max(s["flops_saved"] for s in statics)  # two budgets
    for m in result["margins"]:
        assert abs(m["gated_saved"] - m["static_saved"]) <= pareto.MATCH
        assert m["margin"] == m["gated_acc"] - m["static_acc"]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "gated_balanced" / "metrics.json").is_file()

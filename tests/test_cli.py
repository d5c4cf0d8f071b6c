"""The gateify command: convert, info and bench in-process, help, and user errors as 'error: ...' with status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import gateify
from gateify.cli import main

from conftest import mix_decisions


@pytest.fixture
def gated_file(resnet20, cifar_batch, tmp_path):
    """A gated resnet20 with mixed decisions, per-block thresholds and one block in static mode."""
    gated = gateify.convert(resnet20).eval()
    mix_decisions(gated, cifar_batch)
    names = list(gateify.gates(gated))
    gateify.set_mode(gated, "auto", threshold={name: 0.4 + 0.01 * i for i, name in enumerate(names)})
    gateify.gates(gated)[names[4]].mode = "static"
    path = tmp_path / "gated.safetensors"
    gateify.save(gated, path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(command in out for command in ("convert", "info", "bench"))
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "--arch" in out and "torchvision:" in out and "examples:" in out
    code, out, _ = run(capsys, "info", "--help")
    assert code == 0 and "random" in out and "1 MAC = 2 FLOPs" in " ".join(out.split())


def test_convert_a_timm_name(tmp_path, capsys):
    out_file = tmp_path / "r20.safetensors"
    code, out, err = run(capsys, "convert", "resnet20", "--out", out_file)
    assert (code, err) == (0, "")
    assert "gated 9 residual blocks" in out and str(out_file) in out
    loaded = gateify.load(out_file)
    assert len(gateify.gates(loaded)) == 9 and gateify.models.architecture_of(loaded)["name"] == "resnet20"


def test_convert_options_reach_the_model(tmp_path, capsys):
    out_file = tmp_path / "r20.safetensors"
    code, _, _ = run(capsys, "convert", "resnet20", "--out", out_file, "--gate", "cir", "--num-classes", 100,
                     "--in-chans", 1)
    assert code == 0
    loaded = gateify.load(out_file)
    assert loaded.fc.out_features == 100 and loaded.conv1.in_channels == 1
    assert {g.config.gate for g in gateify.gates(loaded).values()} == {"cir"}


@pytest.mark.parametrize("form", ["file-with-arch", "name-with-weights"])
def test_convert_dense_weights_keeps_the_source_computation(resnet20, cifar_batch, tmp_path, capsys, form):
    dense = tmp_path / "dense.safetensors"
    save_file(resnet20.state_dict(), dense)
    out_file = tmp_path / "gated.safetensors"
    if form == "file-with-arch":
        argv = ["convert", dense, "--arch", "resnet20", "--out", out_file]
    else:
        argv = ["convert", "resnet20", "--weights", dense, "--out", out_file]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "dense weights" in out
    loaded = gateify.set_mode(gateify.load(out_file).eval(), "dense")
    with torch.no_grad():
        assert torch.equal(loaded(cifar_batch), resnet20(cifar_batch))


def test_info_reports_gates_and_flops(gated_file, capsys):
    code, out, _ = run(capsys, "info", gated_file)
    assert code == 0
    model = gateify.load(gated_file).eval()
    for name, gate in gateify.gates(model).items():  # every block with its mode and threshold
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert gate.mode in line and f"{float(gate.threshold):.4g}" in line
    assert '"name": "resnet20"' in out and '"gate": "controller"' in out
    # the numbers are gateify.flops on the random batch the command describes
    report = gateify.flops(model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert "40.551 MMACs =       81.102 MFLOPs" in out
    assert f"{report.executed_macs / 1e6:.3f} MMACs" in out and report.executed_fraction < 0.9
    assert "depend on the data" in out and "random" in out


def test_info_at_another_input_size(gated_file, capsys):
    code, out, _ = run(capsys, "info", gated_file, "--input-size", 64, "--samples", 2)
    assert code == 0 and "3x64x64" in out
    assert "162.202 MMACs" in out  # 4x the pixels: 4x the convolution MACs (40.55M at 32x32), the classifier alike


def test_bench_times_dense_and_gated(gated_file, capsys):
    code, out, err = run(capsys, "bench", gated_file, "--batch-size", 4, "--repeats", 2, "--warmup", 0,
                         "--threads", 1)
    assert (code, err) == (0, "")
    assert "dense model" in out and "gated, hard mode" in out and "ms" in out
    assert "executed FLOPs" in out and "random" in out


@pytest.mark.parametrize("argv,message", [
    (["convert", "no_such_net", "--out", "{tmp}/x.safetensors"], "unknown model 'no_such_net'"),
    (["info", "{tmp}/missing.safetensors"], "no file at"),
    (["bench", "{tmp}/missing.safetensors"], "no file at"),
    (["convert", "{tmp}/dense.safetensors", "--out", "{tmp}/x.safetensors"], "--arch NAME"),
    (["convert", "resnet20", "--arch", "resnet20", "--out", "{tmp}/x.safetensors"], "--weights FILE"),
    (["convert", "resnet20", "--out", "{tmp}/no/such/folder/x.safetensors"], "does not exist"),
    (["convert", "{tmp}/dense.safetensors", "--arch", "resnet20", "--num-classes", "100", "--out",
      "{tmp}/x.safetensors"], "--num-classes N"),
    (["info", "{tmp}/dense.safetensors"], "gateify convert"),
    (["bench", "{tmp}/plain.safetensors"], "plain model"),
    (["info", "{tmp}/weights.pt"], "pickle-based"),
])
def test_user_errors_exit_2_without_traceback(resnet20, tmp_path, capsys, argv, message):
    save_file(resnet20.state_dict(), tmp_path / "dense.safetensors")
    gateify.save(resnet20, tmp_path / "plain.safetensors")
    torch.save(resnet20.state_dict(), tmp_path / "weights.pt")
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "bench", "x.safetensors", "--repeats", 0)
    assert code == 2 and "positive" in err


def test_python_dash_m_gateify():
    result = subprocess.run([sys.executable, "-m", "gateify", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "convert" in result.stdout and "bench" in result.stdout
    result = subprocess.run([sys.executable, "-m", "gateify", "info", "/nonexistent.safetensors"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no file at")

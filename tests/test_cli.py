"""The gateify command: convert, info and bench in-process, help, and user errors as 'error: ...' with status 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import gateify
from gateify.cli import main

from conftest import mix_decisions, perturb_batchnorm


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
    for name, gate in gateify.gates(model).items():  # every block with its mode and the threshold in force
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        rule = "static keep" if gate.mode == "static" else f"{float(gate.threshold):.4g}"
        assert line.split()[1] == gate.mode and rule in line
    assert "per gate, 0.4 to 0.48, in force" in out  # the static gate's 0.44 decides nothing
    assert '"name": "resnet20"' in out and '"gate": "controller"' in out
    # the numbers are gateify.flops on the random batch the command describes
    report = gateify.flops(model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert "40.551 MMACs =       81.102 MFLOPs" in out
    assert f"{report.executed_macs / 1e6:.3f} MMACs" in out and report.executed_fraction < 0.9
    assert "depend on the data" in out and "random" in out


def test_info_shows_the_threshold_in_force_not_the_conversion_default(resnet20, cifar_batch, tmp_path, capsys):
    gated = mix_decisions(gateify.convert(resnet20, threshold=0.5), cifar_batch)
    gateify.set_mode(gated, "auto", threshold=0.586)  # as calibrate leaves it
    gateify.save(gated, tmp_path / "calibrated.safetensors")
    code, out, _ = run(capsys, "info", tmp_path / "calibrated.safetensors")
    assert code == 0
    header, table = out.split("\n\n")[:2]
    assert "threshold     0.586 in force on every deciding gate" in header
    assert "0.5," not in header and "0.5}" not in header and '"threshold"' not in header  # not the conversion's
    rows = table.splitlines()[1:]
    assert len(rows) == 9 and all(row.split()[2] == "0.586" for row in rows)


def test_info_at_another_input_size(gated_file, capsys):
    code, out, _ = run(capsys, "info", gated_file, "--input-size", 64, "--samples", 2)
    assert code == 0 and "3x64x64" in out
    assert "162.202 MMACs" in out  # 4x the pixels: 4x the convolution MACs (40.55M at 32x32), the classifier alike


def test_convert_a_dense_file_written_by_gateify_save_uses_its_architecture(cifar_batch, tmp_path, capsys):
    torch.manual_seed(0)
    plain = perturb_batchnorm(gateify.create_model("resnet20", num_classes=7, in_chans=1)).eval()
    gateify.save(plain, tmp_path / "dense.safetensors")  # records resnet20, num_classes=7, in_chans=1
    code, out, err = run(capsys, "convert", tmp_path / "dense.safetensors", "--out", tmp_path / "gated.safetensors")
    assert (code, err) == (0, "")  # no --arch, --num-classes or --in-chans needed
    assert out.startswith("resnet20: gated 9 residual blocks") and "dense.safetensors" in out
    loaded = gateify.set_mode(gateify.load(tmp_path / "gated.safetensors").eval(), "dense")
    assert gateify.models.architecture_of(loaded) == gateify.models.architecture_of(plain)
    x = cifar_batch[:, :1]
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))  # the file's weights, not random ones
    # options that agree with the file are accepted; ones that contradict it are refused, naming the value
    code, _, _ = run(capsys, "convert", tmp_path / "dense.safetensors", "--arch", "resnet20", "--num-classes", 7,
                     "--out", tmp_path / "again.safetensors")
    assert code == 0
    code, out, err = run(capsys, "convert", tmp_path / "dense.safetensors", "--num-classes", 10,
                         "--out", tmp_path / "x.safetensors")
    assert code == 2 and "--num-classes 10 (the file records 7)" in err
    code, out, err = run(capsys, "convert", tmp_path / "dense.safetensors", "--arch", "resnet32",
                         "--out", tmp_path / "x.safetensors")
    assert code == 2 and "records architecture 'resnet20'" in err


def test_convert_an_already_gated_file_says_so(gated_file, tmp_path, capsys):
    code, out, err = run(capsys, "convert", gated_file, "--out", tmp_path / "twice.safetensors")
    assert code == 2 and out == ""
    assert "already converted" in err and "9 gated blocks" in err and "gateify info" in err
    assert "lacks" not in err and not (tmp_path / "twice.safetensors").exists()


def test_bench_times_dense_and_gated(gated_file, capsys):
    code, out, err = run(capsys, "bench", gated_file, "--batch-size", 4, "--repeats", 2, "--warmup", 0,
                         "--threads", 1)
    assert (code, err) == (0, "")
    assert "dense model" in out and "gated, hard mode" in out and "ms" in out
    assert "executed FLOPs" in out and "random" in out


@pytest.fixture
def routed_file(resnet20, cifar_batch, tmp_path):
    """resnet20 routed between two paths, the threshold sending some of a random batch deeper."""
    cheap = {f"layer{i}.{j}": j == 0 for i in (1, 2, 3) for j in range(3)}
    deep = {f"layer{i}.{j}": j < 2 for i in (1, 2, 3) for j in range(3)}
    routed = gateify.route(gateify.convert(resnet20), [cheap, deep]).eval()
    with torch.no_grad():
        routed.network.fc.weight.mul_(30)  # confident on some random images, unsure of others
    gateify.calibrate(routed, cifar_batch, 0.5, max_error=1.0)
    path = tmp_path / "routed.safetensors"
    gateify.save(routed, path)
    return path, routed


def test_info_and_bench_describe_a_routed_file_in_routing_words(routed_file, capsys):
    """Issue 19: info described a routed threshold in hard-gate words; bench timed a dense model as 'gated'."""
    path, routed = routed_file
    code, out, err = run(capsys, "info", path, "--samples", 8)
    assert (code, err) == (0, "")
    assert "2 nested static paths" in out and "1 - max softmax >= threshold" in out and "keep probability" not in out
    assert f"{float(routed.threshold[0]):.4g}" in out
    assert "layer1.1, layer1.2, layer2.1, layer2.2, layer3.1, layer3.2" in out  # path 0's removed blocks
    code, out, err = run(capsys, "bench", path, "--batch-size", 4, "--repeats", 2, "--warmup", 0, "--threads", 1)
    assert (code, err) == (0, "")
    assert "routed" in out and "path 0 alone" in out and "gated, hard mode" not in out
    executed = float(out.split("executed FLOPs ")[1].split("%")[0])
    x = gateify.cli._random_batch(routed, 4, None, torch.device("cpu"))
    assert executed == pytest.approx(100 * gateify.flops(routed, x).executed_fraction, abs=0.05)
    assert executed < 100  # the routed model as saved, not a dense model


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


def test_help_imports_neither_torch_nor_timm():
    """`gateify --help` answers without seconds of imports; timm still gets the CIFAR ResNets when it is imported."""
    probe = textwrap.dedent("""
        import sys
        from gateify.cli import main
        heavy = lambda: sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision", "numpy"))
        assert main(["--help"]) == 0 and main(["--version"]) == 0 and main(["convert", "--help"]) == 0
        assert heavy() == [], heavy()
        import timm
        assert timm.is_model("resnet20") and timm.is_model("resnet110")
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout


def test_gate_choices_are_the_gate_kinds():
    from gateify.cli import GATE_KINDS
    from gateify.gate import GATE_KINDS as KINDS

    assert GATE_KINDS == tuple(KINDS)


def test_python_dash_m_gateify():
    result = subprocess.run([sys.executable, "-m", "gateify", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "convert" in result.stdout and "bench" in result.stdout
    result = subprocess.run([sys.executable, "-m", "gateify", "info", "/nonexistent.safetensors"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no file at")


def test_info_piped_into_head_prints_no_broken_pipe_error(gated_file):
    """`gateify info FILE | head -n 1`: the reader stops early, which is no error of the user's. Unbuffered, so
    that the lines after the first are written after head has exited, as they are on a terminal."""
    command = f"'{sys.executable}' -u -m gateify info '{gated_file}' | head -n 1"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("file ") and result.stdout.count("\n") == 1
    assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr == ""

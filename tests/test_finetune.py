"""The fine-tuning job end to end on the offline default, resume after a kill, NaN guard, DDP on two CPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gateify
from gateify.data import load_dataset
from gateify.training import Checkpoint, TrainConfig, TrainingError, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune_cifar  # noqa: E402

TINY = ["--dataset", "digits", "--dense-epochs", "1", "--epochs", "1", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + ["--out", str(out)]))
    return out, metrics


def test_outputs_and_metrics(run):
    out, metrics = run
    for name in ("metrics.json", "log.csv", "gated.safetensors", "dense.safetensors", "accuracy_flops.png",
                 "keep_rate.png", "keep_rate_per_class.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["kind"] == "gated" and metrics["preset"] == "balanced" and metrics["epochs"] == 1
    for key in ("test_acc", "test_acc_dense", "source_test_acc", "static_twin_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert round(metrics["dense_macs"] / 1e6, 2) == 40.26  # ResNet-20 with a 1-channel stem, per 32x32 image
    assert metrics["executed_macs"] == pytest.approx(
        metrics["dense_macs"] * (1 - metrics["flops_saved"]), rel=1e-6)
    assert len(metrics["keep_rate_per_block"]) == 9 and len(metrics["minority_share_per_block"]) == 9
    assert all(0 <= v <= 0.5 for v in metrics["minority_share_per_block"].values())
    assert all(len(v) == 10 for v in metrics["keep_rate_per_class"].values())
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("phase,") and [r.split(",")[0] for r in rows[1:]] == ["dense", "gated"]


def test_saved_model_reproduces_the_reported_accuracy(run):
    out, metrics = run
    model = gateify.load(out / "gated.safetensors").eval()  # architecture rebuilt from the file's metadata
    test = DataLoader(load_dataset("digits").test, batch_size=256)
    result = evaluate(model, test, torch.device("cpu"))
    assert result.accuracy == metrics["test_acc"]
    assert result.keep_rate() == pytest.approx(metrics["keep_rate_per_block"])


def test_resume_picks_up_finished_phases(run, tmp_path):
    out, metrics = run
    again = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + ["--out", str(out), "--resume"]))
    assert again["test_acc"] == metrics["test_acc"] and again["flops_saved"] == metrics["flops_saved"]


def test_missing_cifar_exits_with_instructions(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        finetune_cifar.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "--download" in capsys.readouterr().err


def tiny_loader(n=64, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    if nan:
        x[3] = float("nan")
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=16, shuffle=True)


def gated_model():
    torch.manual_seed(0)
    return gateify.convert(gateify.create_model("resnet20"))


def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05)
    reference = gated_model()
    report = gateify.flops(reference.eval(), torch.randn(2, 3, 32, 32))
    fit(reference, tiny_loader(), cfg, torch.device("cpu"), regularizer=gateify.GateRegularizer(reference, report))

    class Killed(Exception):
        pass

    def kill_in_epoch_3(epoch, stats):
        if epoch == 2:
            raise Killed
        return {}

    ckpt = Checkpoint(str(tmp_path / "ckpt.safetensors"))
    model = gated_model()
    with pytest.raises(Killed):
        fit(model, tiny_loader(), cfg, torch.device("cpu"), regularizer=gateify.GateRegularizer(model, report),
            checkpoint=ckpt, on_epoch_end=kill_in_epoch_3)
    assert Checkpoint(ckpt.path).load(gated_model())[0] == 2  # two epochs survived the kill
    resumed = gated_model()
    history = fit(resumed, tiny_loader(), cfg, torch.device("cpu"), checkpoint=ckpt, resume=True,
                  regularizer=gateify.GateRegularizer(resumed, report))
    assert [h["epoch"] for h in history] == [3]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    ckpt = Checkpoint(str(tmp_path / "ckpt.safetensors"))
    model = gated_model()
    cfg = TrainConfig(epochs=1, lr=0.05)
    fit(model, tiny_loader(), cfg, torch.device("cpu"), checkpoint=ckpt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="last good checkpoint is kept"):
        fit(model, tiny_loader(nan=True), TrainConfig(epochs=2, lr=0.05), torch.device("cpu"), checkpoint=ckpt,
            resume=True)
    restored = gated_model()
    assert ckpt.load(restored)[0] == 1
    assert all(torch.equal(good[k], v) for k, v in restored.state_dict().items())


def test_checkpoint_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    model = gated_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Checkpoint(str(path)).save(model, optimizer, 1, {})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(gateify.io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        Checkpoint(str(path)).save(model, optimizer, 2, {})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_corrupt_checkpoint_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(gateify.GateifyError, match="not a readable safetensors"):
        Checkpoint(str(path)).load(gated_model())


def test_checkpoint_of_another_model_refused_and_nothing_copied(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    small = gated_model()
    Checkpoint(path).save(small, torch.optim.SGD(small.parameters(), lr=0.1), 1, {})
    torch.manual_seed(1)
    other = gateify.convert(gateify.create_model("resnet32"))  # shares resnet20's first keys and shapes
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(gateify.GateifyError, match="does not fit this model.*--model/--dataset"):
        Checkpoint(path).load(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_ddp_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "finetune_cifar.py"), *TINY, "--no-plots", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state_sum"] == ranks[1]["state_sum"]
    assert ranks[0]["test_acc"] == ranks[1]["test_acc"]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2

"""The fine-tuning job end to end on the offline default, resume after a kill, NaN guard, DDP on two CPUs; what
fit and evaluate promise (frozen BatchNorm stays frozen, hard gates in evaluation)."""

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

from conftest import Wrapped, mix_decisions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune_cifar  # noqa: E402

# ResNet-20's residual branches at 32x32: two 3x3 convolutions, C*C*9 MACs per output pixel each (layer1.0:
# 2 * 16*16*9 * 32*32 = 4,718,592); the first block of stages 2 and 3 halves the resolution, its first convolution
# going from C/2 to C channels
_STAGE = {1: (16, 32 * 32), 2: (32, 16 * 16), 3: (64, 8 * 8)}
RESNET20_BRANCH_MACS = {
    f"layer{s}.{b}": ((c // 2 if b == 0 and s > 1 else c) * c * 9 + c * c * 9) * pixels
    for s, (c, pixels) in _STAGE.items() for b in range(3)}
# stem 1 -> 16 channels at 32x32, the nine branches, the 64 -> 10 classifier
RESNET20_DIGITS_MACS = 1 * 16 * 9 * 32 * 32 + sum(RESNET20_BRANCH_MACS.values()) + 64 * 10
# each controller: pooled C -> 32 -> 1, C being the block's input channels
RESNET20_GATE_MACS = sum(c * 32 + 32 for c in [16] * 4 + [32] * 3 + [64] * 2)

TINY = ["--dataset", "digits", "--dense-epochs", "1", "--epochs", "1", "--workers", "0", "--device", "cpu"]
GATED = ["--method", "gated"]  # the default is static (test_static_method_is_the_static_baseline_at_the_presets_target)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + GATED + ["--out", str(out)]))
    return out, metrics


def test_outputs_and_metrics(run):
    out, metrics = run
    for name in ("metrics.json", "log.csv", "gated.safetensors", "dense.safetensors", "accuracy_flops.png",
                 "keep_rate.png", "keep_rate_per_class.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["kind"] == "gated" and metrics["preset"] == "balanced" and metrics["epochs"] == 1
    # the default gated recipe: a static floor under the gates (pinned shut, kept by nobody), downsampling blocks
    # pinned open (kept by everyone), no keep floor on the gates that learn
    assert metrics["regularizer"]["min_keep"] == 0.0 and metrics["pinned_gates"] == ["layer2.0", "layer3.0"]
    assert metrics["pinned_closed"] == [n for n, kept in metrics["static_floor_blocks"].items() if not kept]
    assert all(metrics["keep_rate_per_block"][n] == 0.0 for n in metrics["pinned_closed"])
    assert all(metrics["keep_rate_per_block"][n] == 1.0 for n in metrics["pinned_gates"])
    # which data, exactly: the dataset's version and how its 28x28 images reached the 32x32 input
    assert (metrics["dataset_version"], metrics["fit"], metrics["input_size"]) == ("digits/2", "pad", 32)
    # ResNet-20 on 1-channel 32x32 images, counted by hand (option-A shortcuts have no convolution)
    assert metrics["block_macs"] == RESNET20_BRANCH_MACS
    assert metrics["dense_macs"] == RESNET20_DIGITS_MACS
    assert metrics["gate_macs"] == RESNET20_GATE_MACS
    # realised FLOPs: the dense model, less each branch's MACs for the test images that skipped it, plus the gates
    keep = metrics["keep_rate_per_block"]
    executed = (RESNET20_DIGITS_MACS + RESNET20_GATE_MACS
                - sum(macs * (1 - keep[name]) for name, macs in RESNET20_BRANCH_MACS.items()))
    assert metrics["executed_macs"] == pytest.approx(executed, rel=1e-6)
    assert metrics["flops_saved"] == pytest.approx(1 - executed / RESNET20_DIGITS_MACS, rel=1e-5)
    assert len(metrics["minority_share_per_block"]) == 9
    assert all(0 <= v <= 0.5 for v in metrics["minority_share_per_block"].values())
    assert all(len(v) == 10 for v in metrics["keep_rate_per_class"].values())
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("phase,") and [r.split(",")[0] for r in rows[1:]] == ["dense", "gated"]


def accuracy(model, loader, kept=None) -> float:
    """Plain top-1 accuracy in eval(), gates in whatever inference mode they are in, no gateify helper; ``kept``
    (a dict) receives each gate's fraction of samples kept."""
    model.eval()
    correct, counts = 0, {}
    with torch.no_grad(), gateify.record_decisions(model):
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            for name, gate in gateify.gates(model).items():
                counts[name] = counts.get(name, 0) + int(gate.last.gate.sum())
    n = len(loader.dataset)
    if kept is not None:
        kept.update({name: c / n for name, c in counts.items()})
    return correct / n


def test_saved_models_reproduce_the_reported_accuracies(run):
    out, metrics = run
    test = DataLoader(load_dataset("digits").test, batch_size=256)
    model = gateify.load(out / "gated.safetensors")  # architecture rebuilt from the file's metadata
    kept = {}
    assert accuracy(model, test, kept) == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert kept == pytest.approx(metrics["keep_rate_per_block"], abs=1e-6)  # what the FLOPs above rest on
    with gateify.gate_mode(model, "dense"):
        assert accuracy(model, test) == pytest.approx(metrics["test_acc_dense"], abs=1e-6)
    gateify.set_static(model, metrics["static_twin_blocks"])
    assert accuracy(model, test) == pytest.approx(metrics["static_twin_acc"], abs=1e-6)
    source = gateify.load(out / "dense.safetensors")
    assert accuracy(source, test) == pytest.approx(metrics["source_test_acc"], abs=1e-6)


def test_resume_picks_up_finished_phases(run, tmp_path):
    out, metrics = run
    again = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + GATED + ["--out", str(out), "--resume"]))
    assert again["test_acc"] == metrics["test_acc"] and again["flops_saved"] == metrics["flops_saved"]


def test_a_run_killed_before_its_last_output_leaves_no_metrics_json(run, tmp_path, monkeypatch):
    """metrics.json is what a sweep's --resume takes as "this run finished": it is written last (after the weights)
    and whole, so a run that died on the way has none and trains again."""
    out, _ = run

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finetune_cifar.gateify, "save", disk_full)
    args = finetune_cifar.build_parser().parse_args(TINY + ["--init", str(out / "dense.safetensors"), "--no-plots",
                                                            "--out", str(tmp_path)])
    with pytest.raises(OSError, match="No space left"):
        finetune_cifar.run(args)
    assert (tmp_path / "log.csv").is_file() and not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.glob("metrics.json.tmp*"))
    monkeypatch.undo()
    metrics = finetune_cifar.run(args)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_static_method_is_the_static_baseline_at_the_presets_target(run, tmp_path):
    """The default method, static depth pruning, trains exactly what --baseline static does for a routed run: the
    same blocks for the routing preset's target, the same weights, the same accuracy."""
    out, _ = run
    init = ["--init", str(out / "dense.safetensors")]
    results = []
    for flags, name in (([], "method"), (["--method", "routed", "--baseline", "static"], "baseline")):
        args = finetune_cifar.build_parser().parse_args(TINY + init + flags + ["--out", str(tmp_path / name)])
        results.append(finetune_cifar.run(args))
    method, baseline = results
    assert method["kind"] == baseline["kind"] == "static" and (method["method"], baseline["method"]) == ("static", None)
    assert method["target"] == gateify.ROUTE_PRESETS["balanced"].target
    assert method["static_blocks"] == baseline["static_blocks"] and method["test_acc"] == baseline["test_acc"]
    assert method["executed_macs"] == baseline["executed_macs"]
    assert method["executed_macs"] / method["dense_macs"] == pytest.approx(method["target"], abs=0.1)
    saved = gateify.load(tmp_path / "method" / "static.safetensors")
    test = DataLoader(load_dataset("digits").test, batch_size=256)
    assert accuracy(saved, test) == pytest.approx(method["test_acc"], abs=1e-6)


def test_routed_run_reports_what_its_saved_model_does(tmp_path):
    out = tmp_path / "routed"
    metrics = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + ["--method", "routed", "--out",
                                                                                   str(out)]))
    assert metrics["kind"] == "routed" and metrics["preset"] == "balanced"
    test = DataLoader(load_dataset("digits").test, batch_size=256)
    model = gateify.load(out / "routed.safetensors")
    assert gateify.is_routed(model)
    paths = gateify.routing_paths(model)
    assert [dict(p) for p in paths] == metrics["route"]["paths_blocks"]
    # the saved model runs at the main target's threshold: same accuracy, same realised MACs
    assert accuracy(model, test) == pytest.approx(metrics["test_acc"], abs=1e-6)
    counted = gateify.flops(model, [x for x, _ in test])
    assert counted.executed_macs == pytest.approx(metrics["executed_macs"], rel=1e-9)
    # each path alone is a point too: the cheapest path for all costs its static FLOPs (no routing overhead
    # beyond the confidence test), the deepest path for all costs more
    by_label = {p["label"]: p for p in metrics["routed_points"]}
    cheap, deep = by_label["path 0"], by_label[f"path {len(paths) - 1}"]
    assert cheap["level_shares"][0] == 1.0 and deep["level_shares"][-1] == 1.0
    assert cheap["flops_saved"] > metrics["flops_saved"] > deep["flops_saved"] > 0
    assert 1 - cheap["flops_saved"] == pytest.approx(metrics["route"]["paths_flops"][0], abs=0.01)


def test_a_vit_built_with_model_kwargs_prunes_and_its_file_rebuilds_it(tmp_path):
    """Issue 22: `--model-kwargs` (timm train.py's form) builds a ViT for the dataset's 16x16 images; static pruning
    drops whole residuals (attention or MLP) and the saved file alone rebuilds that ViT with its pruned blocks."""
    vit = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=32",
           "depth=2", "num_heads=2", "--input-size", "16", "--opt", "adamw", "--dense-lr", "1e-3", "--lr", "1e-3"]
    out = tmp_path / "vit"
    metrics = finetune_cifar.run(finetune_cifar.build_parser().parse_args(TINY + vit + ["--out", str(out)]))
    assert metrics["kind"] == "static" and metrics["model_kwargs"] == {"img_size": 16, "patch_size": 4,
                                                                       "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert metrics["optimizer"] == "adamw"
    assert 0 < metrics["flops_saved"] < 1
    model = gateify.load(out / "static.safetensors").eval()
    assert model.patch_embed.img_size == (16, 16) and len(model.blocks) == 2
    test = DataLoader(load_dataset("digits", input_size=16).test, batch_size=256)
    assert accuracy(model, test) == pytest.approx(metrics["test_acc"], abs=1e-6)


def test_cascade_run_trains_two_models_the_cheap_one_taught_by_the_deep_one(tmp_path):
    out = tmp_path / "cascade"
    metrics = finetune_cifar.run(finetune_cifar.build_parser().parse_args(
        TINY + ["--method", "cascade", "--out", str(out)]))
    assert metrics["kind"] == "cascade" and len(metrics["member_seconds"]) == 2
    model = gateify.load(out / "cascade.safetensors")
    assert gateify.is_routed(model) and model.is_cascade
    assert [dict(p) for p in gateify.routing_paths(model)] == metrics["route"]["paths_blocks"]
    test = DataLoader(load_dataset("digits").test, batch_size=256)
    assert accuracy(model, test) == pytest.approx(metrics["test_acc"], abs=1e-6)
    # two weight sets: the cheap model is not the deep model with blocks removed
    cheap, deep = model.networks
    assert not torch.equal(cheap.conv1.weight, deep.conv1.weight)
    by_label = {p["label"]: p for p in metrics["routed_points"]}
    assert by_label["path 0"]["flops_saved"] > metrics["flops_saved"] > by_label["path 1"]["flops_saved"]


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path, optimizer):
    cfg = TrainConfig(epochs=3, lr=0.05 if optimizer == "sgd" else 1e-3, optimizer=optimizer)
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


def test_fit_leaves_a_frozen_batchnorm_frozen():
    model = gated_model().train()
    frozen, live = model.layer1[0].bn1.eval(), model.layer1[0].bn2  # frozen on purpose, as fine-tuning recipes do
    before = {name: t.clone() for name, t in frozen.named_buffers()}
    live_before = live.running_mean.clone()
    fit(model, tiny_loader(), TrainConfig(epochs=1, lr=0.05), torch.device("cpu"))
    assert not frozen.training and model.training
    assert all(torch.equal(t, before[name]) for name, t in frozen.named_buffers())
    assert not torch.equal(live.running_mean, live_before)  # the epoch did update the others


def known_answer_loader(model, n=48, right=30):
    """Images labelled with ``model``'s own prediction for the first ``right`` and a wrong class for the others:
    the accuracy of ``model`` on them is ``right / n`` exactly."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[right:] = (y[right:] + 1) % 10
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_evaluate_uses_hard_gates_whatever_mode_training_left(resnet20):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gated = gateify.set_mode(mix_decisions(gateify.convert(resnet20), x), "hard")
    loader = known_answer_loader(gated)
    hard = evaluate(gated, loader, torch.device("cpu"))
    assert hard.accuracy == 30 / 48 and hard.decisions.dtype == torch.bool
    assert 0 < hard.decisions.float().mean() < 1  # mixed decisions: noise would show
    gateify.set_mode(gated, "gumbel")  # noise 1: what a training loop leaves behind
    gated.train()
    results = [evaluate(gated, loader, torch.device("cpu")) for _ in range(2)]
    for result in results:
        assert result.accuracy == 30 / 48
        assert result.decisions.dtype == torch.bool and torch.equal(result.decisions, hard.decisions)
        assert torch.equal(result.predictions, hard.predictions)
    assert {g.mode for g in gateify.gates(gated).values()} == {"gumbel"} and gated.training  # as it was


def test_evaluate_runs_the_whole_model_when_a_submodule_is_named_module():
    torch.manual_seed(0)
    model = Wrapped()
    result = evaluate(model, known_answer_loader(model, right=48), torch.device("cpu"))
    assert result.accuracy == 1.0


def test_an_unknown_optimizer_is_named_with_the_choices():
    with pytest.raises(TrainingError, match=r"optimizer='adam': choose one of \['sgd', 'adamw'\]"):
        TrainConfig(epochs=1, optimizer="adam")

"""safetensors I/O: bit-exact round trips of gated models, dense source weights, refusals that leave models alone."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import gateify
from gateify.io import FORMAT_VERSION, read_safetensors

from conftest import Wrapped, mix_decisions, perturb_batchnorm

# (model name, input size): ImageNet-size models at 64x64 to stay fast
CASES = [("resnet20", 32), ("resnet18", 64), ("torchvision:resnet18", 64)]


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and gate mode of ``model``, copied, to prove later that nothing changed."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: g.mode for name, g in gateify.gates(model).items()})


def assert_same_state(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    tensors, modes = before
    now = model.state_dict()
    assert list(now) == list(tensors)
    assert all(torch.equal(now[k], tensors[k]) for k in tensors)
    assert {name: g.mode for name, g in gateify.gates(model).items()} == modes


def decisions(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: g.last.gate.clone() for name, g in gateify.gates(model).items()}


def inputs(size: int, batch: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _ in CASES])
def saved(request, tmp_path_factory):
    """A converted model with mixed decisions, tuned thresholds and one gate in another mode, saved to a file."""
    name, size = request.param
    torch.manual_seed(0)
    x = inputs(size)
    gated = gateify.convert(perturb_batchnorm(gateify.create_model(name)), example_input=x[:2]).eval()
    mix_decisions(gated, x)
    found = gateify.gates(gated)
    if name == "resnet20":
        gateify.calibrate(gated, x, target=0.6, tolerance=0.02)
    else:  # per-block thresholds
        gateify.set_mode(gated, "hard", threshold={b: 0.4 + 0.2 * i / len(found) for i, b in enumerate(found)})
    gateify.set_mode(gated, "hard")
    found[list(found)[-1]].mode = "dense"  # one gate in another mode: modes are stored per gate
    path = tmp_path_factory.mktemp("io") / f"{name.replace(':', '_')}.safetensors"
    gateify.save(gated, path)
    with torch.no_grad(), gateify.record_decisions(gated):
        y = gated(x)
    return dict(name=name, size=size, x=x, gated=gated, path=path, y=y, decisions=decisions(gated))


def assert_same_model(loaded: nn.Module, case: dict) -> None:
    """Same tensors, thresholds, modes, outputs and keep decisions as the model that was saved."""
    gated = case["gated"]
    assert type(loaded) is type(gated)
    assert_same_state(loaded, snapshot(gated))
    for (name, a), b in zip(gateify.gates(loaded).items(), gateify.gates(gated).values()):
        assert float(a.threshold) == float(b.threshold) and a.mode == b.mode, name
    loaded.eval()
    with torch.no_grad(), gateify.record_decisions(loaded):
        y = loaded(case["x"])
    assert torch.equal(y, case["y"])
    got = decisions(loaded)
    assert got.keys() == case["decisions"].keys()
    assert all(torch.equal(got[k], case["decisions"][k]) for k in got)


def test_round_trip_rebuilds_the_architecture_from_the_file(saved):
    kept = torch.stack([d.float() for d in saved["decisions"].values() if d.dtype == torch.bool])
    assert 0 < kept.mean() < 1 and kept.min(1).values.eq(0).any()  # mixed decisions: the test means something
    loaded = gateify.load(saved["path"])  # no model: rebuilt from the recorded name and gate configuration
    assert_same_model(loaded, saved)
    modes = [g.mode for g in gateify.gates(loaded).values()]
    assert modes[:-1] == ["hard"] * (len(modes) - 1) and modes[-1] == "dense"
    if saved["name"] == "resnet20":  # one calibrated threshold for every gate
        assert len({float(g.threshold) for g in gateify.gates(loaded).values()}) == 1
    else:
        assert len({float(g.threshold) for g in gateify.gates(loaded).values()}) == len(modes)


@pytest.mark.parametrize("saved", [CASES[0], CASES[2]], indirect=True, ids=["resnet20", "torchvision:resnet18"])
def test_load_into_a_plain_source_model_converts_a_copy(saved):
    torch.manual_seed(123)  # other random weights: everything must come from the file
    plain = gateify.create_model(saved["name"])
    before = snapshot(plain)
    loaded = gateify.load(saved["path"], model=plain)
    assert loaded is not plain and not gateify.gates(plain)
    assert_same_state(plain, before)
    assert_same_model(loaded, saved)


@pytest.mark.parametrize("saved", [CASES[0], CASES[1]], indirect=True, ids=["resnet20", "resnet18"])
def test_load_into_a_converted_model_in_place(saved):
    torch.manual_seed(123)
    converted = gateify.convert(gateify.create_model(saved["name"]), example_input=inputs(saved["size"], 2))
    assert gateify.load(saved["path"], model=converted) is converted
    assert_same_model(converted, saved)


def test_static_decisions_and_mode_survive(resnet20, cifar_batch, tmp_path):
    gated = gateify.convert(resnet20).eval()
    blocks = list(gateify.gates(gated))
    gateify.set_static(gated, {blocks[1]: False, blocks[4]: False})
    gateify.save(gated, tmp_path / "static.safetensors")
    loaded = gateify.load(tmp_path / "static.safetensors").eval()
    keep = {name: bool(g.static_keep) for name, g in gateify.gates(loaded).items()}
    assert keep == {name: name not in (blocks[1], blocks[4]) for name in blocks}
    assert {g.mode for g in gateify.gates(loaded).values()} == {"static"}
    with torch.no_grad():
        assert torch.equal(loaded(cifar_batch), gated(cifar_batch))
        assert torch.equal(gateify.to_static(loaded)(cifar_batch), gated(cifar_batch))


def test_gumbel_temperature_and_noise_survive(resnet20, tmp_path):
    gated = gateify.set_mode(gateify.convert(resnet20), "gumbel", tau=0.25, noise=0.0)
    gateify.save(gated, tmp_path / "g.safetensors")
    loaded = gateify.load(tmp_path / "g.safetensors")
    assert {(g.mode, g.tau, g.noise) for g in gateify.gates(loaded).values()} == {("gumbel", 0.25, 0.0)}


def test_a_plain_model_round_trips_too(resnet20, cifar_batch, tmp_path):
    gateify.save(resnet20, tmp_path / "plain.safetensors")
    loaded = gateify.load(tmp_path / "plain.safetensors").eval()
    assert not gateify.gates(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(cifar_batch), resnet20(cifar_batch))


# ----------------------------------------------------------------------------------------------- dense weights


@pytest.mark.parametrize("name,size", CASES)
def test_load_dense_source_weights_into_a_converted_model(name, size, tmp_path):
    torch.manual_seed(0)
    source = perturb_batchnorm(gateify.create_model(name)).eval()
    x = inputs(size, batch=4)
    torch.manual_seed(1)
    gated = gateify.convert(gateify.create_model(name), example_input=x[:2]).eval()
    gate_entries = {k: v.clone() for k, v in gated.state_dict().items() if ".gate." in k}
    save_file(source.state_dict(), tmp_path / "dense.safetensors")
    with torch.no_grad():
        expected = source(x)
        for weights in (source.state_dict(), tmp_path / "dense.safetensors"):  # timm/torchvision key names
            for k, p in gated.named_parameters():
                if ".gate." not in k:
                    p.zero_()  # so that every source tensor must be copied again
            gateify.load_dense(gated, weights)
            assert all(torch.equal(gated.state_dict()[k], v) for k, v in gate_entries.items())
            assert torch.equal(gateify.set_mode(gated, "dense")(x), expected)


@pytest.mark.parametrize("name,size", CASES)
def test_to_dense_gives_the_library_model_back(name, size):
    torch.manual_seed(0)
    x = inputs(size, batch=4)
    gated = gateify.convert(perturb_batchnorm(gateify.create_model(name)), example_input=x[:2]).eval()
    mix_decisions(gated, x)  # trained-looking controllers must not matter to the dense model
    if name.startswith("torchvision:"):
        library = getattr(torchvision.models, name.split(":")[1])(weights=None)
    else:
        library = timm.create_model(name)
    library.load_state_dict(gateify.to_dense(gated).state_dict(), strict=True)
    library.eval()
    with torch.no_grad():
        assert torch.equal(library(x), gateify.set_mode(gated, "dense")(x))


# ------------------------------------------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def r20_file(tmp_path_factory):
    torch.manual_seed(0)
    gated = gateify.convert(perturb_batchnorm(timm.create_model("resnet20"))).eval()
    path = tmp_path_factory.mktemp("refusals") / "resnet20.safetensors"
    gateify.save(gated, path)
    return path


@pytest.fixture
def victim(resnet20, cifar_batch):
    """A converted model with non-default state that a refused load must leave exactly as it is."""
    gated = gateify.convert(resnet20).eval()
    mix_decisions(gated, cifar_batch, seed=7)
    gateify.set_mode(gated, "hard", threshold=0.45)
    return gated


def refused(model: nn.Module, match: str, *load_args, dense: bool = False) -> str:
    """Assert gateify.load (or load_dense) refuses with a WeightsFileError matching ``match`` and that ``model``
    is unchanged; returns the message."""
    before = snapshot(model)
    with pytest.raises(gateify.WeightsFileError, match=match) as info:
        if dense:
            gateify.load_dense(model, *load_args)
        else:
            gateify.load(*load_args, model=model)
    assert_same_state(model, before)
    assert isinstance(info.value, gateify.GateifyError)
    return str(info.value)


def rewrite(source, path, *, drop=(), add=None, **metadata_changes):
    """A copy of a gateify file with keys dropped or added, or metadata entries replaced."""
    tensors, metadata = read_safetensors(source)
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, path, metadata={**metadata, **metadata_changes})
    return path


def test_missing_file(victim, tmp_path):
    message = refused(victim, "no file at", tmp_path / "nowhere.safetensors")
    assert "nowhere.safetensors" in message


@pytest.mark.parametrize("content", [random.Random(3).randbytes(4096), b"this is a text file, not weights\n" * 20, b""],
                         ids=["random-bytes", "text", "empty"])
def test_not_a_safetensors_file(victim, tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    refused(victim, "not a readable safetensors file", path)
    refused(victim, "not a readable safetensors file", path, dense=True)


def test_truncated_file(victim, r20_file, tmp_path):
    data = r20_file.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    message = refused(victim, "is truncated", path)
    assert f"{len(data)} bytes" in message  # what the header promised
    path.write_bytes(data[:100])  # cut inside the JSON header
    refused(victim, "truncated inside its header", path)


class _Trap:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("suffix,protocol", [(".pt", 2), (".pth", 4), (".pt", 0), (".safetensors", 5)])
def test_pickle_files_are_refused_without_unpickling(victim, tmp_path, suffix, protocol):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Trap(str(control)), protocol=protocol))
    assert control.exists()  # the trap works when something unpickles it
    marker = tmp_path / "marker"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps({"conv1.weight": _Trap(str(marker))}, protocol=protocol))
    message = refused(victim, "pickle-based PyTorch file", path)
    assert "never unpickles" in message and "weights_only=True" in message
    refused(victim, "pickle-based PyTorch file", path, dense=True)
    assert not marker.exists()


def test_torch_save_zip_file_is_refused(victim, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(victim.state_dict(), path)
    refused(victim, "pickle-based PyTorch file", path)


def test_newer_format_version(victim, r20_file, tmp_path):
    path = rewrite(r20_file, tmp_path / "future.safetensors", gateify_format=str(FORMAT_VERSION + 1))
    message = refused(victim, "newer than this gateify", path)
    assert "upgrade gateify" in message


def test_damaged_metadata(victim, r20_file, tmp_path):
    refused(victim, "damaged gateify metadata", rewrite(r20_file, tmp_path / "a.safetensors", gates="[]"))
    refused(victim, "damaged gateify metadata", rewrite(r20_file, tmp_path / "b.safetensors", gateify_format="x"))
    refused(victim, "damaged gateify metadata", rewrite(r20_file, tmp_path / "c.safetensors", architecture="{"))


def test_unbuildable_architecture_names_the_fix(r20_file, tmp_path):
    path = rewrite(r20_file, tmp_path / "a.safetensors", architecture=json.dumps({"name": "no_such_net"}))
    with pytest.raises(gateify.WeightsFileError, match="'no_such_net'.*cannot build.*model="):
        gateify.load(path)


def test_file_without_gateify_metadata_points_to_load_dense(resnet20, victim, tmp_path):
    path = tmp_path / "dense.safetensors"
    save_file(resnet20.state_dict(), path)
    with pytest.raises(gateify.WeightsFileError, match="not written by gateify.save.*gateify.load_dense"):
        gateify.load(path)
    refused(victim, "gateify.load_dense", path)


def test_gated_file_into_load_dense_of_a_plain_model_points_to_load(r20_file):
    plain = timm.create_model("resnet20")
    message = refused(plain, "unexpected", r20_file, dense=True)
    assert "gateify.load(" in message


def test_architecture_mismatch(r20_file):
    resnet32 = gateify.create_model("resnet32")
    message = refused(resnet32, "does not fit this model", r20_file)
    assert "'resnet20'" in message and "'resnet32'" in message  # both architectures named
    converted32 = gateify.convert(resnet32)
    message = refused(converted32, "the file lacks 108 keys", r20_file)  # 6 more blocks, 18 tensors each
    assert "layer1.3.conv1.weight" in message and "'resnet32'" in message


def test_shape_mismatch(r20_file):
    hundred = gateify.convert(gateify.create_model("resnet20", num_classes=100))
    message = refused(hundred, "2 shape mismatches", r20_file)
    assert "fc.weight: file (10, 64) vs model (100, 64)" in message
    assert "num_classes=10" in message and "num_classes=100" in message


def test_missing_keys(victim, r20_file, tmp_path):
    path = rewrite(r20_file, tmp_path / "missing.safetensors", drop=["layer2.1.gate.threshold_bits"])
    message = refused(victim, "the file lacks 1 keys", path)
    assert "layer2.1.gate.threshold_bits" in message


def test_unexpected_keys(victim, r20_file, tmp_path):
    path = rewrite(r20_file, tmp_path / "extra.safetensors", add={"head.extra": torch.zeros(3)})
    message = refused(victim, "the file has 1 keys the model lacks", path)
    assert "head.extra" in message
    refused(victim, "unexpected", {**victim.state_dict(), "head.extra": torch.zeros(3)}, dense=True)


def test_load_dense_shape_mismatch_copies_nothing(victim):
    dense = gateify.create_model("resnet20", num_classes=100).state_dict()
    refused(victim, "shape mismatches", dense, dense=True)


def test_plain_file_into_a_converted_model(resnet20, victim, tmp_path):
    gateify.save(resnet20, tmp_path / "plain.safetensors")
    refused(victim, "plain \\(ungated\\) model", tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------- what is saved, and what not


def test_save_keeps_every_tensor_of_a_model_with_a_submodule_named_module(cifar_batch, tmp_path):
    torch.manual_seed(0)
    model = perturb_batchnorm(Wrapped()).eval()
    gated = mix_decisions(gateify.convert(model, example_input=cifar_batch[:2]), cifar_batch).eval()
    gateify.save(gated, tmp_path / "wrapped.safetensors")
    torch.manual_seed(1)
    loaded = gateify.load(tmp_path / "wrapped.safetensors", model=Wrapped()).eval()
    expected, got = gated.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    with torch.no_grad():
        assert torch.equal(loaded(cifar_batch), gated(cifar_batch))
    # a real wrapper is looked through, by its type: the same file as from the model itself
    gateify.save(nn.DataParallel(gated), tmp_path / "data_parallel.safetensors")
    tensors = read_safetensors(tmp_path / "data_parallel.safetensors")[0]
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], v) for k, v in expected.items())
    assert gateify.unwrap(nn.DataParallel(gated)) is gated and gateify.unwrap(gated) is gated


class Squeeze(nn.Module):
    """Squeeze-excitation whose excitation layer is called ``gate``, as in many SE implementations."""

    def __init__(self, c):
        super().__init__()
        self.gate = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))


class SEBlock(nn.Module):
    def __init__(self, c, attr):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.attr = attr
        setattr(self, attr, Squeeze(c))

    def forward(self, x):
        return torch.relu(x + getattr(self, self.attr)(self.conv(x)))


class SENet(nn.Module):
    def __init__(self, attr):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = SEBlock(8, attr), SEBlock(8, attr)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("attr", ["se", "gate"], ids=["block.se.gate", "block.gate.gate"])
def test_load_dense_loads_the_source_models_own_gate_modules(attr):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    source = SENet(attr).eval()
    torch.manual_seed(1)
    gated = gateify.convert(SENet(attr), example_input=x[:2]).eval()
    assert list(gateify.gates(gated)) == ["b1", "b2"]
    gateify.load_dense(gated, source.state_dict())
    own = f"b1.{attr}.gate.weight"  # the source's excitation weights, not an inserted gate's
    assert torch.equal(gated.state_dict()[own], source.state_dict()[own])
    gateify.set_mode(gated, "dense")
    with torch.no_grad():
        assert torch.equal(gated(x), source(x))


def test_tied_weights_are_written_once_and_tied_again_on_load(tmp_path):
    """CoaT hands one position encoding to every block of a stage: its weights live under several names. The file
    holds them once (as safetensors.torch.save_model writes them) and load ties them again."""
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    coat = gateify.create_model("coat_lite_tiny", img_size=64, embed_dims=(16, 32, 48, 64), num_classes=5).eval()
    with pytest.warns(gateify.GateifyWarning, match="one gate per module"):
        gated = gateify.convert(coat, example_input=x)
    mix_decisions(gated, x)
    gateify.save(gated, tmp_path / "coat.safetensors")
    tensors, metadata = read_safetensors(str(tmp_path / "coat.safetensors"))
    tied = json.loads(metadata["tied"])
    assert tied["serial_blocks1.0.cpe.proj.weight"] == "cpe1.proj.weight" and "serial_blocks1.0.cpe.proj.weight" \
        not in tensors
    with pytest.warns(gateify.GateifyWarning, match="one gate per module"):
        loaded = gateify.load(tmp_path / "coat.safetensors").eval()
    assert loaded.serial_blocks1[0].cpe.proj.weight is loaded.cpe1.proj.weight  # one parameter again
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gated(x), rtol=0, atol=0)
    damaged = dict(metadata, tied=json.dumps({"serial_blocks1.0.cpe.proj.weight": "nowhere"}))
    save_file(tensors, str(tmp_path / "damaged.safetensors"), damaged)
    with pytest.raises(gateify.WeightsFileError, match="tied to 'nowhere'.*save the model again"):
        gateify.load(tmp_path / "damaged.safetensors")

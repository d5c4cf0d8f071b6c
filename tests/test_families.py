"""Residual networks beyond ResNet: ViT, DeiT, ConvNeXt, Swin, MobileNetV2, EfficientNet at 32x32 with tiny widths.

Per family: the converted model equals the source in dense mode, real skipping is batch-consistent, a skipped sample
never enters a branch, FLOPs count the kept samples only, and save/load rebuilds it from the file alone.
"""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import gateify
from gateify.models import input_shape
from gateify.rewrite import attention_mask, roll

from conftest import perturb_batchnorm, split_decisions

SIZE = 32
#: name -> (timm model, keywords for a tiny version at 32x32, gate names expected)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2),
            ["blocks.0", "blocks.0.gate_1", "blocks.1", "blocks.1.gate_1"]),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2),
             ["blocks.0", "blocks.0.gate_1", "blocks.1", "blocks.1.gate_1"]),
    "convnext": ("convnext_atto", dict(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64), ls_init_value=0.3),
                 ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1", "stages.2.blocks.0",
                  "stages.3.blocks.0"]),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=SIZE, patch_size=2, window_size=4, embed_dim=16,
                                                  depths=(2, 2), num_heads=(1, 2)),
             [f"layers.{s}.blocks.{b}{g}" for s in (0, 1) for b in (0, 1) for g in ("", ".gate_1")]),
    "mobilenetv2": ("mobilenetv2_035", {}, ["blocks.1.1", "blocks.2.1", "blocks.2.2", "blocks.3.1", "blocks.3.2",
                                            "blocks.3.3", "blocks.4.1", "blocks.4.2", "blocks.5.1", "blocks.5.2"]),
    "efficientnet": ("efficientnet_b0", {}, ["blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1",
                                             "blocks.4.2", "blocks.5.1", "blocks.5.2", "blocks.5.3"]),
}


def batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(family: str) -> nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return perturb_batchnorm(gateify.create_model(name, num_classes=10, **kwargs)).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request) -> tuple[str, nn.Module, nn.Module]:
    """(family, source model, converted model with every gate splitting ``batch()`` into kept and skipped)."""
    model = build(request.param)
    gated = gateify.convert(model, example_input=batch(2, seed=5)).eval()  # ViT/Swin could take their own size too
    split_decisions(gated, batch())
    return request.param, model, gated


def decisions(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and the ``(gates, B)`` decisions of that call."""
    with torch.no_grad(), gateify.record_decisions(model):
        out = model(x)
        return out, torch.stack([g.last.gate.bool() for g in gateify.gates(model).values()])


def test_converts_with_a_gate_per_residual_and_equals_the_source(pair):
    family, model, gated = pair
    assert list(gateify.gates(gated)) == FAMILIES[family][2]
    x = batch()
    with torch.no_grad(), gateify.gate_mode(gated, "dense"):
        expected = model(x)
        assert (gated(x) - expected).abs().max().item() <= 1e-5
    with torch.no_grad(), gateify.gate_mode(gated, "hard"):
        closed = gateify.set_mode(gated, "hard", threshold=1.5)(x)  # every branch skipped: something to skip
        gateify.set_mode(gated, "hard", threshold=0.5)
    assert (closed - expected).abs().max().item() > 1e-3


def test_real_skip_is_batch_consistent(pair):
    _, _, gated = pair
    x = batch()
    out, kept = decisions(gated, x)
    assert bool((kept.any(1) & ~kept.all(1)).all())  # every gate keeps some samples and skips others
    alone = [decisions(gated, x[i:i + 1]) for i in range(x.shape[0])]
    assert torch.equal(torch.cat([k for _, k in alone], 1), kept)
    assert (torch.cat([o for o, _ in alone]) - out).abs().max().item() <= 1e-4 * max(1.0, out.abs().max().item())


def test_skipped_samples_never_enter_a_branch(pair):
    """Each gate's branch runs on exactly its kept samples (the gather), or not at all."""
    _, _, gated = pair
    seen: dict[str, list[int]] = {}
    for name, gate in gateify.gates(gated).items():
        run = gate.branch.forward

        def record(*args, name=name, gate=gate, run=run):
            seen.setdefault(name, []).append(args[gate.ctrl_index].shape[0])
            return run(*args)

        gate.branch.forward = record
    try:
        _, kept = decisions(gated, batch())
    finally:
        for gate in gateify.gates(gated).values():
            del gate.branch.forward
    assert {name: sizes for name, sizes in seen.items()} == {
        name: [int(k.sum())] for name, k in zip(gateify.gates(gated), kept)}


def test_flops_count_kept_samples_only(pair):
    _, model, gated = pair
    x = batch()
    report = gateify.flops(gated, x)
    assert report.dense_flops == gateify.flops(model, x).executed_flops  # counted alike: the source's FLOPs
    assert all(b.branch_flops > 0 and 0 < b.keep_rate < 1 for b in report.blocks)
    for b in report.blocks:  # every branch here is linear in its samples: keep rate x branch, no more
        assert b.executed_flops == pytest.approx(b.keep_rate * b.branch_flops, rel=1e-6)
    closed = gateify.flops(gateify.set_mode(gated, "hard", threshold=1.5), x)
    gateify.set_mode(gated, "hard", threshold=0.5)
    assert all(b.executed_flops == 0 for b in closed.blocks)


def test_save_load_round_trip_from_the_file_alone(pair, tmp_path):
    _, _, gated = pair
    path = tmp_path / "gated.safetensors"
    gateify.save(gated, path)
    loaded = gateify.load(path).eval()  # architecture (tiny widths, img_size) rebuilt and converted from the header
    assert list(gateify.gates(loaded)) == list(gateify.gates(gated))
    theirs = loaded.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in gated.state_dict().items()) and len(theirs) == len(
        gated.state_dict())
    x = batch(seed=2)
    out, kept = decisions(gated, x)
    out_loaded, kept_loaded = decisions(loaded, x)
    assert torch.equal(kept_loaded, kept)
    torch.testing.assert_close(out_loaded, out, rtol=1e-5, atol=1e-6)  # CPU kernels round by buffer alignment


# ---------------------------------------------------------------------------------------- transformer specifics


def test_vit_gates_attention_and_mlp_residuals_and_skips_their_layers():
    """blocks.i is the attention residual, blocks.i.gate_1 the MLP residual (its shortcut is the attention
    residual's output); each runs its own layers on its kept samples only."""
    gated = gateify.convert(build("vit")).eval()
    x = batch()
    split_decisions(gated, x)
    rows: dict[str, list[int]] = {}
    handles = [gated.get_submodule(path).register_forward_pre_hook(
        lambda m, args, path=path: rows.setdefault(path, []).append(args[0].shape[0]))
        for path in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")]
    _, kept = decisions(gated, x)
    for h in handles:
        h.remove()
    names = list(gateify.gates(gated))
    attn, mlp = (int(kept[names.index(n)].sum()) for n in ("blocks.0", "blocks.0.gate_1"))
    assert rows == {"blocks.0.attn.qkv": [attn], "blocks.0.attn.proj": [attn], "blocks.0.mlp.fc1": [mlp],
                    "blocks.0.mlp.fc2": [mlp]}


def test_vit_attention_and_mlp_flops_per_sample():
    """Branch FLOPs of a ViT block from its shapes: N tokens of width D, 4D hidden, 2 FLOPs per MAC; the attention
    products (scaled_dot_product_attention, a fused kernel on a CPU) included."""
    gated = gateify.convert(build("vit")).eval()
    n, d = (SIZE // 8) ** 2 + 1, 32  # 16 patches and the class token
    report = gateify.flops(gated, batch())
    branch = {b.name: b.branch_flops for b in report.blocks}
    assert branch["blocks.0"] == 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d)  # qkv, QK^T and AV, proj
    assert branch["blocks.0.gate_1"] == 2 * (2 * n * d * 4 * d)  # fc1, fc2


@pytest.mark.parametrize("family,dim", [("vit", -1), ("swin", -1), ("convnext", 1), ("mobilenetv2", 1)])
def test_controllers_read_channels_of_tokens_and_maps(family, dim):
    """(B, N, C) tokens and (B, H, W, C) maps are pooled over tokens/positions, (B, C, H, W) over H and W: the
    controller's input width is the channel count whatever the input size."""
    gated = gateify.convert(build(family), example_input=batch(2))
    for name, gate in gateify.gates(gated).items():
        assert gate.controller.channel_dim == dim, name
    gate = next(iter(gateify.gates(gated).values()))
    x = torch.randn(3, 5, 7, gate.controller.fc1.in_features) if dim == -1 else torch.randn(
        3, gate.controller.fc1.in_features, 5, 7)
    pooled = x.mean((1, 2)) if dim == -1 else x.mean((2, 3))
    c = gate.controller
    expected = F.linear(F.relu(F.linear(pooled, c.fc1.weight, c.fc1.bias)), c.fc2.weight, c.fc2.bias).view(-1)
    torch.testing.assert_close(c(x), expected)


def test_model_built_for_its_own_input_size_converts_without_example_input():
    """timm's registry says 224x224 for vit_tiny_patch16_224; a model built with img_size=48 takes 48x48 only."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert input_shape(model) == (3, 48, 48)
    gated = gateify.convert(model.eval())
    assert list(gateify.gates(gated)) == ["blocks.0", "blocks.0.gate_1"]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), model(x))


def test_swin_window_attention_called_with_a_keyword_is_traced_with_its_mask():
    """Swin calls self.attn(x_windows, mask=attn_mask): the block is captured with its keyword arguments, and the
    shifted blocks' masks make the second block differ from the first."""
    model = build("swin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", gateify.GateifyWarning)  # nothing left ungated, nothing to warn about
        gated = gateify.convert(model)
    assert gated.layers[0].blocks[1].attn_mask is not None  # the shifted block has a mask, and it is used:
    x = batch()
    with torch.no_grad():
        expected = model(x)
        model.layers[0].blocks[1].attn_mask.zero_()
        assert not torch.allclose(model(x), expected)
        gateify.set_mode(gated, "dense")
        assert (gated(x) - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------- what the pass handles, in small


class Tokens(nn.Module):
    """Patches -> (B, N, C) tokens -> pre-norm blocks -> mean token -> head."""

    def __init__(self, block: type, depth: int = 2, dim: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*[block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


class OptionalMask(nn.Module):
    """A pre-norm MLP residual with an optional additive mask, as attention blocks take one."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        h = self.fc(self.norm(x))
        if mask is not None:
            h = h + mask
        return x + h


class MaskedNet(Tokens):
    def __init__(self):
        super().__init__(OptionalMask, depth=1)
        self.register_buffer("bias", torch.zeros(1, 1, 16))

    def forward(self, x, mask=None):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks[0](t, mask=mask).mean(1))


def test_none_argument_is_traced_as_none_and_kept_by_name():
    """``if mask is not None`` cannot be traced with a proxy: the None it was called with is traced, the graph
    asserts it stays None, and the parameter keeps its name, so keyword calls work."""
    torch.manual_seed(0)
    net = MaskedNet().eval()
    x = torch.randn(4, 3, 16, 16)
    gated = gateify.convert(net, example_input=x[:2])
    assert list(gateify.gates(gated)) == ["blocks.0"]
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), net(x))
        with pytest.raises(AssertionError, match="specialized to have value None"):
            gated(x, mask=torch.zeros(1, 16, 16))


class SizedBlock(nn.Module):
    """Reads B, H, W from its input before the residual (to check them), and reshapes its branch with them, as
    MaxViT's window partition does: on a gathered sub-batch, B must be the sub-batch's."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        torch._assert(h % 2 == 0, "even height")
        windows = self.conv(x).view(b, c, h // 2, 2, w // 2, 2)
        return x + windows.view(b, c, h, w)


class InPlaceGain(nn.Module):
    """NFNet's block: the branch scaled in place by a gain (``out.mul_(gain)``, whose result nothing reads)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        out = self.conv(x)
        out.mul_(self.gain)
        return out * 0.2 + x


class Stem(nn.Module):
    def __init__(self, block: type):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(block(), block())

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


@pytest.mark.parametrize("block", [SizedBlock, InPlaceGain])
def test_shapes_and_in_place_writes_go_with_the_branch(block):
    torch.manual_seed(0)
    net = Stem(block).eval()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        gated = gateify.convert(net, example_input=x[:2])
        assert list(gateify.gates(gated)) == ["blocks.0", "blocks.1"]
        assert torch.equal(gateify.set_mode(gated, "dense")(x), net(x))
        split_decisions(gated, x)
        out, kept = decisions(gated, x)
        assert bool((kept.any(1) & ~kept.all(1)).all())
        alone = torch.cat([gated(x[i:i + 1]) for i in range(8)])
        assert (alone - out).abs().max().item() <= 1e-5
    if block is InPlaceGain:  # the gain is applied to the kept samples' branch
        with torch.no_grad():
            gateify.set_mode(gated, "hard", threshold=0.0)
            assert torch.equal(gated(x), net(x))


class Mixer(nn.Module):
    """FastViT's token mixer: a residual block of its own, called by the block before the block's own residual."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        return x + self.conv(x)


class MixerBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.mixer = Mixer(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))

    def forward(self, x):
        x = self.mixer(x)
        return x + self.mlp(x)


def test_a_block_inside_a_block_but_outside_its_branch_keeps_its_own_gate():
    torch.manual_seed(0)
    net = Stem(MixerBlock).eval()
    x = torch.randn(8, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gateify.GateifyWarning)  # not nested in a branch: nothing to warn about
        gated = gateify.convert(net, example_input=x[:2])
    assert list(gateify.gates(gated)) == ["blocks.0.mixer", "blocks.0", "blocks.1.mixer", "blocks.1"]
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), net(x))
    plain = gateify.to_dense(gated)  # the child's gate goes too, though its parent was replaced as well
    assert not gateify.gates(plain)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))


class SliceResidual(nn.Module):
    """ReXNet's block: the shortcut added to the first channels of the output, the others concatenated."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim + 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, :8] + x, y[:, 8:]], dim=1)[:, :8]


def test_a_residual_whose_branch_cannot_be_skipped_is_named_and_left_dense():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(gateify.NoResidualBlocksError, match=r"'blocks.0': the layers of its branch also compute"):
        gateify.convert(Stem(SliceResidual).eval(), example_input=x)

    class Mixed(Stem):
        def __init__(self):
            super().__init__(SliceResidual)
            self.blocks[1] = InPlaceGain()

    net = Mixed().eval()
    with pytest.warns(gateify.GateifyWarning, match=r"left ungated.*'blocks.0'.*leaf_modules"):
        gated = gateify.convert(net, example_input=x)
    assert list(gateify.gates(gated)) == ["blocks.1"]
    with torch.no_grad():
        assert torch.equal(gateify.set_mode(gated, "dense")(x), net(x))


class Cache(nn.Module):
    """A buffer the first call replaces (ConViT's rel_indices): converting must leave the model as it was."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.table.shape[0] != x.shape[-1]:  # not traceable: called as a whole
            self.table = torch.arange(x.shape[-1], dtype=x.dtype)
        return x + self.table


class CachedNet(Stem):
    def __init__(self):
        super().__init__(InPlaceGain)
        self.cache = Cache()

    def forward(self, x):
        return self.blocks(self.cache(self.stem(x))).mean((2, 3))


def test_a_buffer_the_example_run_replaced_is_put_back():
    torch.manual_seed(0)
    net = CachedNet().eval()
    original = net.cache.table
    with pytest.warns(gateify.GateifyWarning, match="'cache'"):
        gated = gateify.convert(net, example_input=torch.randn(2, 3, 8, 8), inplace=True)
    assert net.cache.table is original and torch.equal(original, torch.zeros(1))
    assert list(gateify.gates(gated)) == ["blocks.0", "blocks.1"]


class LatentPool(nn.Module):
    """An attention-pool head that expands a learned query per batch (CaiT, timm's 'map' pooling)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 1, dim))
        self.attend = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.attend(self.latent.expand(x.shape[0], -1, -1), tokens, tokens, need_weights=False)[0][:, 0]


def test_flops_of_a_model_that_expands_a_parameter_per_batch():
    """Under no_grad such a view is a leaf that requires grad without a grad accumulator, which torch's FLOP
    counter's module tracker cannot hook; gateify.flops counts it all the same."""
    torch.manual_seed(0)
    net = Stem(InPlaceGain)
    net.pool = LatentPool()
    net.forward = lambda x: net.pool(net.blocks(net.stem(x)))
    x = torch.randn(2, 3, 8, 8)
    dense = gateify.flops(net, x)
    conv, n = 2 * 8 * 8 * 9 * 64, 64  # one 3x3 conv at 8x8, 64 tokens
    mha = 2 * 8 * 8 * (2 * 1 + 2 * n) + 2 * 1 * n * 2 * 8  # projections, then attention of 1 query over 64 keys
    assert dense.executed_flops == 2 * 3 * 8 * 9 * 64 + 2 * conv + mha
    assert {p.requires_grad for p in net.parameters()} == {True}


def test_torchvision_state_dict_versions_survive_save_and_load(tmp_path):
    """MNASNet's loader reads its state-dict version, which safetensors alone does not keep."""
    torch.manual_seed(0)
    model = perturb_batchnorm(gateify.create_model("torchvision:mnasnet0_5", num_classes=10)).eval()
    gated = gateify.convert(model, example_input=torch.randn(2, 3, SIZE, SIZE))
    gateify.save(gated, tmp_path / "m.safetensors")
    loaded = gateify.load(tmp_path / "m.safetensors", example_input=torch.randn(2, 3, SIZE, SIZE)).eval()
    theirs = loaded.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in gated.state_dict().items())
    x = batch(2)
    with torch.no_grad():
        expected = gated(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------- routing beyond ResNets


def assert_routes_as_its_paths(gated: nn.Module, paths: list, x: torch.Tensor) -> gateify.RoutedModel:
    """``gateify.route(gated, paths)``: every path's logits are ``to_static``'s for the same blocks (alone and as
    ``routed.path(k)``), and with the threshold at the cheap path's median unsureness some samples go deeper, each
    getting its own path's logits."""
    routed = gateify.route(gated, paths).eval()
    with torch.no_grad():
        alone = torch.stack([gateify.to_static(gated, keep=p).eval()(x) for p in paths])  # (K, B, classes)
        every = routed(x, every_path=True)
        for k in range(len(paths)):
            torch.testing.assert_close(every[k], alone[k])
            torch.testing.assert_close(routed.path(k).eval()(x), alone[k])
        routed.threshold.fill_(float((1 - alone[0].softmax(1).amax(1)).median()))
        out, levels = routed.forward_routes(x)
    assert 0 < int(levels.sum()) < len(x)
    torch.testing.assert_close(out, alone[levels, torch.arange(len(x))])
    return routed


@pytest.mark.parametrize("name, kwargs", [
    ("vit_relpos_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    ("swin_tiny_patch4_window7_224", dict(patch_size=4, window_size=4, embed_dim=16, depths=(2,), num_heads=(1,))),
])
def test_hard_gates_of_relative_position_vit_and_swin_export(name, kwargs):
    """Issue 22. Relative-position attention hands its bias to ``F.scaled_dot_product_attention`` as an
    ``attn_mask`` of batch 1, whose broadcast torch.export could not decide on a gate's data-dependent sub-batch
    (``Eq(1, u2)``); the tokens the ViT's first gate adds to are patch_embed's transposed view, whose strides the
    cond's sides must agree on; Swin's ``torch.roll`` asked whether the sub-batch is empty. All export now, hard
    gates and routed, with eager's per-sample decisions and outputs; to_static gives back the blocks' own calls."""
    torch.manual_seed(0)
    model = gateify.create_model(name, img_size=SIZE, num_classes=10, **kwargs).eval()
    gated = gateify.convert(model, example_input=batch(2, seed=5)).eval()
    x = batch()
    with torch.no_grad(), gateify.gate_mode(gated, "dense"):
        assert (gated(x) - model(x)).abs().max().item() <= 1e-5
    split_decisions(gated, x)
    with torch.no_grad(), gateify.record_decisions(gated):
        expected = gated(x)
        kept = torch.stack([g.last.gate.bool() for g in gateify.gates(gated).values()])
    assert kept.any(1).all() and not kept.all(1).any()  # every gate splits the batch
    program = torch.export.export(gated, (x,))
    conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) >= len(gateify.gates(gated))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected)
        static = gateify.to_static(gated, {name: True for name in gateify.gates(gated)})
        torch.testing.assert_close(static(x), model(x))
    assert not any(n.target in (attention_mask, roll) for m in static.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes)
    names = list(gateify.gates(gated))  # routed: the escalated samples run the second half on their sub-batch
    routed = assert_routes_as_its_paths(gated, [{n: False for n in names[len(names) // 2:]}, {names[-1]: False}], x)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(routed, (x,)).module()(x), routed(x))


def test_every_family_routes_each_sample_to_its_paths_output(pair):
    """The cheap path drops the second half of the gates (a transformer's attention and MLP residuals apart),
    the deep one the last gate only."""
    _, _, gated = pair
    names = list(gateify.gates(gated))
    half = len(names) // 2
    assert_routes_as_its_paths(gated, [{n: False for n in names[half:]}, {names[-1]: False}], batch())


def test_a_routed_vit_round_trips_its_file_and_exports(tmp_path):
    """ViT's forward takes ``attn_mask=None`` after the images: routing runs it at that default."""
    gated = gateify.convert(build("vit")).eval()
    x = batch()
    routed = assert_routes_as_its_paths(gated, [{"blocks.1": False, "blocks.1.gate_1": False},
                                                {"blocks.1.gate_1": False}], x)
    gateify.save(routed, tmp_path / "routed.safetensors")
    loaded = gateify.load(tmp_path / "routed.safetensors").eval()  # the tiny ViT rebuilt at its img_size
    with torch.no_grad():
        expected = routed(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(torch.export.export(routed, (x,)).module()(x), expected)


def test_a_routed_convnext_exports_with_its_head_pool_on_the_sub_batch():
    """The escalated samples' segment ends in ConvNeXt's head, whose adaptive average pool on a strided sub-batch of
    data-dependent size asked torch.export whether that size exceeds 1; it is the spatial mean there."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = perturb_batchnorm(timm.create_model("test_convnext", num_classes=10)).eval()  # timm's own test model
    gated = gateify.convert(model, example_input=x[:2]).eval()
    names = list(gateify.gates(gated))
    routed = assert_routes_as_its_paths(gated, [{n: False for n in names[len(names) // 2:]}, {names[-1]: False}], x)
    with torch.no_grad():
        levels = routed.forward_routes(x).levels
        assert 0 < int(levels.sum()) < len(x)  # some samples escalate, some do not
        torch.testing.assert_close(torch.export.export(routed, (x,)).module()(x), routed(x))


def test_a_routed_vits_segment_flops_count_its_attention():
    """The dense count and path 0's segment are the per-block counter's numbers: on a CPU attention runs as one
    fused kernel that torch's own counter leaves out, and routing counts it like every other count does."""
    gated = gateify.convert(build("vit")).eval()
    routed = gateify.route(gated, [{"blocks.1": False, "blocks.1.gate_1": False}, {"blocks.1.gate_1": False}])
    x = batch(2)
    dense, per_level = routed.segment_flops(x)
    assert dense == pytest.approx(gateify.flops(gated, x).dense_flops)
    assert per_level[0] == pytest.approx(gateify.flops(routed.path(0), x).executed_flops)
    tokens, dim = 1 + (SIZE // 8) ** 2, 32
    assert per_level[1] > 2 * tokens * tokens * 2 * dim  # the escalated segment runs block 1's attention products


def test_routing_a_block_inside_a_block_runs_the_inner_gates_path_by_path():
    """The two paths differ only in 'blocks.0.mixer', a gated block its parent's graph calls: the top graph calls
    the parents, so each path inlines the mixer's static form into its parent's."""
    torch.manual_seed(0)
    net = Stem(MixerBlock).eval()
    x = torch.randn(8, 3, 8, 8)
    gated = gateify.convert(net, example_input=x[:2])
    assert_routes_as_its_paths(gated, [{"blocks.0.mixer": False, "blocks.1.mixer": False},
                                       {"blocks.1.mixer": False}], x)


class Guarded(nn.Module):
    """A mixer behind data-dependent control flow: torch.fx cannot trace it, so its parent calls it as a whole."""

    def __init__(self):
        super().__init__()
        self.inner = Mixer()

    def forward(self, x):
        if torch.isfinite(x).all():
            return self.inner(x)
        return x


class GuardedMixerBlock(MixerBlock):
    """Its residual first, then the mixer, through a module traced as a whole."""

    def __init__(self):
        super().__init__()
        self.mixer = Guarded()

    def forward(self, x):
        return self.mixer(x + self.mlp(x))


def test_a_gated_block_its_parent_calls_only_through_an_opaque_module_is_refused_by_route():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    with pytest.warns(gateify.GateifyWarning, match="'blocks.0.mixer'"):  # called as a whole
        gated = gateify.convert(Stem(GuardedMixerBlock).eval(), example_input=x[:2])
    assert list(gateify.gates(gated)) == ["blocks.0", "blocks.0.mixer.inner", "blocks.1", "blocks.1.mixer.inner"]
    hidden = ["blocks.0.mixer.inner", "blocks.1.mixer.inner"]
    with pytest.raises(gateify.GateConfigError, match=re.escape(f"gated blocks {hidden} sit inside other gated blocks "
                                                                f"whose traced forward does not call them")
                       + r".*leaf_modules=\['blocks.0.mixer.inner', 'blocks.1.mixer.inner'\]"):
        gateify.route(gated, [{"blocks.0": False, "blocks.1": False}, {"blocks.1": False}])
    with pytest.warns(gateify.GateifyWarning, match="'blocks.0.mixer'"):  # the remedy the message gives
        gated = gateify.convert(Stem(GuardedMixerBlock).eval(), example_input=x[:2], leaf_modules=hidden)
    assert list(gateify.gates(gated)) == ["blocks.0", "blocks.1"]
    assert_routes_as_its_paths(gated, [{"blocks.0": False, "blocks.1": False}, {"blocks.1": False}], x)


class Scaled(nn.Module):
    """A block whose branch scale comes in as a keyword."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, scale: float = 1.0):
        return x + scale * self.conv(x)


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = Scaled(), Scaled()

    def forward(self, x):
        return self.b(self.a(self.stem(x), scale=0.5), scale=3.0).mean((2, 3))


def test_routing_passes_blocks_their_keyword_arguments():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    gated = gateify.convert(KeywordNet().eval(), example_input=x[:2])
    assert_routes_as_its_paths(gated, [{"a": False, "b": False}, {"b": False}], x)

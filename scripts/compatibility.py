"""Sweep timm and torchvision models through gateify.convert and write the tables of docs/compatibility.md.

Two suites, each one section of the page between ``<!-- BEGIN <suite> -->`` and ``<!-- END <suite> -->`` (a run
replaces its own section and keeps everything else):

* ``resnet``: every ResNet-family model. A row passes when the number of gates equals the number of residual
  blocks (modules with a ``downsample`` or ``shortcut``) and the converted model in ``"dense"`` mode matches the
  original. About 4 minutes on 2 CPU cores.
* ``families``: residual networks beyond ResNet (ConvNeXt, ViT, DeiT, BEiT, Swin, MaxViT, MobileNet, EfficientNet,
  RegNet, NFNet, MetaFormers, ...). Per model, with random weights (norm layers and layer scales randomised so that
  every branch matters) at the smallest input it takes from 64x64 up: converts or is refused (with the error),
  equal to the source in ``"dense"`` mode, real skipping batch-consistent (controllers randomised so that every
  gate keeps some samples and skips others; each sample run alone gives its row of the batch output, decisions
  included), FLOPs counted (a skipped sample costs its block no branch FLOPs; dense FLOPs equal the source's),
  save/load round trip (``gateify.save``, then ``gateify.load`` rebuilding the architecture from the file alone,
  bit-equal state, equal outputs), ``torch.export`` of the hard-gated model (equal outputs). Hours on 2 CPU cores,
  most of it torch.export: run it in the background with ``--resume``.

Each finished model is appended to a JSON-lines file (``--results``; by default beside the page,
``docs/compatibility-<suite>.jsonl``, committed with it), so ``--resume`` continues an interrupted run, in this
session or a later one on another machine.

    python scripts/compatibility.py --suite resnet --out docs/compatibility.md
    nohup python scripts/compatibility.py --suite families --out docs/compatibility.md --resume &
    python scripts/compatibility.py --suite families --models 'vit_*' 'deit_*' --out /tmp/compat.md  # a subset
    python scripts/compatibility.py --suite families --render     # rewrite the page from the results file only
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import logging
import os
import platform
import re
import signal
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import timm
import torch
import torchvision
from torch import nn

import gateify
from gateify.models import input_shape

# ----------------------------------------------------------------------------------------------------- the models

TIMM_FAMILIES = ("resnet*", "resnext*", "wide_resnet*", "seresnet*", "seresnext*", "ecaresnet*", "resnetblur*",
                 "resnetaa*", "resnetrs*", "resnetv2*", "skresnet*", "resnest*", "res2net*")
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")

#: family -> models (``tv:`` = torchvision). The small members of each family, so the sweep stays affordable;
#: ResNeSt, Res2Net, SK-ResNet and the other ResNet variants are in the ``resnet`` suite.
FAMILIES: dict[str, tuple[str, ...]] = {
    "ConvNeXt": ("convnext_zepto_rms", "convnext_atto", "convnext_atto_ols", "convnext_femto", "convnext_pico",
                 "convnext_nano", "convnext_tiny", "convnextv2_atto", "convnextv2_femto", "convnextv2_nano",
                 "test_convnext", "test_convnext2", "tv:convnext_tiny"),
    "ViT": ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_small_patch14_dinov2",
            "vit_small_patch14_reg4_dinov2", "vit_small_patch16_rope_224", "vit_relpos_small_patch16_224",
            "vit_tiny_r_s16_p8_224", "test_vit", "test_vit3", "test_vit_relpos", "tv:vit_b_32"),
    "DeiT": ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
             "deit3_small_patch16_224"),
    "BEiT / EVA": ("beit_base_patch16_224", "eva02_tiny_patch14_224", "eva02_small_patch14_224"),
    "CaiT / XCiT": ("cait_xxs24_224", "xcit_nano_12_p16_224"),
    "Swin": ("swin_tiny_patch4_window7_224", "swin_s3_tiny_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224",
             "swinv2_cr_tiny_ns_224", "tv:swin_t", "tv:swin_v2_t"),
    "MaxViT / CoAtNet": ("maxvit_pico_rw_256", "maxvit_rmlp_pico_rw_256", "maxxvitv2_nano_rw_256",
                         "coatnet_pico_rw_224", "test_maxvit", "test_coatnet", "tv:maxvit_t"),
    "MobileNetV2": ("mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_100", "mobilenetv2_110d", "tv:mobilenet_v2"),
    "MobileNetV3 / V4": ("mobilenetv3_small_050", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv3_rw",
                         "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium", "tv:mobilenet_v3_small"),
    "EfficientNet": ("efficientnet_b0", "efficientnet_lite0", "efficientnet_b0_g16_evos", "efficientnetv2_rw_t",
                     "tf_efficientnet_b0", "tf_efficientnetv2_b0", "efficientnet_cc_b0_4e", "tv:efficientnet_b0"),
    "Mobile NAS nets": ("mnasnet_small", "semnasnet_050", "hardcorenas_a", "mixnet_s", "tinynet_e", "ghostnet_050",
                        "rexnet_100", "repghostnet_050", "tv:mnasnet0_5"),
    "RegNet": ("regnetx_002", "regnety_002", "regnety_008", "regnetz_005", "regnetz_b16", "tv:regnet_x_400mf",
               "tv:regnet_y_400mf"),
    "NFNet": ("dm_nfnet_f0", "eca_nfnet_l0", "nf_regnet_b0", "nf_resnet26", "test_nfnet"),
    "MetaFormer / MLP": ("poolformer_s12", "caformer_s18", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224",
                         "test_mambaout", "mambaout_femto"),
    "Efficient hybrids": ("edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8",
                          "levit_128s", "tiny_vit_5m_224", "repvit_m0_9", "mobilevit_xxs", "mobilevitv2_050",
                          "efficientvit_b0", "efficientvit_m0", "starnet_s050", "fasternet_t0", "shvit_s1",
                          "swiftformer_xs", "inception_next_atto"),
    "Pyramid transformers": ("pvt_v2_b0", "twins_svt_small", "coat_lite_tiny", "pit_ti_224", "nest_tiny",
                             "gcvit_xxtiny", "davit_tiny", "focalnet_tiny_srf", "hiera_tiny_224", "convit_tiny",
                             "crossvit_tiny_240", "volo_d1_224"),
    "Other CNNs": ("test_byobnet", "gernet_s", "botnet26t_256", "halonet26t", "dla34", "dpn48b", "darknet17",
                   "selecsls42b", "ese_vovnet19b_dw", "xception41", "mobileone_s0"),
}

TOLERANCE = 1e-5  # dense mode: max abs difference, relative to the output's largest magnitude (at least 1)
SKIP_TOLERANCE = 1e-4  # a sample alone vs its row of a batch: other matrix sizes, other float rounding
SIZES = (64, 96, 128, 160, 192, 224, 256)  # input sizes tried, smallest first
BATCH = 8
STEP_TIMEOUT = 900  # seconds any one check may take before it is recorded as timed out


def model_names(suite: str, patterns: list[str]) -> list[str]:
    if suite == "resnet":
        names = list(dict.fromkeys(n for fam in TIMM_FAMILIES for n in timm.list_models(fam)))
        names += [f"torchvision:{n}" for n in TORCHVISION]
    else:
        names = [n for models in FAMILIES.values() for n in models]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n.split(":")[-1], p)
                                         for p in patterns)]
    return names


def family_of(name: str) -> str:
    return next(family for family, models in FAMILIES.items() if name in models)


def _gateify_name(name: str) -> str:
    return "torchvision:" + name[3:] if name.startswith("tv:") else name


# ------------------------------------------------------------------------------------------- the ResNet suite


@dataclass
class ResNetRow:
    model: str
    gates: int = 0
    blocks: int = 0
    max_diff: Optional[float] = None
    convert_s: Optional[float] = None
    input_size: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.gates == self.blocks and self.max_diff is not None and self.max_diff <= TOLERANCE


def create_resnet(name: str) -> nn.Module:
    if name.startswith("torchvision:"):
        return getattr(torchvision.models, name.split(":", 1)[1])()
    return timm.create_model(name)


def residual_blocks(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if m is not model and (hasattr(m, "downsample") or hasattr(m, "shortcut")))


def check_resnet(name: str, size: int) -> ResNetRow:
    row = ResNetRow(name)
    try:
        torch.manual_seed(0)
        model = create_resnet(name).eval()
        row.blocks = residual_blocks(model)
        cfg_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        sizes = [size] if cfg_size[-1] <= size else [size, cfg_size[-1]]
        for s in sizes:  # small first; models with fixed-size heads (attention pools) need their own size
            x = torch.randn(2, cfg_size[0], s, s)
            try:
                start = time.perf_counter()
                gated = gateify.convert(model, example_input=x)
                row.convert_s = time.perf_counter() - start
                break
            except gateify.InputShapeError:
                if s == sizes[-1]:
                    raise
        row.input_size = f"{x.shape[-2]}x{x.shape[-1]}"
        row.gates = len(gateify.gates(gated))
        gateify.set_mode(gated, "dense")
        with torch.no_grad():
            row.max_diff = (gated(x) - model(x)).abs().max().item()
    except Exception as e:  # recorded in the table: the sweep reports failures, it does not stop at them
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        gc.collect()
    return row


def resnet_section(rows: list[ResNetRow], size: int, seconds: float) -> list[str]:
    passed = sum(r.ok for r in rows)
    lines = [
        "## ResNets",
        "",
        "Every ResNet-family model of timm and torchvision, converted by `gateify.convert` with random weights.",
        "A row passes when the number of gates equals the number of residual blocks and the converted model in",
        f'`"dense"` mode matches the original (eval mode, float32) to max abs diff <= {TOLERANCE:g}.',
        "",
        f"**{passed} of {len(rows)} models pass.** {_environment()}; inputs of batch 2 at {size}x{size} unless stated; "
        f"convert time includes the deep copy of the model. Sweep took {seconds / 60:.0f} min.",
        "",
        "Regenerate: `python scripts/compatibility.py --suite resnet --out docs/compatibility.md`",
        "",
        "| model | gates | residual blocks | max diff (dense) | convert time (s) | input | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        diff = f"{r.max_diff:.1e}" if r.max_diff is not None else "-"
        secs = f"{r.convert_s:.2f}" if r.convert_s is not None else "-"
        status = "ok" if r.ok else (r.error or "mismatch").replace("|", "/")
        lines.append(f"| {r.model} | {r.gates} | {r.blocks} | {diff} | {secs} | {r.input_size} | {status} |")
    return lines


# ------------------------------------------------------------------------------------------ the families suite

#: the checks of the families suite, in order; a model passes when every one is "ok"
CHECKS = ("dense", "skip", "flops", "io", "export")


@dataclass
class FamilyRow:
    model: str
    family: str = ""
    input_size: str = ""
    kwargs: dict = field(default_factory=dict)
    gates: int = 0
    convert_s: Optional[float] = None
    refused: str = ""  # convert (or building the model) failed: the error, first line
    notes: list = field(default_factory=list)  # GateifyWarnings of the conversion
    dense_diff: Optional[float] = None
    skip_diff: Optional[float] = None
    keep_rate: Optional[float] = None  # fraction of (sample, gate) pairs kept in the skip check
    dense_macs: Optional[float] = None  # per sample
    saved: Optional[float] = None  # FLOPs saved by the skip check's decisions, gate overhead included
    results: dict = field(default_factory=dict)  # check -> "ok" or what failed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.refused and all(self.results.get(c) == "ok" for c in CHECKS)


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise StepTimeout(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fixed_input_size(name: str) -> Optional[str]:
    """The keyword that sets the input size of a model built for one size (timm ``img_size``, torchvision
    ViT ``image_size``), else ``None``."""
    if name.startswith("tv:"):
        return "image_size" if name.startswith("tv:vit_") else None
    cfg = timm.models.get_pretrained_cfg(name)
    return "img_size" if cfg is not None and getattr(cfg, "fixed_input_size", False) else None


def build(name: str, size: int) -> tuple[nn.Module, dict, torch.Tensor]:
    """The model (random weights, eval mode) at the smallest size from ``size`` up that it runs, the keywords it
    was built with, and a batch of ``BATCH`` inputs."""
    keyword = _fixed_input_size(name)
    sizes = [s for s in SIZES if s >= size]
    cfg = None if name.startswith("tv:") else timm.models.get_pretrained_cfg(name)
    own = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None
    if own is not None and own not in sizes and own >= size:  # CrossViT runs at its 240 (two patch sizes) only
        sizes.append(own)
    model, error = None, None
    for s in sizes:
        kwargs = {keyword: s} if keyword else {}
        try:
            torch.manual_seed(0)
            if model is None or keyword:
                model = gateify.create_model(_gateify_name(name), **kwargs).eval()
            channels = input_shape(model)[0]
            x = torch.randn(BATCH, channels, s, s, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(x[:2])
            return model, kwargs, x
        except Exception as e:  # too small for this architecture: try the next size
            error = e
            if isinstance(e, gateify.GateifyError):
                raise
    raise error


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics and affine parameters, layer scales / skip-init gains of 0.1-0.3, random weights for
    zero-initialised layers: a freshly initialised ConvNeXt (layer scale 1e-6), NFNet (skip-init gain 0) or
    zero-init-last network computes nearly nothing in its branches, and torchvision's ViT head outputs zeros,
    which would make every check below pass whatever gateify does to them. Kept close to 1 elsewhere, so that
    activations stay of a trained network's size over 50 blocks (float rounding then stays rounding)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                uniform(m.running_var, 0.75, 1.25)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                if m.weight.any():
                    uniform(m.weight, 0.75, 1.25)
                else:  # the last norm of a zero-init-last branch
                    uniform(m.weight, 0.1, 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():  # a zero-init head
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            scale = "layerscale" in type(m).__name__.lower()
            for name, p in m.named_parameters(recurse=False):
                zero_gain = name in ("gain", "scale") and not p.any()  # NFNet's zero-init last conv gain
                if scale or zero_gain or re.fullmatch(r"(gamma|gamma_?\d|skipinit_gain|layer_scale\w*|ls\d?)", name):
                    uniform(p, 0.1, 0.3)
    return model


def split_decisions(model: nn.Module, batch: torch.Tensor, seed: int = 0) -> None:
    """Random controllers (as after training, each block's keep logits spread its own way), each gate's boundary
    put in the middle of the widest gap between ``batch``'s keep logits that leaves a sample on either side: every
    gate keeps some samples and skips the others, with a margin that float rounding cannot cross. (The procedure of
    tests/conftest.py's ``split_decisions``.)"""
    g = torch.Generator().manual_seed(seed)
    found = gateify.gates(model)
    with torch.no_grad():
        for gate in found.values():
            fc1, fc2 = gate.controller.fc1, gate.controller.fc2
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=g) * 3.0)
            fc1.bias.copy_(torch.randn(fc1.bias.shape, generator=g))
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g))
            fc2.bias.zero_()

    def place_boundary(gate: nn.Module, args: tuple) -> None:
        _, inputs, _ = args
        logits = gate.controller(inputs[gate.ctrl_index]).double().sort().values
        i = int((logits[1:] - logits[:-1]).argmax())
        gate.controller.fc2.bias.sub_(float((logits[i] + logits[i + 1]) / 2))

    handles = [gate.register_forward_pre_hook(place_boundary) for gate in found.values()]
    gateify.set_mode(model, "hard", threshold=0.5)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()


def decisions(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and the ``(gates, B)`` keep decisions it made."""
    with torch.no_grad(), gateify.record_decisions(model):
        out = model(x)
        kept = torch.stack([g.last.gate.bool() for g in gateify.gates(model).values()])
    return out, kept


def _scale(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item())


def check_dense(row: FamilyRow, model: nn.Module, gated: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad(), gateify.gate_mode(gated, "dense"):
        expected = model(x)
        row.dense_diff = (gated(x) - expected).abs().max().item()
    if row.dense_diff > TOLERANCE * _scale(expected):
        return f"max diff {row.dense_diff:.1e}"
    closed = gateify.set_mode(gated, "hard", threshold=1.5)  # > 1: every block skipped
    with torch.no_grad():
        if torch.allclose(closed(x), expected, rtol=1e-4, atol=1e-5):
            return "the branches do not change the output (nothing to check)"
    return "ok"


def check_skip(row: FamilyRow, gated: nn.Module, x: torch.Tensor) -> str:
    split_decisions(gated, x)
    out, kept = decisions(gated, x)
    row.keep_rate = kept.float().mean().item()
    mixed = kept.any(1) & ~kept.all(1)
    if not bool(mixed.all()):
        return f"{int((~mixed).sum())} gates made one decision for the whole batch"
    alone = [decisions(gated, x[i:i + 1]) for i in range(x.shape[0])]
    alone_out = torch.cat([o for o, _ in alone])
    alone_kept = torch.cat([k for _, k in alone], 1)
    row.skip_diff = (alone_out - out).abs().max().item()
    if not torch.equal(alone_kept, kept):
        return f"decisions differ alone vs in the batch for {int((alone_kept != kept).sum())} (gate, sample) pairs"
    if row.skip_diff > SKIP_TOLERANCE * _scale(out):
        return f"a sample alone differs from its row of the batch by {row.skip_diff:.1e}"
    return "ok"


def check_flops(row: FamilyRow, model: nn.Module, gated: nn.Module, x: torch.Tensor) -> str:
    """Dense FLOPs equal the source model's (counted alike); every gate has a branch; with every gate closed no
    branch FLOPs are counted; with the skip check's decisions each gate counts its branch on its kept samples only.

    A branch's FLOPs on n samples are ``a + b n``: ``a`` is work done once per call whatever the batch (the relative
    position bias of Swin V2 and relpos ViTs), measured from one sample and the batch in dense mode."""
    report = gateify.flops(gated, x)
    source = gateify.flops(model, x)
    with gateify.gate_mode(gated, "dense"):
        one = {b.name: b.branch_flops for b in gateify.flops(gated, x[:1]).blocks}  # f(1)
    row.dense_macs, row.saved = report.dense_macs, report.saved
    if abs(report.dense_flops - source.executed_flops) > 1e-9 * source.executed_flops:
        return f"dense FLOPs {report.dense_flops:.4g} != source model's {source.executed_flops:.4g}"
    empty = [b.name for b in report.blocks if b.branch_flops <= 0]
    if empty:
        return f"no branch FLOPs counted for {empty[:2]}"
    n = x.shape[0]
    for b in report.blocks:
        per_sample = (b.branch_flops * n - one[b.name]) / (n - 1)  # b
        kept = round(b.keep_rate * n)
        expected = (one[b.name] - per_sample + per_sample * kept) / n if kept else 0.0
        if abs(b.executed_flops - expected) > 1e-6 * b.branch_flops:
            return (f"'{b.name}': {b.executed_flops:.4g} branch FLOPs per sample counted for {kept} of {n} samples "
                    f"kept, {expected:.4g} expected")
    with gateify.gate_mode(gated, "hard"):
        closed = gateify.set_mode(gated, "hard", threshold=1.5)
        counted = [b.name for b in gateify.flops(closed, x).blocks if b.executed_flops != 0]
        gateify.set_mode(gated, "hard", threshold=0.5)
    if counted:
        return f"branch FLOPs counted for skipped samples in {counted[:2]}"
    if not report.executed_flops < report.dense_flops:
        return "skipping saved no FLOPs"
    return "ok"


def check_io(row: FamilyRow, gated: nn.Module, x: torch.Tensor) -> str:
    """Save, then load with nothing but the file (the architecture is rebuilt and converted from its header)."""
    expected = decisions(gated, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gated.safetensors")
        gateify.save(gated, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gateify.GateifyWarning)
            loaded = gateify.load(path).eval()
    got = decisions(loaded, x)
    if list(gateify.gates(loaded)) != list(gateify.gates(gated)):
        return "the loaded model has other gates"
    mine, theirs = gated.state_dict(), loaded.state_dict()
    differ = [k for k, v in mine.items() if k not in theirs or not torch.equal(theirs[k], v)]
    if differ or len(theirs) != len(mine):
        return f"{len(differ)} tensors differ after loading (e.g. {differ[:1]})"
    if not torch.equal(got[1], expected[1]):
        return "the loaded model decides differently"
    diff = (got[0] - expected[0]).abs().max().item()
    if diff > TOLERANCE * _scale(expected[0]):  # CPU kernels may round by buffer alignment: not bit for bit
        return f"outputs differ by {diff:.1e} after loading"
    return "ok"


def check_export(row: FamilyRow, gated: nn.Module, x: torch.Tensor) -> str:
    """torch.export of the hard-gated model (each skip a torch.cond): same output as eager."""
    with torch.no_grad():
        expected = gated(x)
    with warnings.catch_warnings(), quiet_torch():
        warnings.simplefilter("ignore")
        program = torch.export.export(gated, (x,))
    conds = sum(n.target is torch.ops.higher_order.cond for n in program.graph.nodes)
    if conds != row.gates:
        return f"{conds} torch.cond in the graph for {row.gates} gates"
    with torch.no_grad():
        diff = (program.module()(x) - expected).abs().max().item()
    if diff > TOLERANCE * _scale(expected):
        return f"exported program differs by {diff:.1e}"
    return "ok"


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """torch.export logs whole graphs at ERROR level when it fails; the sweep records the first line instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}"


def check_family_model(name: str, size: int, skip_export: bool = False) -> FamilyRow:
    row = FamilyRow(name, family_of(name))
    start = time.perf_counter()
    try:
        try:
            with time_limit(STEP_TIMEOUT):
                model, row.kwargs, x = build(name, size)
                perturb(model)
                row.input_size = f"{x.shape[-2]}x{x.shape[-1]}"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", gateify.GateifyWarning)
                    t = time.perf_counter()
                    gated = gateify.convert(model, example_input=x[:2]).eval()
                    row.convert_s = time.perf_counter() - t
                row.notes = [str(w.message) for w in caught if issubclass(w.category, gateify.GateifyWarning)]
                row.gates = len(gateify.gates(gated))
        except Exception as e:
            row.refused = _first_line(e)
            return row
        checks = {
            "dense": lambda: check_dense(row, model, gated, x),
            "skip": lambda: check_skip(row, gated, x),
            "flops": lambda: check_flops(row, model, gated, x),
            "io": lambda: check_io(row, gated, x),
            "export": lambda: "not run" if skip_export else check_export(row, gated, x),
        }
        for check, run in checks.items():
            try:
                with time_limit(STEP_TIMEOUT):
                    row.results[check] = run()
            except Exception as e:  # recorded: the sweep reports failures, it does not stop at them
                row.results[check] = _first_line(e, 200)
    finally:
        row.seconds = time.perf_counter() - start
        gc.collect()
    return row


def _refusal_kind(row: FamilyRow) -> str:
    return row.refused.split(":", 1)[0]


def family_section(rows: list[FamilyRow], size: int, seconds: float, pending: Sequence[str] = ()) -> list[str]:
    """The page's families section; ``pending``: the sweep's models not run yet (the page says it is partial)."""
    converted = [r for r in rows if not r.refused]
    passed = sum(r.ok for r in rows)
    counts = {c: sum(r.results.get(c) == "ok" for r in converted) for c in CHECKS}
    refusals: dict[str, int] = {}
    for r in rows:
        if r.refused:
            refusals[_refusal_kind(r)] = refusals.get(_refusal_kind(r), 0) + 1
    families = list(dict.fromkeys(r.family for r in rows))
    refused_text = ", ".join(f"{n} {k}" for k, n in sorted(refusals.items(), key=lambda kv: -kv[1])) or "none"
    lines = [
        "## Beyond ResNets",
        "",
        f"{len(rows)} models of {len(families)} families of timm and torchvision (`tv:`), random weights with "
        "norm layers, layer scales and skip-init gains randomised (so that every branch changes the output), each at "
        f"the smallest input it takes from {size}x{size} up (models built for one input size are built for that "
        f"one, `img_size=`), batch {BATCH}. Checks, each against the source model or the converted model itself:",
        "",
        f"* **dense**: the converted model in `\"dense\"` mode equals the source (max abs diff <= {TOLERANCE:g} x "
        "the output's largest magnitude), and closing every gate changes the output;",
        "* **skip**: real skipping is batch-consistent: controllers randomised so that every gate keeps some "
        "samples of the batch and skips the others (hard mode), each sample run alone makes the same decisions "
        f"and gives its row of the batch output (to {SKIP_TOLERANCE:g} x the largest magnitude);",
        "* **FLOPs**: `gateify.flops` counts dense FLOPs equal to the source model's, a branch for each gate, no "
        "branch FLOPs with every gate closed, and for each gate the branch on its kept samples only (`a + b n` for "
        "n kept of the batch, `a` being work done once per call such as Swin V2's relative position bias);",
        "* **save/load**: `gateify.save`, then `gateify.load(path)` with nothing but the file (architecture rebuilt "
        "from its header and converted at the model's own input size): the same gates and state dict bit for bit, "
        f"the same decisions and the same outputs (to {TOLERANCE:g} x the largest magnitude);",
        "* **export**: `torch.export.export` of the hard-gated model has one `torch.cond` per gate and gives the "
        "eager outputs.",
        "",
        f"**{len(converted)} of {len(rows)} models convert; {passed} pass every check.** Checks passed by the "
        f"converted models: dense {counts['dense']}, skip {counts['skip']}, FLOPs {counts['flops']}, save/load "
        f"{counts['io']}, export {counts['export']}. Refused: {refused_text}. {_environment()}. Sweep took "
        f"{seconds / 60:.0f} min (torch.export is most of it).",
        *(["", f"**Partial sweep:** {len(rows)} of its {len(rows) + len(pending)} models, "
               f"{len(families)} of its {len(set(families) | {family_of(n) for n in pending})} families so far; "
               f"`--resume` runs the rest."] if pending else []),
        "",
        "Regenerate: `python scripts/compatibility.py --suite families --out docs/compatibility.md --resume` "
        "(results are kept in `docs/compatibility-families.jsonl` as each model finishes).",
        "",
        "| family | models | convert | dense | skip | FLOPs | save/load | export | every check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family in families:
        members = [r for r in rows if r.family == family]
        done = [r for r in members if not r.refused]
        passed = [sum(r.results.get(c) == "ok" for r in done) for c in CHECKS]
        lines.append(f"| {family} | {len(members)} | {len(done)} | " + " | ".join(map(str, passed))
                     + f" | {sum(r.ok for r in members)} |")
    lines += [
        "",
        "| family | model | input | gates | dense MMACs | saved | dense | skip | FLOPs | save/load | export |",
        "|---|---|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for r in rows:
        if r.refused:
            lines.append(f"| {r.family} | {r.model} | {r.input_size or '-'} | - | - | - | refused (below) | | | | |")
            continue
        macs = f"{r.dense_macs / 1e6:.1f}" if r.dense_macs is not None else "-"
        saved = f"{100 * r.saved:.0f}%" if r.saved is not None else "-"
        cells = [_cell(r.results.get(c, "-")) for c in CHECKS]
        lines.append(f"| {r.family} | {r.model} | {r.input_size} | {r.gates} | {macs} | {saved} | " + " | ".join(cells)
                     + " |")
    refused = [r for r in rows if r.refused]
    if refused:
        lines += ["", "### Refused", "", "Each refusal as `gateify.convert` raised it (first line):", ""]
        lines += [f"* `{r.model}`: {r.refused}" for r in refused]
    noted = [r for r in converted if r.notes]
    if noted:
        lines += ["", "### Conversion warnings", "",
                  "What `gateify.convert` left ungated or called as a whole, as its `GateifyWarning` says (first 300 "
                  "characters):", ""]
        lines += [f"* `{r.model}`: " + " / ".join(n[:300].replace("\n", " ") for n in r.notes) for r in noted]
    return lines


def _cell(result: str) -> str:
    return "ok" if result == "ok" else result.replace("|", "/").replace("\n", " ")[:120]


def _environment() -> str:
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, Python "
            f"{platform.python_version()}, CPU, {torch.get_num_threads()} threads")


# ------------------------------------------------------------------------------------------------------- output

_SUITE_CLASS = {"resnet": ResNetRow, "families": FamilyRow}


def read_results(path: Path, suite: str) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                data = json.loads(line)
                rows[data["model"]] = _SUITE_CLASS[suite](**data)
    return rows


HEADER = """# Compatibility

Which timm and torchvision models `gateify.convert` turns into per-sample gated models, checked model by model
with random weights. Two sweeps, one command each (`scripts/compatibility.py`); a refusal names the block and
what to pass instead. How transformer blocks are gated (each residual of a block on its own) is explained in
[method.md](method.md#transformer-blocks).
"""


def write_section(path: Path, suite: str, lines: list[str]) -> None:
    """Replace the ``suite`` section of the page at ``path`` (created with the header if missing)."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {suite} -->", f"<!-- END {suite} -->"
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("resnet", "families"), default="resnet")
    parser.add_argument("--out", default="docs/compatibility.md", help="page whose suite section is rewritten")
    parser.add_argument("--results", default=None,
                        help="JSON lines, one model each (default: beside --out, <out stem>-<suite>.jsonl)")
    parser.add_argument("--resume", action="store_true", help="skip the models already in --results")
    parser.add_argument("--models", nargs="*", default=[], help="wildcards to restrict the sweep")
    parser.add_argument("--size", type=int, default=64, help="input height/width tried first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-export", action="store_true", help="families: leave out torch.export (fast)")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from --results, run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = Path(args.results) if args.results else out.with_name(f"{out.stem}-{args.suite}.jsonl")
    results.parent.mkdir(parents=True, exist_ok=True)
    names = model_names(args.suite, args.models)
    done = read_results(results, args.suite) if args.resume or args.render else {}
    if not (args.resume or args.render):
        results.write_text("")
    elapsed = sum(getattr(r, "seconds", 0.0) for r in done.values() if r.model in names)
    for name in [] if args.render else names:
        if name in done:
            continue
        start = time.perf_counter()
        if args.suite == "resnet":
            row = check_resnet(name, args.size)
            logging.info("%-32s gates %3d/%3d  diff %s  %s", name, row.gates, row.blocks,
                         f"{row.max_diff:.1e}" if row.max_diff is not None else "-", "ok" if row.ok else row.error)
        else:
            row = check_family_model(name, args.size, args.skip_export)
            logging.info("%-34s %-8s gates %3d  %5.0fs  %s", name, row.input_size, row.gates, row.seconds,
                         row.refused or {c: row.results.get(c) for c in CHECKS})
        elapsed += time.perf_counter() - start
        done[name] = row
        with results.open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")
        write_page(args, names, done, elapsed)  # partial results survive an interruption
    if args.render:
        write_page(args, names, done, elapsed)


def write_page(args: argparse.Namespace, names: list[str], done: dict[str, Any], elapsed: float) -> None:
    rows = [done[n] for n in names if n in done]
    section = (resnet_section(rows, args.size, elapsed) if args.suite == "resnet"
               else family_section(rows, args.size, elapsed, [n for n in names if n not in done]))
    write_section(Path(args.out), args.suite, section)


if __name__ == "__main__":
    main()

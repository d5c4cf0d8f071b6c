"""Sweep every ResNet-family model of timm and torchvision through gateify.convert; write docs/compatibility.md.

For each model (random weights, nothing downloaded): convert at a small input, count gates against the number of
residual blocks (modules with a ``downsample`` or ``shortcut``), and compare the converted model in ``"dense"``
mode with the original in eval mode (max abs difference, float32). Takes about 5 minutes on 2 CPU cores.

    python scripts/compatibility.py --out docs/compatibility.md
    python scripts/compatibility.py --models 'resnet1*' --out /tmp/compat.md   # a subset
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import logging
import platform
import time
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torchvision

import gateify

TIMM_FAMILIES = ("resnet*", "resnext*", "wide_resnet*", "seresnet*", "seresnext*", "ecaresnet*", "resnetblur*",
                 "resnetaa*", "resnetrs*", "resnetv2*", "skresnet*", "resnest*", "res2net*")
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
TOLERANCE = 1e-5


@dataclass
class Row:
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


def model_names(patterns: list[str]) -> list[str]:
    names = list(dict.fromkeys(n for fam in TIMM_FAMILIES for n in timm.list_models(fam)))
    names += [f"torchvision:{n}" for n in TORCHVISION]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(n.split(":")[-1], p)
                                         for p in patterns)]
    return names


def create(name: str) -> torch.nn.Module:
    if name.startswith("torchvision:"):
        return getattr(torchvision.models, name.split(":", 1)[1])()
    return timm.create_model(name)


def residual_blocks(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if m is not model and (hasattr(m, "downsample") or hasattr(m, "shortcut")))


def check(name: str, size: int) -> Row:
    row = Row(name)
    try:
        torch.manual_seed(0)
        model = create(name).eval()
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


def write(rows: list[Row], path: str, size: int, seconds: float) -> None:
    passed = sum(r.ok for r in rows)
    lines = [
        "# Compatibility",
        "",
        "Every ResNet-family model of timm and torchvision, converted by `gateify.convert` with random weights.",
        "A row passes when the number of gates equals the number of residual blocks and the converted model in",
        f'`"dense"` mode matches the original (eval mode, float32) to max abs diff <= {TOLERANCE:g}.',
        "",
        f"**{passed} of {len(rows)} models pass.** "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}, CPU, {torch.get_num_threads()} threads; "
        f"inputs of batch 2 at {size}x{size} unless stated; convert time includes the deep copy of the model. "
        f"Sweep took {seconds / 60:.0f} min.",
        "",
        "Regenerate: `python scripts/compatibility.py --out docs/compatibility.md`",
        "",
        "| model | gates | residual blocks | max diff (dense) | convert time (s) | input | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        diff = f"{r.max_diff:.1e}" if r.max_diff is not None else "-"
        secs = f"{r.convert_s:.2f}" if r.convert_s is not None else "-"
        status = "ok" if r.ok else (r.error or "mismatch").replace("|", "/")
        lines.append(f"| {r.model} | {r.gates} | {r.blocks} | {diff} | {secs} | {r.input_size} | {status} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/compatibility.md")
    parser.add_argument("--models", nargs="*", default=[], help="wildcards to restrict the sweep")
    parser.add_argument("--size", type=int, default=64, help="input height/width tried first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in model_names(args.models):
        row = check(name, args.size)
        rows.append(row)
        logging.info("%-32s gates %3d/%3d  diff %s  %s", name, row.gates, row.blocks,
                     f"{row.max_diff:.1e}" if row.max_diff is not None else "-", "ok" if row.ok else row.error)
        write(rows, args.out, args.size, time.perf_counter() - start)  # partial results survive an interruption


if __name__ == "__main__":
    main()

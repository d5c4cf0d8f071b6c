"""Latency of dense vs masked vs real-skip gating, at forced keep fractions, next to executed FLOPs.

For each model / input / batch: the original dense model, then the converted model in hard mode with the gate
decisions forced to keep a fraction of the work (1.0, 0.75, 0.5, 0.25), timed two ways:

* ``masked``: every branch runs on the whole batch and is multiplied by the 0/1 decision (what published
  dynamic-depth code does),
* ``skip``: gateify's hard mode: the branch runs on the kept sub-batch only,
* ``ideal`` (batch 1 only): the same blocks removed outright (gateify's static mode: no controller, no gather),
  the latency a zero-overhead skip would reach; where ``skip`` falls short of 1.0, this row shows how much of the
  gap is overhead and how much is the work FLOPs do not count (BatchNorm, activations, op dispatch).

The controllers run in both (their cost is real); only their outputs are overridden. Executed FLOPs are counted
by ``gateify.flops`` on the same forced decisions. ``ratio = latency_saved / flops_saved`` (1.0 is the physical
limit; masking gets about 0).

    python benchmarks/latency.py --json out.json              # the default set, CPU, 2 threads (~5 min)
    python benchmarks/latency.py --device cuda --amp --channels-last --json gpu.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import platform
from dataclasses import asdict, dataclass
from typing import Optional

import timm
import torch

import gateify
from gateify.timing import measure_latency

_logger = logging.getLogger("latency")

CASES = (("resnet20", 32, 1), ("resnet20", 32, 128), ("resnet50", 224, 1), ("resnet50", 224, 32))
KEEPS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class Row:
    model: str
    input: int
    batch: int
    variant: str  # dense | masked | skip | ideal
    keep: float
    latency_ms: float
    dense_macs: float  # per sample
    executed_macs: float  # per sample, as counted by gateify.flops on the same run (controllers included)
    flops_saved: float
    latency_saved: float
    ratio: Optional[float]


def forced_logits(num_gates: int, batch: int, keep: float, seed: int = 0) -> list[torch.Tensor]:
    """Per gate, +10 (keep) / -10 (skip) logits: a random round(keep*B) subset per block, or for B = 1 an evenly
    spread subset of blocks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_gates):
        if batch == 1:
            kept = int((i + 1) * keep) - int(i * keep) == 1
            mask = torch.tensor([kept])
        else:
            mask = torch.zeros(batch, dtype=torch.bool)
            mask[torch.randperm(batch, generator=g)[: round(keep * batch)]] = True
        out.append(torch.where(mask, 10.0, -10.0))
    return out


def force(gated: torch.nn.Module, logits: list[torch.Tensor], masked: bool) -> None:
    """Override each gate's decision (the controller still runs) and, if ``masked``, how the branch is applied."""
    for gate, forced in zip(gateify.gates(gated).values(), logits):
        real = type(gate.controller).forward.__get__(gate.controller)

        def logit(x: torch.Tensor, real=real, forced=forced) -> torch.Tensor:
            return real(x) * 0 + forced.to(x.device)

        gate.controller.forward = logit  # the controller still runs (and is counted); its output is overridden
        if masked:
            def forward(shortcut, inputs, params, gate=gate):
                keep = torch.sigmoid(gate.controller(inputs[gate.ctrl_index])) >= gate.threshold
                return shortcut + keep.view(-1, 1, 1, 1).to(shortcut.dtype) * gate.branch(*inputs, *params)

            gate.forward = forward
        elif "forward" in gate.__dict__:
            del gate.forward


def run_case(name: str, size: int, batch: int, args: argparse.Namespace, device: torch.device) -> list[Row]:
    torch.manual_seed(0)
    model = timm.create_model(name, zero_init_last=False).eval()  # non-degenerate branches, as after training
    gated = gateify.convert(model).eval()
    gateify.set_mode(gated, "hard")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    gated = gated.to(device, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    gate_count = len(gateify.gates(gated))

    # one model per variant, its decisions forced once, so that the timed calls can be interleaved
    models: dict[tuple[str, float], torch.nn.Module] = {("dense", 1.0): model}
    for keep in KEEPS:
        logits = forced_logits(gate_count, batch, keep)
        for variant in ["masked", "skip"] + (["ideal"] if batch == 1 else []):
            m = copy.deepcopy(gated)
            force(m, logits, masked=variant == "masked")
            if variant == "ideal":  # the same blocks removed outright: no controller, no gate logic
                for gate, forced in zip(gateify.gates(m).values(), logits):
                    gate.static_keep.fill_(bool(forced[0] > 0))
                gateify.set_mode(m, "static")
            models[(variant, keep)] = m
    reports = {key: gateify.flops(m, x) for key, m in models.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                              enabled=args.amp)
    with torch.inference_mode(), autocast:
        latency = measure_latency({key: (lambda m=m: m(x)) for key, m in models.items()}, device, args.warmup,
                        args.repeats if batch > 1 else args.repeats * 4)  # small runs are noisier

    if args.profile:  # where the time of the gated forward goes, next to the dense one
        from torch.profiler import ProfilerActivity, profile

        for key in (("dense", 1.0), ("skip", 0.5)):
            with torch.inference_mode(), autocast, profile(activities=[ProfilerActivity.CPU]) as prof:
                models[key](x)
            print(f"\n{name} {size}^2 batch {batch}, {key[0]} keep {key[1]}: ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    dense_ms, dense_macs = latency[("dense", 1.0)], reports[("dense", 1.0)].dense_macs
    rows = []
    for (variant, keep), ms in latency.items():
        executed = reports[(variant, keep)].executed_macs
        saved = 1 - executed / dense_macs
        latency_saved = 1 - ms / dense_ms
        ratio = latency_saved / saved if saved > 0.01 else None
        rows.append(Row(name, size, batch, variant, keep, ms, dense_macs, executed, saved, latency_saved, ratio))
        _logger.info("%s %d^2 b%d %-6s keep %.2f: %8.2f ms  flops saved %5.1f%%  latency saved %5.1f%%",
                     name, size, batch, variant, keep, ms, 100 * saved, 100 * latency_saved)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'model':<9}{'input':>6}{'batch':>6}  {'variant':<7}{'keep':>5}{'latency ms':>12}"
             f"{'exec MMACs/img':>16}{'FLOPs saved':>12}{'time saved':>11}{'ratio':>7}"]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        lines.append(f"{r.model:<9}{r.input:>6}{r.batch:>6}  {r.variant:<7}{r.keep:>5.2f}{r.latency_ms:>12.2f}"
                     f"{r.executed_macs / 1e6:>16.2f}{100 * r.flops_saved:>11.1f}%{100 * r.latency_saved:>10.1f}%"
                     f"{ratio:>7}")
    return "\n".join(lines)


def tune_malloc() -> bool:
    """glibc only: keep freed memory for reuse instead of returning it to the OS (as jemalloc/tcmalloc, which
    PyTorch's CPU performance guide recommends, do). By default every activation buffer above 32 MB is a fresh
    mmap whose pages fault in on first touch, which costs dense and gated models alike and adds run-to-run noise."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats (x4 at batch 1); the median is kept")
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cases", nargs="*", default=None, help="MODEL:SIZE:BATCH, e.g. resnet20:32:128")
    parser.add_argument("--json", default=None, help="write the rows and the setup here")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler op tables (dense, skip 0.5)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (by default it is told to reuse freed memory)")
    args = parser.parse_args()
    malloc = "glibc default" if args.default_malloc else ("glibc, reuse freed memory" if tune_malloc() else "default")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = CASES if not args.cases else [(m, int(s), int(b)) for m, s, b in (c.split(":") for c in args.cases)]
    rows = [row for case in cases for row in run_case(*case, args, device)]
    setup = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 threads=args.threads, amp=args.amp, channels_last=args.channels_last, torch=torch.__version__,
                 warmup=args.warmup, repeats=args.repeats, malloc=malloc, unit="MACs per image (1 MAC = 2 FLOPs)",
                 gate_overhead="included in executed MACs and in latency")
    print(f"\n{setup}\n{table(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(setup=setup, rows=[asdict(r) for r in rows]), f, indent=2)


if __name__ == "__main__":
    main()

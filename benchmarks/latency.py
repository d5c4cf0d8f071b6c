"""Cost curves of real skipping: latency saved against FLOPs saved, and the price of a gate, by batch and depth.

For each setting (model, input size, batch, eager, compiled or onnxruntime, fp32 or bf16/fp16 autocast, NCHW or channels_last)
the source model (``dense``) is timed, interleaved, against its converted model in hard mode with the decisions:

* ``open``: every gate open (the controllers run, every branch runs): what a gate costs;
* ``half`` / ``quarter``: each block keeps a random half / quarter of the samples (batch 1: an evenly spread half /
  quarter of the blocks);
* ``uneven``: the decisions of a calibrated model: random controllers, one threshold set by ``gateify.calibrate`` for
  half the FLOPs on a calibration batch, so some blocks keep most samples and some few, as trained gates do;
* ``ideal`` (eager, batch 1): the same blocks removed outright (static mode: no controller, no gather), the latency a
  free gate would reach; ``masked`` (``--masked``): every branch on the whole batch, multiplied by the decision
  (what published dynamic-depth code does).

Decisions are forced honestly: the controllers run as they always do (and are counted). A block whose forced
decision is the same for every sample gets it from its own controller weights (output weight 0, bias +-10: no
extra op); a block that splits the batch has its controller's output overwritten in place (one extra op per gate,
charged to gateify). Compiled settings compile one gated model (``gateify.compile``) and switch its forced decisions
between calls, untimed; the dense model is compiled with plain ``torch.compile``. Executed FLOPs come from one
``gateify.flops`` count and the cost model (FLOPs are linear in the kept samples), controllers included.

``ratio = latency saved / FLOPs saved`` (1.0: every FLOP saved is time saved); ``ideal ratio`` the same for the
blocks removed outright; ``gate us`` = (open - dense) / number of gates, the price of one open gate.

    python benchmarks/latency.py --json latency.json          # default grid, CPU, 2 threads; writes latency.png too
    python benchmarks/latency.py --cases resnet20:32:1 resnet50:224:32          # eager fp32, these cases only
    python benchmarks/latency.py --cases resnet50:224:1 resnet50:224:8 --onnx   # hard gates in onnxruntime too
    python benchmarks/latency.py --grid curves --json curves.json   # 5 models x batch 1..256, eager and compiled
    python benchmarks/latency.py --device cuda --amp --channels-last --compile --json gpu.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import math
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from torch import nn

import gateify
from gateify.accounting import CostModel
from gateify.timing import measure_latency_spread

_logger = logging.getLogger("latency")

CIFAR, IMAGENET = 32, 224
SIZES = {"resnet20": CIFAR, "resnet56": CIFAR, "resnet50": IMAGENET, "resnet101": IMAGENET, "resnet152": IMAGENET}
BATCHES = (1, 8, 32, 128, 256)
FORCED = {"open": 1.0, "half": 0.5, "quarter": 0.25}
UNEVEN_TARGET = 0.5  # calibrated FLOPs fraction of the uneven decisions


@dataclass(frozen=True)
class Setting:
    """One timed comparison: a model at an input size and batch, run one way."""

    model: str
    input: int
    batch: int
    mode: str = "eager"  # eager | compiled | onnx (onnxruntime on the CPU, the hard-gated model exported)
    precision: str = "fp32"  # fp32 | amp (bfloat16 autocast on a CPU, float16 on CUDA)
    layout: str = "nchw"  # nchw | nhwc (channels_last model and input)

    @property
    def label(self) -> str:
        return f"{self.model} {self.input}^2 b{self.batch} {self.mode} {self.precision} {self.layout}"


# About 4 minutes on 2 CPU cores (3.5 min measured with 1 thread beside another job, inductor's cache warm; a cold
# cache adds about a minute): fp32 eager by batch and depth, compiled, autocast and channels_last samples.
DEFAULT_GRID = (
    *(Setting("resnet20", CIFAR, b) for b in (1, 8, 32, 128, 256)),
    *(Setting("resnet56", CIFAR, b) for b in (1, 32)),
    Setting("resnet50", IMAGENET, 1), Setting("resnet50", IMAGENET, 32),
    Setting("resnet20", CIFAR, 1, mode="compiled"), Setting("resnet20", CIFAR, 32, mode="compiled"),
    Setting("resnet20", CIFAR, 32, precision="amp"), Setting("resnet50", IMAGENET, 1, precision="amp"),
    Setting("resnet20", CIFAR, 32, layout="nhwc"), Setting("resnet50", IMAGENET, 1, layout="nhwc"),
)


def curves_grid(modes: tuple[str, ...] = ("eager", "compiled")) -> tuple[Setting, ...]:
    """Every model at every batch (hours on 2 CPU cores; minutes on a GPU)."""
    return tuple(Setting(m, s, b, mode) for mode in modes for m, s in SIZES.items() for b in BATCHES)


@dataclass
class Row:
    model: str
    input: int
    batch: int
    mode: str
    precision: str
    layout: str
    variant: str  # dense | open | half | quarter | uneven | ideal-<variant> | masked-<variant>
    keep: float  # fraction of samples kept, averaged over blocks
    latency_ms: float
    latency_q1_ms: float
    latency_q3_ms: float
    dense_macs: float  # per sample
    executed_macs: float  # per sample, controllers included
    flops_saved: float
    latency_saved: float
    ratio: Optional[float]
    gates: int
    block_keep: list[float] = field(default_factory=list)  # per block, in execution order


@dataclass
class Curve:
    """One setting summarised: the price of a gate and how much of the FLOPs saved became time saved."""

    model: str
    input: int
    batch: int
    mode: str
    precision: str
    layout: str
    gates: int
    dense_ms: float
    open_overhead: float  # (open - dense) / dense
    gate_us: float  # (open - dense) / gates, microseconds
    ratio_half: Optional[float]
    ratio_quarter: Optional[float]
    ratio_uneven: Optional[float]
    ideal_ratio_half: Optional[float] = None
    ideal_ratio_uneven: Optional[float] = None


# --- decisions ----------------------------------------------------------------------------------------------------

def forced_masks(num_gates: int, batch: int, keep: float, seed: int = 0) -> list[torch.Tensor]:
    """Per gate, a ``(B,)`` bool mask: a random ``round(keep * B)`` subset per block, or for ``B = 1`` an evenly
    spread ``keep`` fraction of the blocks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_gates):
        if batch == 1:
            out.append(torch.tensor([int((i + 1) * keep) - int(i * keep) == 1]))
        else:
            mask = torch.zeros(batch, dtype=torch.bool)
            mask[torch.randperm(batch, generator=g)[: round(keep * batch)]] = True
            out.append(mask)
    return out


def randomise_controllers(gated: nn.Module, seed: int = 0) -> nn.Module:
    """Controllers with random weights (as after training, each block's keep logits spread and offset its own way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gateify.gates(gated).values():
            fc1, fc2 = gate.controller.fc1, gate.controller.fc2
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=g) * 3.0)
            fc1.bias.copy_(torch.randn(fc1.bias.shape, generator=g))
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g))
            fc2.bias.zero_()
    return gated


_THRESHOLDS: dict[str, float] = {}  # model name -> calibrated threshold: calibrate once per model, not per setting


def uneven_masks(gated: nn.Module, name: str, x: torch.Tensor, calibration: torch.Tensor) -> list[torch.Tensor]:
    """The decisions on ``x`` of a calibrated copy of ``gated``: random controllers, one threshold for every gate
    chosen by ``gateify.calibrate`` so that ``calibration`` runs ``UNEVEN_TARGET`` of the dense FLOPs."""
    model = randomise_controllers(copy.deepcopy(gated))
    if name not in _THRESHOLDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gateify.GateifyWarning)  # random controllers may miss it a little
            _THRESHOLDS[name] = gateify.calibrate(model, calibration, target=UNEVEN_TARGET, steps=16, tolerance=0.02)
    gateify.set_mode(model, "hard", threshold=_THRESHOLDS[name])
    with torch.no_grad(), gateify.record_decisions(model):
        model(x)
        return [g.last.gate.detach().cpu().bool() for g in gateify.gates(model).values()]


def force(gated: nn.Module, masks: list[torch.Tensor]) -> None:
    """Give each gate of ``gated`` the decisions ``masks`` while its controller still runs (see module doc)."""
    for gate, mask in zip(gateify.gates(gated).values(), masks):
        c = gate.controller
        c.__dict__.pop("forward", None)
        if bool(mask.all()) or not bool(mask.any()):  # one decision for the batch: the controller's own weights
            with torch.no_grad():
                c.fc2.weight.zero_()
                c.fc2.bias.fill_(10.0 if bool(mask.all()) else -10.0)
        else:  # the real logits overwritten in place: one small extra op per gate
            forced = torch.where(mask, 10.0, -10.0).to(c.fc2.bias.device)
            real = type(c).forward.__get__(c)
            c.forward = lambda x, real=real, forced=forced: real(x).copy_(forced)


def force_switchable(gated: nn.Module, batch: int) -> list[torch.Tensor]:
    """Every controller's output overwritten in place from a buffer (graph input under torch.compile): the returned
    buffers switch the decisions of one compiled model between variants without recompiling."""
    buffers = []
    for gate in gateify.gates(gated).values():
        c = gate.controller
        c.register_buffer("forced", torch.full((batch,), 10.0, device=c.fc2.bias.device), persistent=False)
        real = type(c).forward.__get__(c)
        c.forward = lambda x, real=real, c=c: real(x).copy_(c.forced)
        buffers.append(c.forced)
    return buffers


def mask_up(gated: nn.Module, masks: list[torch.Tensor]) -> None:
    """``masked`` variant: every branch on the whole batch, times the forced decision."""
    for gate, mask in zip(gateify.gates(gated).values(), masks):
        m = mask.to(gate.threshold_bits.device)

        def forward(shortcut, inputs, params, gate=gate, m=m):
            gate.controller(inputs[gate.ctrl_index])  # the decision is computed (and paid for) as in hard mode
            return shortcut + m.view(-1, *[1] * (shortcut.ndim - 1)).to(shortcut.dtype) * gate.branch(*inputs, *params)

        gate.forward = forward


# --- one setting --------------------------------------------------------------------------------------------------

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


def source_model(name: str) -> nn.Module:
    """The timm model, random weights, eval mode; a ResNet without its zero-initialised last norm (non-degenerate
    branches, as after training). Other families (ViT, ConvNeXt) take no ``zero_init_last``."""
    try:
        return timm.create_model(name, zero_init_last=False).eval()
    except TypeError as e:  # the model's constructor does not know the keyword
        if "zero_init_last" not in str(e):
            raise
        return timm.create_model(name).eval()


def run_setting(s: Setting, args: argparse.Namespace, device: torch.device) -> list[Row]:
    torch.manual_seed(0)
    memory_format = torch.channels_last if s.layout == "nhwc" else torch.contiguous_format
    dense = source_model(s.model)
    gated = gateify.convert(copy.deepcopy(dense)).eval()
    gateify.set_mode(gated, "hard")
    dense = dense.to(device, memory_format=memory_format)
    gated = gated.to(device, memory_format=memory_format)
    x = torch.randn(s.batch, 3, s.input, s.input, device=device).contiguous(memory_format=memory_format)
    calibration = torch.randn(16 if s.input <= CIFAR else 8, 3, s.input, s.input,
                              generator=torch.Generator().manual_seed(1))
    calibration = calibration.to(device).contiguous(memory_format=memory_format)
    n = len(gateify.gates(gated))

    masks = {name: forced_masks(n, s.batch, keep) for name, keep in FORCED.items()}
    masks["uneven"] = uneven_masks(gated, s.model, x, calibration)
    costs = CostModel.from_report(gateify.flops(gated, x[:1]))  # per sample; the same for any batch
    names = list(gateify.gates(gated))

    def keep_rates(variant: str) -> dict[str, float]:
        return {name: float(m.float().mean()) for name, m in zip(names, masks[variant])}

    fns: dict[str, Callable[[], object]] = {}
    setups: dict[str, Callable[[], object]] = {}
    executed: dict[str, float] = {"dense": costs.dense_flops}
    if s.mode == "compiled":
        torch._dynamo.reset()  # dense and gated models share their top-level code: start each setting afresh
        compiled_dense = torch.compile(dense)
        buffers = force_switchable(gated, s.batch)
        compiled = gateify.compile(gated)
        fns["dense"] = lambda: compiled_dense(x)
        for variant in masks:
            def setup(variant=variant) -> None:
                for buf, m in zip(buffers, masks[variant]):
                    buf.copy_(torch.where(m.to(buf.device), 10.0, -10.0))

            setups[variant], fns[variant] = setup, (lambda: compiled(x))
            executed[variant] = costs.fraction(keep_rates(variant)) * costs.dense_flops
    else:  # eager or onnx: a model per variant, its decisions forced
        models: dict[str, nn.Module] = {"dense": dense}
        for variant in masks:
            models[variant] = copy.deepcopy(gated)
            force(models[variant], masks[variant])
            executed[variant] = costs.fraction(keep_rates(variant)) * costs.dense_flops
        if s.batch == 1:  # the same blocks removed outright (a static-mode gate does not export: a plain model there)
            for variant in [v for v in masks if v != "open"]:
                keep = {name: bool(k[0]) for name, k in zip(names, masks[variant])}
                work = copy.deepcopy(gated)
                models[f"ideal-{variant}"] = (gateify.to_static(work, keep=keep) if s.mode == "onnx"
                                              else gateify.set_static(work, keep))
                executed[f"ideal-{variant}"] = costs.static_fraction(keep) * costs.dense_flops
        if args.masked and s.mode == "eager":
            for variant in [v for v in masks if v != "open"]:
                models[f"masked-{variant}"] = copy.deepcopy(gated)
                mask_up(models[f"masked-{variant}"], masks[variant])
                executed[f"masked-{variant}"] = costs.fraction({}) * costs.dense_flops
        if s.mode == "onnx":  # each exported with its forced decisions: a gate is one ONNX If per block
            feed = x.cpu().numpy()
            # a session holds its graph once built: the files (hundreds of MB per setting) go when it is
            with tempfile.TemporaryDirectory(prefix="gateify-onnx-") as folder:
                for key, m in models.items():
                    run = _onnx_session(m, x, args.threads, Path(folder) / f"{key}.onnx", dynamic=False,
                                        optimization=args.ort_optimization)
                    fns[key] = lambda run=run: run(feed)
        else:
            for key, m in models.items():
                fns[key] = lambda m=m: m(x)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                              enabled=s.precision == "amp")
    repeats = args.repeats * (4 if s.batch == 1 else 1)  # small runs are noisier
    warmup = args.warmup + (2 if s.mode == "compiled" else 0)  # compiles (once per shape) inside the warmup
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        spread = measure_latency_spread(fns, device, warmup, repeats, setups)
        if args.profile and s.mode == "eager":  # where the time of the gated forward goes, next to the dense one
            from torch.profiler import ProfilerActivity, profile

            for key in ("dense", "half"):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    setups.get(key, lambda: None)()
                    fns[key]()
                print(f"\n{s.label}, {key}: ops by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    _logger.info("%s: timed in %.0f s", s.label, time.perf_counter() - start)

    dense_ms = spread["dense"].median
    rows = []
    for variant, t in spread.items():
        base = variant.split("-")[-1]
        block_keep = list(keep_rates(base).values()) if base in masks else [1.0] * n
        saved = 1 - executed[variant] / costs.dense_flops
        latency_saved = 1 - t.median / dense_ms
        ratio = latency_saved / saved if saved > 0.01 else None
        rows.append(Row(s.model, s.input, s.batch, s.mode, s.precision, s.layout, variant,
                        sum(block_keep) / len(block_keep) if variant != "dense" else 1.0, t.median, t.q1, t.q3,
                        costs.dense_flops / 2, executed[variant] / 2, saved, latency_saved, ratio, n, block_keep))
        _logger.info("%s %-16s %9.3f ms  FLOPs saved %5.1f%%  time saved %6.1f%%", s.label, variant, t.median,
                     100 * saved, 100 * latency_saved)
    return rows


def curve(rows: list[Row]) -> Curve:
    by = {r.variant: r for r in rows}
    d, o = by["dense"], by["open"]

    def ratio(key: str) -> Optional[float]:
        return by[key].ratio if key in by else None

    return Curve(d.model, d.input, d.batch, d.mode, d.precision, d.layout, d.gates, d.latency_ms,
                 o.latency_ms / d.latency_ms - 1, 1000 * (o.latency_ms - d.latency_ms) / d.gates,
                 ratio("half"), ratio("quarter"), ratio("uneven"), ratio("ideal-half"), ratio("ideal-uneven"))


# --- routed models ------------------------------------------------------------------------------------------------
#
# A routed model (gateify.route) against the dense source and against its ideal: the cheapest path as a plain static
# model on every sample, plus the deep path's blocks from the departure point on, as a plain static segment, on the
# escalated samples only (their activations gathered beforehand, untimed). The routed model pays on top of that the
# decision (a softmax), the gather and the scatter. Paths as in the issue that asked for this: path 0 keeps every
# third block, path 1 two of every three; the threshold is calibrated on the timed batch for half the dense FLOPs
# (batch 1: a sample that stays on path 0, and one that goes on).


@dataclass(frozen=True)
class RoutedSetting:
    model: str
    input: int
    batch: int
    runtime: str = "eager"  # eager | compiled (gateify.compile) | segments (compile_segments) | onnx (onnxruntime, CPU)
    escalate: Optional[bool] = None  # batch 1: the sample stays on path 0 (False) or goes on (True)

    @property
    def label(self) -> str:
        which = "" if self.escalate is None else (" escalated" if self.escalate else " stays")
        return f"routed {self.model} {self.input}^2 b{self.batch}{which} {self.runtime}"


def routed_grid(batches: tuple[int, ...] = (1, 16, 64, 256), models: tuple[str, ...] = ("resnet20", "resnet56",
                "resnet50"), runtimes: tuple[str, ...] = ("eager", "compiled", "onnx"),
                size: Optional[int] = None) -> tuple[RoutedSetting, ...]:
    out = []
    for m in models:
        for b in batches:
            for r in runtimes:
                out += [RoutedSetting(m, size or SIZES[m], b, r, e) for e in ((False, True) if b == 1 else (None,))]
    return tuple(out)


@dataclass
class RoutedRow:
    model: str
    input: int
    batch: int
    runtime: str
    escalated: float  # fraction of the batch sent to path 1
    dense_ms: float
    routed_ms: float
    ideal_ms: float
    path0_ms: float
    deep_ms: float  # path 1 alone on every sample
    dense_macs: float  # per sample
    executed_macs: float  # per sample: path 0 for all, path 1's segment for the escalated
    escalated_macs: float  # per escalated sample: path 0 + path 1's segment
    deep_macs: float  # path 1 alone, per sample
    flops_saved: float
    time_saved: float
    ratio: Optional[float]  # time saved / FLOPs saved
    ideal_ratio: Optional[float]
    over_ideal: float  # routed_ms / ideal_ms


class _Exported(nn.Module):
    """A segment of a routed model as a module of its own (for torch.compile and ONNX export of the ideal)."""

    def __init__(self, routed: nn.Module, segment: Callable) -> None:
        super().__init__()
        self.routed, self.segment = routed, segment

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.segment(self.routed, h)[0]


def _onnx_session(module: nn.Module, example: torch.Tensor, threads: int, path: Path,
                  dynamic: bool = True, optimization: str = "all") -> Callable[[torch.Tensor], object]:
    """``module`` exported to ONNX (the dynamo exporter; batch dimension dynamic unless ``dynamic=False``) and run
    in an onnxruntime CPU session with ``threads`` intra-op threads at graph optimisation level ``optimization``
    (``all``: onnxruntime's default, blocked NCHWc convolutions included; ``extended``: everything but layouts)."""
    import onnxruntime

    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamic_shapes=shapes, dynamo=True, verbose=False)
    program.save(str(path))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, f"ORT_ENABLE_{optimization.upper()}")
    # several sessions share the cores: a session's threads spinning after its run would slow the next one's
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda t: session.run(None, {name: t})


def run_routed_setting(s: RoutedSetting, args: argparse.Namespace, device: torch.device) -> RoutedRow:
    torch.manual_seed(0)
    dense = source_model(s.model)
    gated = gateify.convert(copy.deepcopy(dense))
    names = list(gateify.gates(gated))
    paths = [{n: i % 3 == 0 for i, n in enumerate(names)}, {n: i % 3 != 2 for i, n in enumerate(names)}]
    routed = gateify.route(gated, paths, inplace=True).eval().to(device)
    dense = dense.to(device)
    x = torch.randn(max(s.batch, 16), 3, s.input, s.input, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        if s.batch == 1:  # the sample the calibrated threshold keeps on path 0 (or sends on), alone
            routed.calibrate(x, 0.5, max_error=1.0)
            levels = routed.forward_routes(x).levels
            x = x[int((levels == int(bool(s.escalate))).nonzero()[0])].unsqueeze(0)
        else:
            x = x[: s.batch]
            routed.calibrate(x, 0.5, max_error=1.0)
        levels = routed.forward_routes(x).levels
    idx = levels.nonzero().view(-1)
    plan = routed._plans[False]
    path0, deep = routed.path(0).eval(), routed.path(1).eval()
    with torch.no_grad():
        outs = plan.segments[0](routed, x)
        h = outs[1].index_select(0, idx).contiguous()  # what path 1's segment starts from, gathered beforehand
    segment = _Exported(routed, plan.segments[1]).eval()
    dense_flops, per_level = routed.segment_flops(x[:1].expand(2, *x.shape[1:]).contiguous())
    deep_flops = gateify.flops(deep, x[:1]).executed_flops
    share = idx.numel() / s.batch
    executed = per_level[0] + share * per_level[1]

    if s.runtime == "eager":
        run = {"dense": dense, "routed": routed, "path0": path0, "deep": deep, "segment": segment}
    elif s.runtime in ("compiled", "segments"):
        torch._dynamo.reset()
        # on a GPU, "segments" captures every segment as a CUDA graph (one per shape: buckets keep them few)
        options = dict(mode="reduce-overhead", dynamic=False) if device.type == "cuda" else dict(dynamic=False)
        fast = (gateify.compile(routed, **options) if s.runtime == "compiled"
                else copy.deepcopy(routed).compile_segments(**options))
        run = {"dense": torch.compile(dense, **options), "routed": fast, "path0": torch.compile(path0, **options),
               "deep": torch.compile(deep, **options), "segment": torch.compile(segment, **options)}
    else:  # "onnx": the routed model as one graph (its escalation an ONNX If); "onnx-segments": one graph per level
        whole = s.runtime == "onnx"
        # a session holds its graph once built: the files (hundreds of MB per setting) go when it is
        with tempfile.TemporaryDirectory(prefix="gateify-onnx-") as tmp:
            folder = Path(tmp)
            run = {key: _onnx_session(m, x if key != "segment" else (h if idx.numel() else outs[1]), args.threads,
                                      folder / f"{key}.onnx")
                   for key, m in (("dense", dense), ("routed", routed), ("path0", path0), ("deep", deep),
                                  ("segment", segment)) if whole or key != "routed"}
            if not whole:
                run["routed"] = gateify.OnnxRoutedSession(
                    gateify.export_onnx_segments(routed, x, folder / "routed"), threads=args.threads)
        x, h = x.cpu().numpy(), h.cpu().numpy()
    fns = {"dense": lambda: run["dense"](x), "routed": lambda: run["routed"](x), "path0": lambda: run["path0"](x),
           "deep": lambda: run["deep"](x)}
    fns["ideal"] = (lambda: (run["path0"](x), run["segment"](h))) if idx.numel() else fns["path0"]
    repeats = args.repeats * (4 if s.batch == 1 else 1)
    start = time.perf_counter()
    with torch.inference_mode():
        ms = {k: v.median for k, v in measure_latency_spread(fns, device, args.warmup + 2, repeats,
                                                                  min_sample_ms=args.min_sample_ms).items()}
    _logger.info("%s: timed in %.0f s; %s", s.label, time.perf_counter() - start,
                 ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    if args.profile and s.runtime in ("eager", "compiled", "segments"):
        with torch.inference_mode():
            for key in ("routed", "ideal"):
                print(f"\n{s.label}, {key}: convolutions by input shape, us per call")
                for shapes, us in convolution_times(fns[key]).items():
                    print(f"{us:9.0f}  {shapes}")
    saved = 1 - executed / dense_flops
    time_saved = 1 - ms["routed"] / ms["dense"]
    ideal_saved = 1 - ms["ideal"] / ms["dense"]
    return RoutedRow(s.model, s.input, s.batch, s.runtime, share, ms["dense"], ms["routed"], ms["ideal"],
                     ms["path0"], ms["deep"], dense_flops / 2, executed / 2, (per_level[0] + per_level[1]) / 2,
                     deep_flops / 2, saved, time_saved, time_saved / saved if saved > 0.01 else None,
                     ideal_saved / saved if saved > 0.01 else None, ms["routed"] / ms["ideal"])


def convolution_times(fn: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """Microseconds per call of ``fn`` spent in convolutions, by (input, weight) shape, largest first (torch.profiler;
    inductor's extern convolutions included): which convolutions a compiled routed model runs slower than its
    ideal's plain segment does."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    found = {str(e.input_shapes[:2]): e.self_cpu_time_total / calls
             for e in prof.key_averages(group_by_input_shape=True)
             if e.key in ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::thnn_conv2d")}
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def routed_table(rows: list[RoutedRow]) -> str:
    lines = ["routed vs its ideal (path 0 plain on all + path 1's segment plain on the escalated); ratio = time saved "
             "/ FLOPs saved vs dense",
             f"{'model':<10}{'input':>6}{'batch':>6} {'runtime':<9}{'escal.':>7}{'dense ms':>10}{'routed ms':>11}"
             f"{'ideal ms':>10}{'x ideal':>8}{'FLOPs saved':>12}{'ratio':>7}{'ideal':>7}{'esc. MMACs':>11}"
             f"{'deep MMACs':>11}"]
    for r in rows:
        lines.append(f"{r.model:<10}{r.input:>6}{r.batch:>6} {r.runtime:<9}{100 * r.escalated:>6.0f}%"
                     f"{r.dense_ms:>10.3f}{r.routed_ms:>11.3f}{r.ideal_ms:>10.3f}{r.over_ideal:>8.3f}"
                     f"{100 * r.flops_saved:>11.1f}%{_f(r.ratio, '.2f'):>7}{_f(r.ideal_ratio, '.2f'):>7}"
                     f"{r.escalated_macs / 1e6:>11.2f}{r.deep_macs / 1e6:>11.2f}")
    return "\n".join(lines)


# --- output -------------------------------------------------------------------------------------------------------

def _f(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rows_table(rows: list[Row]) -> str:
    lines = [f"{'model':<10}{'input':>6}{'batch':>6} {'mode':<9}{'prec':<5}{'layout':<7}{'variant':<15}{'keep':>5}"
             f"{'latency ms':>12}{'MMACs/img':>11}{'FLOPs saved':>12}{'time saved':>11}{'ratio':>7}"]
    for r in rows:
        lines.append(f"{r.model:<10}{r.input:>6}{r.batch:>6} {r.mode:<9}{r.precision:<5}{r.layout:<7}{r.variant:<15}"
                     f"{r.keep:>5.2f}{r.latency_ms:>12.3f}{r.executed_macs / 1e6:>11.2f}{100 * r.flops_saved:>11.1f}%"
                     f"{100 * r.latency_saved:>10.1f}%{_f(r.ratio, '.2f'):>7}")
    return "\n".join(lines)


def curves_table(curves: list[Curve]) -> str:
    lines = ["ratio = time saved / FLOPs saved (1.0 = every FLOP saved is time saved); gate = (open - dense) / gates",
             f"{'model':<10}{'input':>6}{'batch':>6} {'mode':<9}{'prec':<5}{'layout':<7}{'gates':>6}{'dense ms':>10}"
             f"{'open':>8}{'gate us':>9}{'half':>7}{'quarter':>8}{'uneven':>8}{'ideal half':>11}{'ideal uneven':>13}"]
    for c in curves:
        lines.append(f"{c.model:<10}{c.input:>6}{c.batch:>6} {c.mode:<9}{c.precision:<5}{c.layout:<7}{c.gates:>6}"
                     f"{c.dense_ms:>10.3f}{100 * c.open_overhead:>7.1f}%{c.gate_us:>9.1f}{_f(c.ratio_half, '.2f'):>7}"
                     f"{_f(c.ratio_quarter, '.2f'):>8}{_f(c.ratio_uneven, '.2f'):>8}"
                     f"{_f(c.ideal_ratio_half, '.2f'):>11}{_f(c.ideal_ratio_uneven, '.2f'):>13}")
    return "\n".join(lines)


def trends(curves: list[Curve]) -> str:
    """How the ratio and the gate's price move with batch (per model) and with depth (per batch), in words."""
    lines = []
    groups: dict[tuple, list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.model, c.input, c.mode, c.precision, c.layout), []).append(c)
    for (model, size, mode, prec, layout), cs in groups.items():
        if len(cs) < 2:
            continue
        cs = sorted(cs, key=lambda c: c.batch)
        lines.append(f"{model} {size}^2 {mode} {prec} {layout}, batch {cs[0].batch} -> {cs[-1].batch}: gate "
                     f"{cs[0].gate_us:.1f} -> {cs[-1].gate_us:.1f} us ({100 * cs[0].open_overhead:.1f}% -> "
                     f"{100 * cs[-1].open_overhead:.1f}% of dense), ratio half {_f(cs[0].ratio_half, '.2f')} -> "
                     f"{_f(cs[-1].ratio_half, '.2f')}, uneven {_f(cs[0].ratio_uneven, '.2f')} -> "
                     f"{_f(cs[-1].ratio_uneven, '.2f')}")
    by_batch: dict[tuple, list[Curve]] = {}
    for c in curves:
        by_batch.setdefault((c.batch, c.mode, c.precision, c.layout, c.input), []).append(c)
    for (batch, mode, prec, layout, size), cs in by_batch.items():
        if len(cs) < 2:
            continue
        cs = sorted(cs, key=lambda c: c.gates)
        lines.append(f"depth at {size}^2 batch {batch} {mode} {prec} {layout}: " + ", ".join(
            f"{c.model} ({c.gates} gates) open {100 * c.open_overhead:+.1f}%, half {_f(c.ratio_half, '.2f')}, "
            f"uneven {_f(c.ratio_uneven, '.2f')}" for c in cs))
    return "\n".join(lines)


def plot(curves: list[Curve], path: Path) -> bool:
    """Ratio (time saved / FLOPs saved) and open-gate overhead against batch, one line per model and way of running."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("matplotlib is not installed: no plot")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[tuple, list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.model, c.mode, c.precision, c.layout), []).append(c)
    for (model, mode, prec, layout), cs in sorted(groups.items()):
        cs = sorted(cs, key=lambda c: c.batch)
        label = f"{model} {mode}" + (f" {prec}" if prec != "fp32" else "") + (f" {layout}" if layout != "nchw" else "")
        batches = [c.batch for c in cs]
        line, = left.plot(batches, [c.ratio_half if c.ratio_half is not None else math.nan for c in cs], "o-",
                          label=f"{label}: half")
        left.plot(batches, [c.ratio_uneven if c.ratio_uneven is not None else math.nan for c in cs], "s--",
                  color=line.get_color(), label=f"{label}: uneven")
        right.plot(batches, [100 * c.open_overhead for c in cs], "o-", color=line.get_color(), label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.grid(True, alpha=0.3)
    left.axhline(1.0, color="k", lw=0.8)
    left.set_ylim(-0.5, 1.25)  # a noisy run can put a ratio far outside; the table has every value
    left.set_ylabel("time saved / FLOPs saved")
    left.set_title("real skipping: ratio (half: forced, uneven: calibrated)")
    right.axhline(0.0, color="k", lw=0.8)
    right.set_ylabel("every gate open: % over dense")
    right.set_title("price of the gates")
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_cases(cases: list[str], args: argparse.Namespace) -> list[Setting]:
    modes = ["eager"] + (["compiled"] if args.compile else []) + (["onnx"] if args.onnx else [])
    out = []
    for c in cases:
        model, size, batch = c.split(":")
        for mode in modes:
            out.append(Setting(model, int(size), int(batch), mode, "amp" if args.amp else "fp32",
                               "nhwc" if args.channels_last else "nchw"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (x4 at batch 1); the median is kept")
    parser.add_argument("--min-sample-ms", type=float, default=0.0,
                        help="--routed: time back-to-back calls, as many per sample as the slowest variant needs to "
                             "fill this many ms (0: single calls, each right after another variant's)")
    parser.add_argument("--grid", choices=["default", "curves", "curves-eager", "routed", "routed-quick"],
                        default="default",
                        help="default: about 4 min on 2 CPU cores; curves: every model x batch 1..256, eager and "
                             "compiled (hours on a CPU); curves-eager: the same, eager only; routed: routed models "
                             "(ResNet-20/56/50, batch 1..256, eager, compiled, onnxruntime) against dense and their "
                             "ideal; routed-quick: ResNet-20 and ResNet-50 at batch 1 and 16")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="MODEL:SIZE:BATCH instead of the grid, e.g. resnet20:32:128 (eager fp32 NCHW unless "
                             "--compile / --amp / --channels-last)")
    parser.add_argument("--compile", action="store_true", help="with --cases: also compiled (gateify.compile)")
    parser.add_argument("--onnx", action="store_true",
                        help="with --cases: also each model exported to ONNX and run in onnxruntime (CPU, fp32)")
    parser.add_argument("--routed", action="store_true",
                        help="with --cases: routed models (eager, compiled, onnxruntime) instead of gates")
    parser.add_argument("--runtimes", default="eager,compiled,onnx,onnx-segments",
                        help="routed models: which of eager, compiled (gateify.compile: one graph), segments (each "
                             "segment compiled alone: CUDA graphs on a GPU), onnx (onnxruntime on the CPU, one graph "
                             "with an If), onnx-segments (one graph per level, gateify.OnnxRoutedSession) to time")
    parser.add_argument("--amp", action="store_true", help="with --cases: autocast (bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="with --cases: channels_last model and input")
    parser.add_argument("--masked", action="store_true", help="also time masking (every branch on the whole batch)")
    parser.add_argument("--json", default=None, help="write the rows, curves and setup here (and a plot beside it)")
    parser.add_argument("--plot", default=None, help="plot path (default: the --json path with .png)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler op tables (dense, half); --routed: convolution time by input shape "
                             "(routed, its ideal's segment)")
    parser.add_argument("--ort-optimization", choices=["all", "extended"], default="all",
                        help="with --onnx: onnxruntime's graph optimisation level (extended: no NCHWc layout)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (by default it is told to reuse freed memory)")
    args = parser.parse_args()
    malloc = "glibc default" if args.default_malloc else ("glibc, reuse freed memory" if tune_malloc() else "default")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's passes log every step at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cases:
        settings = parse_cases(args.cases, args)
    elif args.grid == "default":
        settings = list(DEFAULT_GRID)
    else:
        settings = list(curves_grid(("eager", "compiled") if args.grid == "curves" else ("eager",)))
    if device.type == "cuda" and not args.cases:  # a GPU runs every grid setting with AMP and channels_last too
        settings = [replace(s, precision=p, layout=l) for s in settings if s.precision == "fp32" and s.layout == "nchw"
                    for p in ("fp32", "amp") for l in ("nchw", "nhwc")]
    routed_settings: list[RoutedSetting] = []
    if args.grid in ("routed", "routed-quick") or args.routed:
        runtimes = tuple(args.runtimes.split(","))
        if args.cases:
            for case in args.cases:
                model, size, batch = case.split(":")
                routed_settings += routed_grid((int(batch),), (model,), runtimes, size=int(size))
        else:
            routed_settings = list(routed_grid(runtimes=runtimes) if args.grid == "routed" else routed_grid(
                (1, 16), ("resnet20", "resnet50"), runtimes))
        settings = []
    start = time.perf_counter()
    routed_rows = [run_routed_setting(r, args, device) for r in routed_settings]
    all_rows: list[Row] = []
    curves: list[Curve] = []
    for s in settings:
        rows = run_setting(s, args, device)
        all_rows += rows
        curves.append(curve(rows))
    cpu = platform.processor() or platform.machine()
    setup = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
                 threads=args.threads, torch=torch.__version__, warmup=args.warmup, repeats=args.repeats,
                 malloc=malloc, unit="MACs per image (1 MAC = 2 FLOPs)", uneven_target=UNEVEN_TARGET,
                 gate_overhead="included in executed MACs and in latency",
                 seconds=round(time.perf_counter() - start))
    if routed_rows:
        print(f"\n{setup}\n\n{routed_table(routed_rows)}")
    else:
        print(f"\n{setup}\n\n{rows_table(all_rows)}\n\n{curves_table(curves)}\n\n{trends(curves)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(setup=setup, rows=[asdict(r) for r in all_rows], curves=[asdict(c) for c in curves],
                           routed=[asdict(r) for r in routed_rows]), f, indent=1)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot_path and curves and plot(curves, Path(plot_path)):
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    main()

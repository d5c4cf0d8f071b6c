"""The ``gateify`` command (also ``python -m gateify``): convert a ResNet, inspect a gated file, time it.

    gateify convert resnet50 --out gated.safetensors --weights resnet50_dense.safetensors
    gateify convert resnet50_dense.safetensors --arch resnet50 --out gated.safetensors
    gateify info gated.safetensors --input-size 224
    gateify bench gated.safetensors --batch-size 1 --threads 4

Files are safetensors only (gateify never unpickles). User errors print ``error: <message>`` and exit with 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import textwrap
import time
from typing import Optional, Sequence

import torch
from torch import nn

from ._version import __version__
from .accounting import flops
from .conversion import convert, to_dense
from .errors import GateifyError
from .gate import GATE_KINDS
from .io import FORMAT_KEY, is_gateify_file, load, load_dense, read_metadata, save
from .models import architecture_of, create_model, input_shape
from .modes import gates, set_mode
from .timing import measure_latency

__all__ = ["main", "build_parser", "UsageError"]


class UsageError(GateifyError):
    """The command line asks for something inconsistent (e.g. a dense file without ``--arch``)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateify", description="Per-sample gated residual blocks for timm and torchvision ResNets: convert a "
                                    "model, inspect a gated file, time it against the dense model.",
        epilog="Run 'gateify COMMAND --help' for a command's options. Models are timm names (timm.list_models("
               "'resnet*'), plus gateify's CIFAR resnet20/32/44/56/110) or torchvision:<name>. Nothing is downloaded.")
    parser.add_argument("--version", action="version", version=f"gateify {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = commands.add_parser(
        "convert", help="gate every residual block of a ResNet and write it as safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Build a ResNet (random weights, or dense weights you give), gate every residual block per sample with "
            "gateify.convert, and write it with gateify.save (architecture and gate configuration go into the "
            "file, so 'gateify info/bench' and gateify.load(path) rebuild it).", 79),
        epilog="examples:\n"
               "  gateify convert resnet20 --out r20_gated.safetensors\n"
               "  gateify convert torchvision:resnet50 --weights rn50.safetensors --out rn50_gated.safetensors\n"
               "  gateify convert rn50.safetensors --arch resnet50 --num-classes 100 --out rn50_gated.safetensors\n"
               "Dense weights must be a safetensors file of the plain model's state_dict (timm/torchvision key names),"
               "\ne.g. safetensors.torch.save_file(model.state_dict(), 'rn50.safetensors').")
    c.add_argument("model", metavar="MODEL",
                   help="a timm model name (resnet50, resnet20, ...), torchvision:<name> (torchvision:resnet18), or "
                        "a dense .safetensors file together with --arch")
    c.add_argument("--out", required=True, metavar="FILE", help="where to write the gated model (.safetensors)")
    c.add_argument("--arch", metavar="NAME", help="the architecture of a dense safetensors MODEL file")
    c.add_argument("--weights", metavar="DENSE.safetensors", help="dense source weights to load before converting")
    c.add_argument("--gate", choices=tuple(GATE_KINDS), default="controller",
                   help="controller (default): a small MLP on the block input decides, skipped branches save compute; "
                        "cir: decides from the branch output's cosine incompatibility, so every branch runs "
                        "(no compute saved)")
    c.add_argument("--num-classes", type=_positive, metavar="N", help="classifier outputs (default: the library's)")
    c.add_argument("--in-chans", type=_positive, metavar="C", help="input channels (default: 3)")
    c.set_defaults(func=_convert)

    i = commands.add_parser(
        "info", help="show a gated file's architecture, gates and FLOPs",
        description="Print the architecture and gate configuration recorded in a gated file, each gate's mode and "
                    "threshold, and dense vs executed MACs/FLOPs per image (1 MAC = 2 FLOPs). Executed FLOPs depend "
                    "on the data: they are counted here on random N(0, 1) inputs, not on your images.")
    i.add_argument("file", metavar="FILE", help="a file written by 'gateify convert' or gateify.save")
    i.add_argument("--input-size", type=_positive, metavar="H",
                   help="image side for the FLOPs count (default: the model's pretrained_cfg input size, else 224)")
    i.add_argument("--samples", type=_positive, default=8, metavar="N", help="random images to count on (default 8)")
    i.set_defaults(func=_info)

    b = commands.add_parser(
        "bench", help="time the dense model against the hard-gated model",
        description="Median latency of the dense model (gateify.to_dense) and of the gated model with every gate "
                    "in hard mode (real skipping), on the same random inputs. Random inputs give the decisions of "
                    "random data: the speed-up on your images follows their executed-FLOPs fraction, which "
                    "'gateify info' and gateify.flops(model, your_batches) report.")
    b.add_argument("file", metavar="FILE", help="a file written by 'gateify convert' or gateify.save")
    b.add_argument("--batch-size", type=_positive, default=1, metavar="B", help="images per call (default 1)")
    b.add_argument("--input-size", type=_positive, metavar="H",
                   help="image side (default: the model's pretrained_cfg input size, else 224)")
    b.add_argument("--threads", type=_positive, metavar="T", help="CPU threads (torch.set_num_threads)")
    b.add_argument("--repeats", type=_positive, default=20, metavar="R", help="timed calls per model (default 20)")
    b.add_argument("--warmup", type=int, default=3, metavar="W", help="untimed calls first (default 3)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]; CUDA timings synchronise")
    b.set_defaults(func=_bench)
    return parser


def _is_file_argument(text: str) -> bool:
    return text.endswith(".safetensors") or os.path.isfile(text)


def _convert(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    weights = args.weights
    if _is_file_argument(args.model):
        if not args.arch:
            raise UsageError(f"'{args.model}' is a weights file: say which architecture it holds with --arch NAME "
                             f"(e.g. --arch resnet50 or --arch torchvision:resnet50).")
        if weights:
            raise UsageError("give the dense weights once: either as MODEL (with --arch) or with --weights.")
        name, weights = args.arch, args.model
    else:
        if args.arch:
            raise UsageError(f"--arch is for a dense weights file given as MODEL; '{args.model}' is a model name "
                             f"already (use --weights FILE to load weights into it).")
        name = args.model
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"the folder of --out '{args.out}' does not exist; create it first.")
    model = create_model(name, **kwargs)
    if weights:
        try:
            load_dense(model, weights)
        except GateifyError as e:
            raise type(e)(f"{e} On the command line: --num-classes N, --in-chans C.") from e
    gated = convert(model, gate=args.gate)
    save(gated, args.out)
    source = f"dense weights '{weights}'" if weights else "random weights"
    print(f"{name}: gated {len(gates(gated))} residual blocks ({args.gate} gates) from {source}; "
          f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def _random_batch(model: nn.Module, n: int, size: Optional[int], device: torch.device) -> torch.Tensor:
    return torch.randn(n, *input_shape(model, size), generator=torch.Generator().manual_seed(0)).to(device)


def _load_gated_file(path: str) -> tuple[nn.Module, dict[str, str]]:
    """The model in a file written by gateify.save, in eval mode, and the file's metadata."""
    metadata = read_metadata(path)  # the header only: load() reads the tensors
    if not is_gateify_file(metadata):
        raise UsageError(f"'{path}' holds weights not written by gateify (dense weights?); convert them first: "
                         f"gateify convert {path} --arch NAME --out gated.safetensors")
    return load(path).eval(), metadata


def _info(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model, metadata = _load_gated_file(args.file)
    seconds = time.perf_counter() - start
    arch = architecture_of(model)
    found = gates(model)
    print(f"file          {args.file} ({os.path.getsize(args.file):,} bytes, gateify file format "
          f"{metadata.get(FORMAT_KEY, '?')}, written by gateify {metadata.get('gateify_version', '?')}; "
          f"loaded, rebuilt and converted in {1e3 * seconds:.0f} ms)")
    print(f"architecture  {json.dumps(arch) if arch else 'not recorded'}")
    if not found:
        print("gates         none: a plain (unconverted) model")
        return 0
    config = next(iter(found.values())).config
    print(f"gate config   {json.dumps(config.to_dict())}")
    x = _random_batch(model, args.samples, args.input_size, torch.device("cpu"))
    report = flops(model, x)
    print(f"\n{'block':<24}{'mode':<8}{'threshold':>10}{'keep rate*':>12}{'branch MMACs':>14}")
    for block in report.blocks:
        gate = found[block.name]
        print(f"{block.name:<24}{gate.mode:<8}{float(gate.threshold):>10.4g}{block.keep_rate:>12.3f}"
              f"{block.branch_flops / 2e6:>14.3f}")
    print(f"\nper image at {'x'.join(map(str, x.shape[1:]))} (1 MAC = 2 FLOPs):")
    print(f"  dense     {report.dense_macs / 1e6:12.3f} MMACs = {report.dense_flops / 1e6:12.3f} MFLOPs")
    print(f"  executed* {report.executed_macs / 1e6:12.3f} MMACs = {report.executed_flops / 1e6:12.3f} MFLOPs "
          f"({100 * report.executed_fraction:.1f}% of dense, gate overhead {report.gate_macs / 1e3:.1f} kMACs "
          f"included)")
    print(f"* executed FLOPs and keep rates depend on the data: these are for {args.samples} random N(0, 1) images,\n"
          f"  each gate in its saved mode ('auto' = hard in eval). Count yours with gateify.flops(model, batches).")
    return 0


def _bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device here; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _load_gated_file(args.file)
    if not gates(model):
        raise UsageError(f"'{args.file}' holds a plain model: there is no gated model to compare with; "
                         f"write one with 'gateify convert'.")
    gated = set_mode(copy.deepcopy(model), "hard").to(device)
    dense = to_dense(model).eval().to(device)
    x = _random_batch(model, args.batch_size, args.input_size, device)
    report = flops(gated, x)
    with torch.inference_mode():
        ms = measure_latency({"dense": lambda: dense(x), "gated": lambda: gated(x)}, device, args.warmup, args.repeats)
    threads = f", torch threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    print(f"{'x'.join(map(str, x.shape))} random inputs on {device}{threads}, median of {args.repeats} calls:")
    print(f"  dense model        {ms['dense']:9.2f} ms")
    print(f"  gated, hard mode   {ms['gated']:9.2f} ms  ({ms['gated'] / ms['dense']:.2f}x dense time; executed "
          f"FLOPs {100 * report.executed_fraction:.1f}% of dense, gates included)")
    print("  decisions are those of random data; on your images the executed fraction (and speed-up) differ.")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``gateify`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error argparse printed (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `gateify info FILE | head`: the reader stopped early, which is not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # what a shell reports for a process that SIGPIPE ended
    except (GateifyError, OSError) as e:  # user errors: the message says what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2

"""The ``gateify`` command (also ``python -m gateify``): convert a ResNet, inspect a gated file, time it.

    gateify convert resnet50 --out gated.safetensors --weights resnet50_dense.safetensors
    gateify convert resnet50_dense.safetensors --arch resnet50 --out gated.safetensors
    gateify info gated.safetensors --input-size 224
    gateify bench gated.safetensors --batch-size 1 --threads 4

Files are safetensors only (gateify never unpickles). User errors print ``error: <message>`` and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ._version import __version__
from .errors import GateifyError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, timm and the rest of gateify are imported inside the commands: `gateify --help` (and a usage error)
# answers at once instead of after seconds of imports.

__all__ = ["main", "build_parser", "UsageError"]

#: gateify.gate.GATE_KINDS, spelled out so that building the parser imports no torch (a test keeps them equal)
GATE_KINDS = ("controller", "cir")


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
               "  gateify convert dense_saved_by_gateify.safetensors --out gated.safetensors\n"
               "Dense weights are a safetensors file of the plain model's state_dict (timm/torchvision key names),\n"
               "e.g. safetensors.torch.save_file(model.state_dict(), 'rn50.safetensors'), which needs --arch; or a\n"
               "plain model written by gateify.save, which records its architecture, num_classes and in_chans.")
    c.add_argument("model", metavar="MODEL",
                   help="a timm model name (resnet50, resnet20, ...), torchvision:<name> (torchvision:resnet18), or "
                        "a dense .safetensors file (with --arch, unless gateify.save wrote it)")
    c.add_argument("--out", required=True, metavar="FILE", help="where to write the gated model (.safetensors)")
    c.add_argument("--arch", metavar="NAME",
                   help="the architecture of a dense safetensors MODEL file that does not record it")
    c.add_argument("--weights", metavar="DENSE.safetensors", help="dense source weights to load before converting")
    c.add_argument("--gate", choices=GATE_KINDS, default="controller",
                   help="controller (default): a small MLP on the block input decides, skipped branches save compute; "
                        "cir: decides from the branch output's cosine incompatibility, so every branch runs "
                        "(no compute saved)")
    c.add_argument("--num-classes", type=_positive, metavar="N",
                   help="classifier outputs (default: the library's, or what a MODEL file records)")
    c.add_argument("--in-chans", type=_positive, metavar="C",
                   help="input channels (default: 3, or what a MODEL file records)")
    c.set_defaults(func=_convert)

    i = commands.add_parser(
        "info", help="show a gated file's architecture, gates and FLOPs",
        description="Print the architecture and gate configuration recorded in a gated file, each gate's mode and "
                    "the threshold in force (calibrated or set after conversion), and dense vs executed MACs/FLOPs "
                    "per image (1 MAC = 2 FLOPs); for a routed file (gateify.route), its paths, their FLOPs and the "
                    "routing threshold. Executed FLOPs depend on the data: they are counted here on random "
                    "N(0, 1) inputs, not on your images.")
    i.add_argument("file", metavar="FILE", help="a file written by 'gateify convert' or gateify.save")
    i.add_argument("--input-size", type=_positive, metavar="H",
                   help="image side for the FLOPs count (default: the model's pretrained_cfg input size, else 224)")
    i.add_argument("--samples", type=_positive, default=8, metavar="N", help="random images to count on (default 8)")
    i.set_defaults(func=_info)

    b = commands.add_parser(
        "bench", help="time the dense model against the hard-gated model",
        description="Median latency of the dense model (gateify.to_dense) and of the gated model with every gate "
                    "in hard mode (real skipping), or of a routed model as saved and its cheapest path alone, on the "
                    "same random inputs. Random inputs give the decisions of "
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


def _dense_source(args: argparse.Namespace, kwargs: dict[str, Any]) -> tuple[str, "nn.Module", str]:
    """``(architecture name, plain model with its weights, where they came from)`` for a MODEL that is a file."""
    from .io import _parse_metadata, is_gateify_file, load, load_dense, read_metadata
    from .models import create_model

    path = args.model
    if args.weights:
        raise UsageError("give the dense weights once: either as MODEL or with --weights.")
    metadata = read_metadata(path)  # the header only
    if not is_gateify_file(metadata):  # a plain state dict (safetensors.torch.save_file): it says nothing else
        if not args.arch:
            raise UsageError(f"'{path}' is a weights file that does not record its architecture: say which it "
                             f"holds with --arch NAME (e.g. --arch resnet50 or --arch torchvision:resnet50).")
        model = create_model(args.arch, **kwargs)
        try:
            load_dense(model, path)
        except GateifyError as e:
            raise type(e)(f"{e} On the command line: --num-classes N, --in-chans C.") from e
        return args.arch, model, f"dense weights '{path}'"
    _, arch, config, modes = _parse_metadata(path, metadata)
    if config is not None or modes:
        raise UsageError(f"'{path}' is already converted: gateify.save wrote a gated model with {len(modes)} gated "
                         f"blocks into it. 'gateify info {path}' describes it, 'gateify bench {path}' times it; "
                         f"to convert again with other options, start from the dense weights.")
    if not arch:  # a plain model of an architecture gateify could not name (your own class)
        if not args.arch:
            raise UsageError(f"'{path}' was written by gateify.save without an architecture: say which it holds "
                             f"with --arch NAME.")
        return args.arch, load(path, model=create_model(args.arch, **kwargs)), f"dense weights '{path}'"
    recorded = dict(arch.get("kwargs", {}))
    if args.arch and args.arch != arch["name"]:
        raise UsageError(f"'{path}' records architecture '{arch['name']}', not '{args.arch}'; drop --arch.")
    clashes = [f"--{key.replace('_', '-')} {value} (the file records {recorded[key]})"
               for key, value in kwargs.items() if key in recorded and recorded[key] != value]
    if clashes:
        raise UsageError(f"'{path}' records how its model was built; {', '.join(clashes)} cannot apply to its "
                         f"weights. Drop the option.")
    return arch["name"], load(path), f"dense weights '{path}' (architecture recorded in the file)"


def _convert(args: argparse.Namespace) -> int:
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    from_file = _is_file_argument(args.model)
    if args.arch and not from_file:
        raise UsageError(f"--arch is for a dense weights file given as MODEL; '{args.model}' is a model name "
                         f"already (use --weights FILE to load weights into it).")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"the folder of --out '{args.out}' does not exist; create it first.")
    from .conversion import convert
    from .io import load_dense, save
    from .models import create_model
    from .modes import gates

    if from_file:
        name, model, source = _dense_source(args, kwargs)
    else:
        name, model, source = args.model, create_model(args.model, **kwargs), "random weights"
        if args.weights:
            try:
                load_dense(model, args.weights)
            except GateifyError as e:
                raise type(e)(f"{e} On the command line: --num-classes N, --in-chans C.") from e
            source = f"dense weights '{args.weights}'"
    gated = convert(model, gate=args.gate)
    save(gated, args.out)
    print(f"{name}: gated {len(gates(gated))} residual blocks ({args.gate} gates) from {source}; "
          f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def _random_batch(model: "nn.Module", n: int, size: Optional[int], device: "torch.device") -> "torch.Tensor":
    import torch

    from .models import input_shape

    return torch.randn(n, *input_shape(model, size), generator=torch.Generator().manual_seed(0)).to(device)


def _load_gated_file(path: str) -> tuple["nn.Module", dict[str, str]]:
    """The model in a file written by gateify.save, in eval mode, and the file's metadata."""
    from .io import is_gateify_file, load, read_metadata

    metadata = read_metadata(path)  # the header only: load() reads the tensors
    if not is_gateify_file(metadata):
        raise UsageError(f"'{path}' holds weights not written by gateify (dense weights?); convert them first: "
                         f"gateify convert {path} --arch NAME --out gated.safetensors")
    return load(path).eval(), metadata


def _rule(gate: Any) -> str:
    """What decides for the gate's samples now: its threshold, or a fixed decision that ignores it."""
    if gate.mode == "static":
        return "static keep" if bool(gate.static_keep) else "static skip"
    if gate.mode == "dense":
        return "always keep"
    return f"{float(gate.threshold):.4g}"


def _info(args: argparse.Namespace) -> int:
    from .accounting import flops
    from .io import FORMAT_KEY
    from .models import architecture_of
    from .modes import gates
    from .routing import is_routed

    start = time.perf_counter()
    model, metadata = _load_gated_file(args.file)
    seconds = time.perf_counter() - start
    routed = is_routed(model)
    arch = architecture_of(model.network if routed else model)
    found = gates(model)
    print(f"file          {args.file} ({os.path.getsize(args.file):,} bytes, gateify file format "
          f"{metadata.get(FORMAT_KEY, '?')}, written by gateify {metadata.get('gateify_version', '?')}; "
          f"loaded, rebuilt and converted in {1e3 * seconds:.0f} ms)")
    print(f"architecture  {json.dumps(arch) if arch else 'not recorded'}")
    if routed:
        return _info_routed(model, args)
    if not found:
        print("gates         none: a plain (unconverted) model")
        return 0
    # the conversion's threshold/tau/noise are only where the gates started: each gate's own values are in force
    config = {k: v for k, v in next(iter(found.values())).config.to_dict().items()
              if k not in ("threshold", "tau", "noise")}
    print(f"gate config   {json.dumps(config)}")
    deciding = {name: float(g.threshold) for name, g in found.items() if g.mode not in ("static", "dense")}
    if not deciding:
        print("threshold     none in force: every gate is in static or dense mode")
    elif len(set(deciding.values())) == 1:
        print(f"threshold     {next(iter(deciding.values())):.4g} in force on every deciding gate (hard mode keeps "
              f"a sample when its keep probability is >= it)")
    else:
        print(f"threshold     per gate, {min(deciding.values()):.4g} to {max(deciding.values()):.4g}, in force as "
              f"listed below (hard mode keeps a sample when its keep probability is >= it)")
    import torch

    x = _random_batch(model, args.samples, args.input_size, torch.device("cpu"))
    report = flops(model, x)
    print(f"\n{'block':<24}{'mode':<8}{'threshold':>12}{'keep rate*':>12}{'branch MMACs':>14}")
    for block in report.blocks:
        print(f"{block.name:<24}{found[block.name].mode:<8}{_rule(found[block.name]):>12}{block.keep_rate:>12.3f}"
              f"{block.branch_flops / 2e6:>14.3f}")
    print(f"\nper image at {'x'.join(map(str, x.shape[1:]))} (1 MAC = 2 FLOPs):")
    print(f"  dense     {report.dense_macs / 1e6:12.3f} MMACs = {report.dense_flops / 1e6:12.3f} MFLOPs")
    print(f"  executed* {report.executed_macs / 1e6:12.3f} MMACs = {report.executed_flops / 1e6:12.3f} MFLOPs "
          f"({100 * report.executed_fraction:.1f}% of dense, gate overhead {report.gate_macs / 1e3:.1f} kMACs "
          f"included)")
    print(f"* executed FLOPs and keep rates depend on the data: these are for {args.samples} random N(0, 1) images,\n"
          f"  each gate in its saved mode ('auto' = hard in eval). Count yours with gateify.flops(model, batches).")
    return 0


def _info_routed(model: "nn.Module", args: argparse.Namespace) -> int:
    """``gateify info`` for a routed model: its paths, the threshold in routing's words, FLOPs on random inputs."""
    import torch

    from .accounting import flops

    x = _random_batch(model, args.samples, args.input_size, torch.device("cpu"))
    report = flops(model, x)
    dense, costs = model.segment_flops(x[:2])
    print(f"routing       {model.levels} nested static paths, cheapest first; every sample runs path 0, and goes "
          f"on to\n              path k from where it departs when path k-1's 1 - max softmax >= threshold[k-1]")
    print(f"threshold     {', '.join(f'{t:.4g}' for t in model.threshold.tolist())}")
    print(f"\n{'path':<6}{'blocks kept':>12}{'alone MMACs':>14}{'segment MMACs':>15}{'ended here*':>13}  removed")
    for k, path in enumerate(model.paths):
        alone = flops(model.path(k), x[:1]).dense_flops
        removed = [name for name, keep in path.items() if not keep]
        print(f"{k:<6}{sum(path.values()):>12}{alone / 2e6:>14.3f}{costs[k] / 2e6:>15.3f}"
              f"{100 * report.level_shares[k]:>12.1f}%  {', '.join(removed) or '-'}")
    print(f"\nper image at {'x'.join(map(str, x.shape[1:]))} (1 MAC = 2 FLOPs):")
    print(f"  dense     {report.dense_macs / 1e6:12.3f} MMACs = {report.dense_flops / 1e6:12.3f} MFLOPs")
    print(f"  executed* {report.executed_macs / 1e6:12.3f} MMACs = {report.executed_flops / 1e6:12.3f} MFLOPs "
          f"({100 * report.executed_fraction:.1f}% of dense; a sample going on pays path 0 and the deeper segment)")
    print(f"* executed FLOPs and path shares depend on the data: these are for {args.samples} random N(0, 1) images.\n"
          f"  Count yours with gateify.flops(model, batches); gateify.calibrate(model, val_batches, target) moves it.")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import copy

    import torch

    from .accounting import flops
    from .conversion import to_dense
    from .modes import gates, set_mode
    from .routing import is_routed
    from .timing import measure_latency

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device here; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _load_gated_file(args.file)
    routed = is_routed(model)
    if not routed and not gates(model):
        raise UsageError(f"'{args.file}' holds a plain model: there is no gated model to compare with; "
                         f"write one with 'gateify convert'.")
    if routed:  # routed models route in eval(), as saved: their threshold decides
        gated = model.to(device)
        dense = model.network
    else:
        gated = set_mode(copy.deepcopy(model), "hard").to(device)
        dense = to_dense(model).eval().to(device)
    x = _random_batch(model, args.batch_size, args.input_size, device)
    report = flops(gated, x)
    fns = {"dense": lambda: dense(x), "gated": lambda: gated(x)}
    if routed:
        cheapest = model.path(0).eval().to(device)
        fns["path 0"] = lambda: cheapest(x)
    with torch.inference_mode():
        ms = measure_latency(fns, device, args.warmup, args.repeats)
    threads = f", torch threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    print(f"{'x'.join(map(str, x.shape))} random inputs on {device}{threads}, median of {args.repeats} calls:")
    print(f"  dense model        {ms['dense']:9.2f} ms")
    if routed:
        shares = ", ".join(f"{100 * s:.0f}%" for s in report.level_shares)
        print(f"  routed             {ms['gated']:9.2f} ms  ({ms['gated'] / ms['dense']:.2f}x dense time; executed "
              f"FLOPs {100 * report.executed_fraction:.1f}% of dense; samples ending on each path: {shares})")
        print(f"  path 0 alone       {ms['path 0']:9.2f} ms  (every sample on the cheapest path, no second pass)")
        print("  routes are those of random data; on your images the paths taken (and speed-up) differ.")
        return 0
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

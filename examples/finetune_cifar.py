"""Fine-tune a ResNet with per-sample gates (CosineGate, gateify) and report accuracy next to realised FLOPs.

Dense model (trained here, or --init weights) -> gateify.convert -> gated fine-tuning with the gate regulariser
and distillation from the dense model -> hard-gated evaluation: accuracy, realised FLOPs saved (counted on the
test set, gate overhead included), routing diagnostics, the static twin -> metrics.json, log.csv, plots and
gated.safetensors in --out.

    python examples/finetune_cifar.py                                   # CIFAR-10 ResNet-20 recipe (needs the data)
    python examples/finetune_cifar.py --dataset digits --dense-epochs 30 --epochs 30 --out runs/digits  # offline
    python examples/finetune_cifar.py --baseline static ...             # the same budget, static depth pruning
    python examples/finetune_cifar.py --baseline dense ...              # the dense model trained as long
    python examples/finetune_cifar.py --baseline dense --epochs 0 ...   # the dense phase alone
    torchrun --nproc_per_node 2 examples/finetune_cifar.py ...          # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

import gateify
from gateify.data import DATASETS, DEFAULT_FIT, FITS, DataSplits, load_dataset
from gateify.models import input_shape
from gateify.regularizer import PRESETS, RegularizerConfig, config_with
from gateify.static import seed_gates
from gateify.training import Checkpoint, TrainConfig, evaluate, fit, recalibrate_batchnorm
from safetensors.torch import save_file
from timm.utils import ParseKwargs

_logger = logging.getLogger("finetune")

BASELINES = {"static": "static", "dense": "dense_continued"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=DATASETS,
                      help="cifar10 (python-batch layout in --data-dir), folder (ImageFolder train/ and val/ or "
                           "test/), animals-c (the offline benchmark: animal-mnist silhouettes, 80%% corrupted at "
                           "random severities), animals (the same, clean), digits-c (scikit-learn's digits at 28x28, "
                           "corrupted the same way), digits (the same, clean)")
    data.add_argument("--data-dir", default="data", help="dataset root (default: ./data)")
    data.add_argument("--download", action="store_true", help="fetch CIFAR-10 if missing (needs network)")
    data.add_argument("--input-size", type=int, default=None,
                      help="image size fed to the model (default: 32 for cifar10/digits, else the model's own)")
    data.add_argument("--fit", default=DEFAULT_FIT, choices=FITS,
                      help="images smaller than the input: pad (their pixels inside a centred zero border, as "
                           "MNIST-to-32 pipelines do) or stretch (upsampled, bilinear); larger ones are resized and "
                           "centre-cropped either way (default: %(default)s, see gateify.data.fit_to_size)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="resnet20", help="timm name, or torchvision:<name>")
    model.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="keywords for the model's constructor, as timm's train.py takes them (e.g. a ViT for "
                            "32x32: img_size=32 patch_size=4 embed_dim=96 depth=6 num_heads=3)")
    model.add_argument("--init", default=None, help="dense weights (safetensors) to start from; skips dense training")
    model.add_argument("--gate", default="controller", choices=("controller", "cir"),
                       help="controller: decided from the block input (saves compute); cir: paper-faithful, needs F(x)")
    model.add_argument("--gate-hidden", type=int, default=32, help="width of each gate's controller MLP")
    train = p.add_argument_group("training")
    train.add_argument("--dense-epochs", type=int, default=160, help="dense training epochs when no --init is given")
    train.add_argument("--dense-lr", type=float, default=0.1)
    train.add_argument("--epochs", type=int, default=60,
                       help="fine-tuning epochs (gated, static, dense; 0 with --baseline dense: dense phase only)")
    train.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate (controllers get x10)")
    train.add_argument("--batch-size", type=int, default=128, help="per process")
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument("--opt", choices=("sgd", "adamw"), default="sgd",
                       help="optimizer of both phases: SGD with Nesterov momentum, or AdamW (a ViT trained from "
                            "scratch; give it a smaller --dense-lr/--lr, e.g. 1e-3, and a larger --weight-decay)")
    train.add_argument("--grad-clip", type=float, default=5.0, help="gradient norm clipping of fine-tuning (0: off)")
    train.add_argument("--distill", type=float, default=1.0, help="weight of distillation from the dense model")
    train.add_argument("--method", default="static", choices=("static", "routed", "cascade", "gated"),
                       help="static (default; the strongest method measured, docs/results.md): the blocks to remove "
                            "for the preset's target, chosen on validation loss, removed for every sample (gateify."
                            "select_blocks + set_static; the same as --baseline static); routed: every sample starts "
                            "on a cheap static path of the model and the unsure ones continue on a deeper one "
                            "(gateify.route); cascade: the same paths as separately fine-tuned static models, the "
                            "cheap one distilled from the deep one (gateify.cascade; two weight sets, trained one "
                            "after the other); gated: CosineGate controllers per block (gateify.GateRegularizer)")
    train.add_argument("--preset", default="balanced", choices=sorted(PRESETS),
                       help="operating point: gateify.ROUTE_PRESETS (routed) or gateify.PRESETS (gated)")
    train.add_argument("--target", type=float, default=None,
                       help="executed FLOPs fraction to meet (default: the preset's); also the static baseline's")
    train.add_argument("--paths", default=None, metavar="F,F,...",
                       help="routed: executed FLOPs fractions of the nested paths, cheapest first (default: the "
                            "preset's)")
    train.add_argument("--targets", default="", metavar="F,F,...",
                       help="routed: more executed FLOPs fractions to calibrate to and report, from the same model")
    train.add_argument("--self-distill", type=float, default=None,
                       help="routed: distillation of the cheaper paths from the deepest (default: the preset's)")
    train.add_argument("--path-norms", action=argparse.BooleanOptionalAction, default=True,
                       help="routed: every deeper path keeps its own BatchNorm statistics after it departs "
                            "(gateify.route(path_norms=...); default on: one shared mixture fits no path)")
    train.add_argument("--survivors", type=float, default=None, metavar="F",
                       help="routed: a deeper path learns from the fraction F of each batch the cheaper path is "
                            "least sure of (gateify.RouteLoss(survivors=F)); default: from every sample")
    train.add_argument("--self-teacher", default=None, metavar="FILE",
                       help="static: also distil from this saved model (a cascade's deeper model), with weight "
                            "--self-distill (default 1): what a routed model's cheap path gets from its deep path")
    train.add_argument("--reg", action="append", default=[], metavar="KEY=VALUE",
                       help="gated: override a regulariser field of the preset, e.g. --reg granularity=block")
    train.add_argument("--baseline", default="none", choices=("none", *BASELINES),
                       help="none: the --method run; static: prune blocks statically to the target and fine-tune "
                            "as long; dense: continue the dense model as long")
    train.add_argument("--static-criterion", default="loss", choices=("loss", "keep_rate"))
    train.add_argument("--gate-init", default="keep", choices=("keep", "static"),
                       help="keep: gates start keeping everyone; static: gates start at the static selection for "
                            "the preset's target (the static baseline's depth) and learn per-sample deviations")
    train.add_argument("--gate-downsampling", action=argparse.BooleanOptionalAction, default=False,
                       help="gated: also gate blocks whose shortcut changes the activation's shape (a stage's first, "
                            "downsampling block); by default they keep every sample (gates pinned open, untrained)")
    train.add_argument("--static-floor", type=saving_share, default=0.75, metavar="R",
                       help="gated: remove outright the blocks a static selection removes for R of the target's "
                            "saving (gates pinned shut, untrained; with R > 0 the presets' keep floor is off unless "
                            "--reg min_keep=... sets it); the gates earn the rest per sample. 0: every block gated. "
                            "Default 0.75 (with pinned downsampling blocks: docs/results.md, issue 21)")
    train.add_argument("--calibrate", action="store_true",
                       help="gated: after fine-tuning, set the hard threshold so executed FLOPs meet the target on "
                            "validation images (gateify.calibrate; never on the test set). Routed runs always do.")
    train.add_argument("--recal-bn", action="store_true",
                       help="gated: after fine-tuning (and --calibrate), re-estimate BatchNorm statistics on the training "
                            "images under the hard decisions (gateify.training.recalibrate_batchnorm); metrics.json "
                            "keeps the accuracy before it too")
    train.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    train.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out", default="runs/finetune", help="output folder")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--eval-every", type=int, default=1, metavar="N",
                     help="evaluate on the test set every N epochs for log.csv (0: after the last epoch only)")
    return p


# ----------------------------------------------------------------------------------------------- setup


def setup_distributed(device: str) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return torch.device(device), 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device(device), rank, world


def loaders(data: DataSplits, args: argparse.Namespace, world: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    sampler = DistributedSampler(data.train, seed=args.seed) if world > 1 else None
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0,
                  pin_memory=args.device.startswith("cuda"))
    train = DataLoader(data.train, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=len(data.train) >= 4 * args.batch_size, **common)
    test = DataLoader(data.test, batch_size=256, **common)
    # choices made on data (static selection, thresholds, the static twin) use the validation split, never the test
    # set; at most 1024 images of it, so a large validation set does not slow every choice down
    val_idx = torch.randperm(len(data.val), generator=torch.Generator().manual_seed(args.seed))[:1024]
    val = DataLoader(Subset(data.val, val_idx.sort().values.tolist()), batch_size=256)
    return train, test, val


# ----------------------------------------------------------------------------------------------- phases


def train_dense(model: torch.nn.Module, train: DataLoader, test: DataLoader, args: argparse.Namespace,
                device: torch.device, world: int, log: list[dict[str, Any]]) -> torch.nn.Module:
    dense_path = os.path.join(args.out, "dense.safetensors")
    if args.init:
        gateify.load_dense(model, args.init)
        _logger.info("dense weights from %s", args.init)
        return model
    if args.resume and os.path.isfile(dense_path):
        gateify.load_dense(model, dense_path)
        _logger.info("dense model from %s (resumed)", dense_path)
        return model
    cfg = TrainConfig(epochs=args.dense_epochs, lr=args.dense_lr, weight_decay=args.weight_decay, amp=args.amp,
                      seed=args.seed, warmup_epochs=min(2.0, args.dense_epochs / 10), optimizer=args.opt)
    wrapped = DistributedDataParallel(model) if world > 1 else model

    def after(epoch: int, stats: dict[str, float]) -> dict[str, float]:
        if not logged_epoch(epoch, cfg.epochs, args):
            return {}
        result = evaluate(model, test, device, channels_last=channels_last(args))
        log.append({"phase": "dense", **stats, "test_acc": result.accuracy, "flops_saved": 0.0})
        write_log(log, args.out)
        return {"test_acc": result.accuracy}

    fit(wrapped, train, cfg, device, checkpoint=Checkpoint(os.path.join(args.out, "dense_checkpoint.safetensors")),
        resume=args.resume, on_epoch_end=after, channels_last=channels_last(args), progress_desc="dense")
    if is_main():
        gateify.save(model, dense_path)
    return model


def logged_epoch(epoch: int, epochs: int, args: argparse.Namespace) -> bool:
    """Whether epoch ``epoch`` (0-based) of ``epochs`` is evaluated for log.csv (--eval-every); the last always is."""
    return epoch + 1 == epochs or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0)


def channels_last(args: argparse.Namespace) -> bool:
    return args.device.startswith("cuda")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def saving_share(text: str) -> float:
    """--static-floor's value, checked while parsing: a bad one fails before any data is loaded or model trained."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a share of the target's saving in "
                                         f"[0, 1), e.g. 0.75 (0: every block gated)") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1): expected a share of the target's saving, "
                                         f"e.g. 0.75 (0: every block gated)")
    return value


def floats(text: Optional[str]) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def regularizer_config(args: argparse.Namespace) -> RegularizerConfig:
    """The gated preset with --target and --reg KEY=VALUE overrides (values parsed as JSON, else kept as strings)."""
    # a static floor replaces the presets' keep floor, which would push the gates it pins shut (docs/results.md)
    overrides: dict[str, Any] = {"min_keep": 0.0} if args.method == "gated" and args.static_floor else {}
    for item in args.reg:
        key, sep, value = item.partition("=")
        if not sep:
            raise gateify.GateifyError(f"--reg {item!r}: expected KEY=VALUE, e.g. --reg granularity=block.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if args.target is not None:
        overrides["target"] = args.target
    return config_with(args.preset, **overrides)


def route_preset(args: argparse.Namespace) -> gateify.RoutePreset:
    """The routing preset with --paths, --target and --self-distill overrides."""
    preset = gateify.ROUTE_PRESETS[args.preset]
    return gateify.RoutePreset(paths=tuple(floats(args.paths)) or preset.paths,
                               target=args.target if args.target is not None else preset.target,
                               self_distill=preset.self_distill if args.self_distill is None else args.self_distill)


def target_of(args: argparse.Namespace) -> float:
    """The executed FLOPs fraction this run aims at (the static baseline's budget too)."""
    if args.target is not None:
        return args.target
    return (gateify.ROUTE_PRESETS if args.method in ("routed", "static", "cascade") else PRESETS)[args.preset].target


def finetune(kind: str, dense: torch.nn.Module, data: DataSplits, train: DataLoader, test: DataLoader,
             val: DataLoader, args: argparse.Namespace, device: torch.device, world: int,
             log: list[dict[str, Any]]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune for ``args.epochs`` as ``kind`` (routed / gated / static / dense_continued); returns the model and
    facts. Every choice made on data (paths, static blocks, thresholds) uses the validation split."""
    teacher = copy.deepcopy(dense).eval() if args.distill > 0 else None
    facts: dict[str, Any] = {}
    regularizer = self_teacher = None
    self_distill = 0.0
    costs: Optional[gateify.CostModel] = None

    def tune(model: torch.nn.Module, self_teacher: Optional[torch.nn.Module], name: str) -> float:
        """Fine-tune ``model`` for ``args.epochs`` (the same recipe for every kind); returns the seconds it took."""
        model.train()
        # static mode leaves removed branches unused; a CIR gate never calls a controller
        unused = kind in ("static", "routed", "cascade") or (kind == "gated" and args.gate == "cir")
        wrapped = DistributedDataParallel(model, find_unused_parameters=unused) if world > 1 else model
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, amp=args.amp,
                          seed=args.seed + 1, distill_weight=args.distill, grad_clip=args.grad_clip,
                          self_distill=self_distill, survivors=args.survivors, optimizer=args.opt)

        def after(epoch: int, stats: dict[str, float]) -> dict[str, float]:
            if not logged_epoch(epoch, cfg.epochs, args):
                return {}
            result = evaluate(model, test, device, channels_last=channels_last(args))
            # FLOPs saved implied by the decisions (per-epoch logging; the final figure is counted by gateify.flops)
            saved = 1 - costs.fraction(result.keep_rate(), gates_run=kind == "gated") if costs else 0.0
            log.append({"phase": name, **stats, "test_acc": result.accuracy, "flops_saved": saved})
            write_log(log, args.out)
            return {"test_acc": result.accuracy, "flops_saved": saved}

        start = time.perf_counter()
        fit(wrapped, train, cfg, device, regularizer=regularizer, teacher=teacher, self_teacher=self_teacher,
            checkpoint=Checkpoint(os.path.join(args.out, f"checkpoint_{name}.safetensors")), resume=args.resume,
            on_epoch_end=None if kind == "routed" else after, channels_last=channels_last(args), progress_desc=name)
        return time.perf_counter() - start
    if kind == "dense_continued":
        model = copy.deepcopy(dense)
    else:
        torch.manual_seed(args.seed)  # controller init must not depend on whether the dense phase ran in this process
        model = gateify.convert(copy.deepcopy(dense), gate=args.gate, hidden=args.gate_hidden,
                                example_input=next(iter(val))[0][:2].to(device))
        report = gateify.flops(model, next(iter(val))[0].to(device))
        costs = gateify.CostModel.from_report(report)
        if kind == "gated":
            preset = regularizer_config(args)
            regularizer = gateify.GateRegularizer(model, report, preset)
            facts["regularizer"] = preset.to_dict()
            if args.gate_init == "static":
                start = gateify.select_blocks(model, val, preset.target, criterion=args.static_criterion)
                seed_gates(model, start)
                facts["gate_init_blocks"] = start
            pinned: dict[str, bool] = {}
            if args.static_floor:  # part of the saving from a static selection, the rest from per-sample gates
                floor = gateify.select_blocks(model, val, 1 - args.static_floor * (1 - preset.target),
                                              criterion=args.static_criterion, nearest=True)
                facts["static_floor_blocks"] = floor
                pinned.update({name: False for name, kept in floor.items() if not kept})
            if not args.gate_downsampling:
                pinned.update({name: True for name in gateify.reshaping_gates(model, next(iter(val))[0][:2].to(device))
                               if name not in pinned})
            if pinned:
                gateify.pin_gates(model, pinned)
                facts["pinned_closed"] = [name for name, keep in pinned.items() if not keep]
                facts["pinned_gates"] = [name for name, keep in pinned.items() if keep]
        elif kind in ("routed", "cascade"):
            plan = route_preset(args)
            paths = gateify.select_paths(model, val, plan.paths)
            self_distill = plan.self_distill
            if kind == "cascade":  # the deepest model first: it teaches the cheaper ones, as in routing
                members: list[torch.nn.Module] = []
                for level in reversed(range(len(paths))):
                    member = gateify.set_static(copy.deepcopy(model), paths[level])
                    for gate in gateify.gates(member).values():  # static mode: the controllers stay unused
                        gate.scorer.requires_grad_(False)
                    facts.setdefault("member_seconds", []).insert(0, tune(
                        member, self_teacher=members[0] if members else None, name=f"cascade{level}"))
                    members.insert(0, member.eval())
                model = gateify.cascade(members)
            else:
                model = gateify.route(model, paths, path_norms=args.path_norms, inplace=True)  # fit(): RouteLoss
            per_level = model.segment_flops(next(iter(val))[0][:2].to(device))[1]
            facts["route"] = {**plan.to_dict(), "paths_blocks": paths, "path_norms": args.path_norms,
                              "survivors": args.survivors, "paths_flops": [costs.static_fraction(p) for p in paths]}
            # what one training step costs per sample: every path, the common prefix once (forward MACs); a cascade
            # trained its members one after the other, each an epoch count of its own path
            facts["train_macs"] = sum(per_level) / 2
        else:  # static: the blocks to remove for the same FLOPs target
            keep = gateify.select_blocks(model, val, target_of(args), criterion=args.static_criterion, nearest=True)
            gateify.set_static(model, keep)
            facts["static_blocks"] = keep
            facts["train_macs"] = costs.static_fraction(keep) * costs.dense_flops / 2
            if args.self_teacher:
                self_teacher = gateify.load(args.self_teacher).to(device).eval()
                self_distill = 1.0 if args.self_distill is None else args.self_distill
                facts["self_teacher"] = {"file": args.self_teacher, "weight": self_distill}
        if kind != "gated":  # controllers stay unused: they must not wait for gradients (DDP) or decay
            for gate in gateify.gates(model).values():
                for p in gate.scorer.parameters():
                    p.requires_grad_(False)
    if kind != "cascade":  # a cascade's members were fine-tuned above, one after the other
        facts["finetune_seconds"] = tune(model, self_teacher, kind)
    if kind == "gated" and args.calibrate:
        facts["calibrated_threshold"] = gateify.calibrate(model, [x.to(device) for x, _ in val], target_of(args))
    if kind == "gated" and args.recal_bn:
        before = evaluate(model, test, device, channels_last=channels_last(args))
        facts["before_recal_bn"] = {"test_acc": before.accuracy,
                                    "flops_saved": 1 - costs.fraction(before.keep_rate(), gates_run=True)}
        recalibrate_batchnorm(model, DataLoader(data.calibration, batch_size=256), device)
    return model.eval(), facts


# ----------------------------------------------------------------------------------------------- reporting


def route_points(model: torch.nn.Module, test: DataLoader, val: DataLoader, args: argparse.Namespace,
                 device: torch.device, dense_macs: float) -> list[dict[str, Any]]:
    """One routed model at several operating points: the threshold calibrated on validation images for each target
    (then counted on the test set), and every path alone as the plain pruned model it is (``routed.path(k)``: its
    own FLOPs, no second pass)."""
    cl = channels_last(args)
    val_images = [x.to(device) for x, _ in val]
    test_images = [x for x, _ in test]
    alone = [model.path(k).eval() for k in range(model.levels)]
    fractions = [gateify.flops(m, test_images[0][:1]).executed_macs / dense_macs for m in alone]
    low, high = fractions[0], fractions[-1]
    # a target outside the paths' own FLOPs cannot be met by a threshold: those are left out, not forced
    targets = [target_of(args)] + [t for t in floats(args.targets) if t != target_of(args) and low <= t <= high]
    points, thresholds = [], []
    for target in targets:
        threshold = gateify.calibrate(model, val_images, target, max_error=1.0)
        thresholds.append(threshold)
        result = evaluate(model, test, device, channels_last=cl)
        counted = gateify.flops(model, test_images)
        points.append({"label": f"routed@{target:.2f}", "target": target, "threshold": threshold,
                       "test_acc": result.accuracy, "val_acc": evaluate(model, val, device, channels_last=cl).accuracy,
                       "flops_saved": 1 - counted.executed_macs / dense_macs, "executed_macs": counted.executed_macs,
                       "level_shares": result.level_shares(model.levels)})
    for k, path in enumerate(alone):
        executed = fractions[k] * dense_macs
        points.append({"label": f"path {k}", "target": None, "threshold": None,
                       "test_acc": evaluate(path, test, device, channels_last=cl).accuracy,
                       "val_acc": evaluate(path, val, device, channels_last=cl).accuracy,
                       "flops_saved": 1 - executed / dense_macs, "executed_macs": executed,
                       "level_shares": [float(j == k) for j in range(model.levels)]})
    model.threshold.fill_(thresholds[0])  # the saved model runs at the main target
    return points


def report(kind: str, model: torch.nn.Module, dense: torch.nn.Module, data: DataSplits, test: DataLoader,
           val: DataLoader, args: argparse.Namespace, device: torch.device, facts: dict[str, Any],
           source_acc: float) -> dict[str, Any]:
    cl = channels_last(args)
    test_images = [x for x, _ in test]
    dense_macs = gateify.flops(dense.eval(), test_images[:1]).dense_macs
    points = route_points(model, test, val, args, device, dense_macs) if kind in ("routed", "cascade") else None
    result = evaluate(model, test, device, channels_last=cl)
    counted = gateify.flops(model, test_images)
    metrics: dict[str, Any] = {
        "kind": kind, "model": args.model, "model_kwargs": args.model_kwargs, "dataset": args.dataset,
        "dataset_version": data.version,
        "input_size": data.input_size, "fit": data.fit, "method": args.method if args.baseline == "none" else None,
        "preset": args.preset if kind != "dense_continued" else None,
        "target": target_of(args) if kind != "dense_continued" else None,
        "gate": args.gate if kind == "gated" else None, "epochs": args.epochs, "optimizer": args.opt,
        "dense_epochs": 0 if args.init else args.dense_epochs, "test_acc": result.accuracy,
        "val_acc": evaluate(model, val, device, channels_last=cl).accuracy,
        "source_test_acc": source_acc, "dense_macs": dense_macs, "executed_macs": counted.executed_macs,
        "gate_macs": counted.gate_macs, "flops_saved": 1 - counted.executed_macs / dense_macs,
        "test_samples": counted.samples,
    }
    if points is not None:
        metrics["routed_points"] = points
    if gateify.gates(model):
        with gateify.gate_mode(model, "dense"):
            metrics["test_acc_dense"] = evaluate(model, test, device, channels_last=cl).accuracy
        metrics["keep_rate_per_block"] = result.keep_rate()
        metrics["minority_share_per_block"] = result.minority_share()
        metrics["keep_rate_per_class"] = result.keep_rate_per_class(data.num_classes)
        metrics["classes"] = list(data.classes)
        metrics["block_macs"] = {b.name: b.branch_flops / 2 for b in counted.blocks}
        if kind == "gated":
            twin_keep = gateify.static_twin(model, val)
            twin = copy.deepcopy(model)
            gateify.set_static(twin, twin_keep)
            metrics["static_twin_blocks"] = twin_keep
            metrics["static_twin_acc"] = evaluate(twin, test, device, channels_last=cl).accuracy
            metrics["static_twin_flops_saved"] = 1 - gateify.flops(twin, test_images[:1]).executed_macs / dense_macs
    elif gateify.is_routed(model):  # the fine-tuned weights with every block: what the paths share
        metrics["test_acc_dense"] = evaluate(model.network, test, device, channels_last=cl).accuracy
    else:
        metrics["test_acc_dense"] = result.accuracy
    metrics.update(facts)
    metrics.update(device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size,
                   torch=torch.__version__, python=platform.python_version(), command=" ".join(sys.argv),
                   world_size=dist.get_world_size() if dist.is_initialized() else 1)
    if is_main():  # what a cascade of separately trained models needs: their logits on validation and test images
        save_logits(model, val, test, device, cl, os.path.join(args.out, "logits.safetensors"))
    return metrics


def save_logits(model: torch.nn.Module, val: DataLoader, test: DataLoader, device: torch.device, cl: bool,
                path: str) -> None:
    out = {}
    with torch.no_grad(), gateify.evaluating(model):
        for name, loader in (("val", val), ("test", test)):
            fmt = torch.channels_last if cl else torch.contiguous_format
            out[f"{name}_logits"] = torch.cat([model(x.to(device, memory_format=fmt)).float().cpu() for x, _ in loader])
            out[f"{name}_labels"] = torch.cat([y for _, y in loader])
    save_file(out, path)


def write_json_atomically(obj: Any, path: str) -> None:
    """``obj`` as JSON through a temporary name and an atomic rename: a kill never leaves half a file at ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_log(log: list[dict[str, Any]], out: str) -> None:
    """log.csv after every epoch (rank 0), so a killed run keeps what it logged."""
    if not is_main():
        return
    keys = list(dict.fromkeys(k for row in log for k in row))
    with open(os.path.join(out, "log.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(log)


def plot(metrics: dict[str, Any], log: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(log) + 1)
    ax.plot(epochs, [100 * r["test_acc"] for r in log], label="test accuracy (%)")
    ax.plot(epochs, [100 * r.get("flops_saved", 0.0) for r in log], label="FLOPs saved (%)")
    for i, (a, b) in enumerate(zip(log, log[1:])):
        if a["phase"] != b["phase"]:
            ax.axvline(i + 1.5, color="grey", ls=":")
    ax.set_xlabel("epoch (dense, then fine-tuning)")
    ax.set_title(f"{metrics['model']} on {metrics['dataset']}: {metrics['kind']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_flops.png"), dpi=120)
    plt.close(fig)
    rates = metrics.get("keep_rate_per_block")
    if not rates:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rates)), 3.5))
    ax.bar(range(len(rates)), list(rates.values()))
    ax.set_xticks(range(len(rates)), list(rates), rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("keep rate (test set, hard gates)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "keep_rate.png"), dpi=120)
    plt.close(fig)
    per_class = metrics["keep_rate_per_class"]
    grid = torch.tensor([per_class[b] for b in rates]).T
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rates)), 0.3 * len(metrics["classes"]) + 1.5))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(rates)), list(rates), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(metrics["classes"])), metrics["classes"], fontsize=7)
    fig.colorbar(im, ax=ax, label="keep rate")
    ax.set_title("keep rate per class and block")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "keep_rate_per_class.png"), dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns metrics (also written to --out/metrics.json)."""
    device, rank, world = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    kind = BASELINES.get(args.baseline, args.method)
    size = args.input_size or (32 if args.dataset in ("cifar10", "digits") else None)
    if size is None:
        size = input_shape(gateify.create_model(args.model, **args.model_kwargs))[-1]
    data = load_dataset(args.dataset, args.data_dir, size, download=args.download, fit=args.fit)
    train, test, val = loaders(data, args, world)
    model = gateify.create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans,
                                 **args.model_kwargs).to(device)
    if channels_last(args):
        model = model.to(memory_format=torch.channels_last)
    log: list[dict[str, Any]] = []
    log_path = os.path.join(args.out, "log.csv")
    if args.resume and os.path.isfile(log_path):
        with open(log_path) as f:
            log = [{k: (float(v) if k != "phase" else v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    dense = train_dense(model, train, test, args, device, world, log)
    source_acc = evaluate(dense, test, device, channels_last=channels_last(args)).accuracy
    _logger.info("dense source model: test accuracy %.4f", source_acc)
    finetuned, facts = finetune(kind, dense, data, train, test, val, args, device, world, log)
    metrics = report(kind, finetuned, dense, data, test, val, args, device, facts, source_acc)
    if world > 1:
        digest = sum(float(t.double().sum()) for t in finetuned.state_dict().values() if t.is_floating_point())
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "test_acc": metrics["test_acc"], "state_sum": digest}, f)
    if is_main():
        write_log(log, args.out)
        gateify.save(finetuned, os.path.join(args.out, f"{kind}.safetensors"))
        if not args.no_plots:
            plot(metrics, log, args.out)
        # last, and whole or not at all: a sweep's --resume takes a run folder with metrics.json as finished
        write_json_atomically(metrics, os.path.join(args.out, "metrics.json"))
        summary = (f"{kind}: test accuracy {100 * metrics['test_acc']:.2f}% (source {100 * source_acc:.2f}%), "
                   f"realised FLOPs saved {100 * metrics['flops_saved']:.1f}% of {metrics['dense_macs'] / 1e6:.1f}M "
                   f"MACs per image (counted on {metrics['test_samples']} test images, "
                   f"{'second passes' if kind in ('routed', 'cascade') else 'gate overhead'} included)")
        if "static_twin_acc" in metrics:
            summary += (f"; static twin {100 * metrics['static_twin_acc']:.2f}% at "
                        f"{100 * metrics['static_twin_flops_saved']:.1f}% saved")
        print(summary)
        print(f"outputs in {args.out}: metrics.json, log.csv, {kind}.safetensors" + ("" if args.no_plots else ", *.png"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except gateify.GateifyError as e:  # a refusal with its remedy; no traceback needed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

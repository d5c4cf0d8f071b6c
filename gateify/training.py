"""A small training helper: epochs with an optional gate regulariser and teacher, checkpoints, resume, evaluation.

Plain PyTorch users do not need it (see :class:`gateify.GateRegularizer`); the example scripts use it. It handles:
SGD with per-step cosine decay, gradient clipping, knowledge distillation from a teacher, AMP and channels_last
on CUDA, DistributedDataParallel models, a NaN/inf guard, and checkpoints written atomically every epoch as
safetensors (model, optimizer and gradient-scaler state, progress: nothing is pickled), so a killed run resumes
losing at most one epoch. Data order and Gumbel noise are seeded per epoch, so with the data loaded in the main
process (``num_workers=0``) a resumed run repeats the uninterrupted one exactly; worker processes draw their own
augmentations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .errors import TrainingError
from .io import atomic_save, check_fits, read_safetensors
from .modes import gates, evaluating, record_decisions, unwrap
from .regularizer import GateRegularizer, distill_loss
from .routing import RouteLoss, is_routed

__all__ = ["TrainConfig", "Checkpoint", "EvalResult", "evaluate", "fit", "distill_loss", "make_optimizer",
           "recalibrate_batchnorm"]

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training phase. ``lr`` decays with a per-step cosine to 0 over ``epochs``."""

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    self_distill: float = 1.0  # routed: cheaper paths distilled from the deepest; others: weight of fit's self_teacher
    survivors: Optional[float] = None  # routed: fraction of each batch a deeper path learns from (RouteLoss)
    controller_lr_mult: float = 10.0
    warmup_epochs: float = 0.0
    amp: bool = False
    seed: int = 0
    optimizer: str = "sgd"  # or "adamw": decoupled weight decay, what transformers trained from scratch are given

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer={self.optimizer!r}: choose one of {list(OPTIMIZERS)}.")


#: TrainConfig.optimizer -> how it is built from parameter groups (momentum/nesterov are SGD's)
OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr),
}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (SGD or AdamW); no weight decay on 1-D parameters (norms, biases, layer scales); gate
    controllers at ``controller_lr_mult`` x lr."""
    controller = {id(p) for g in gates(model).values() for p in g.parameters()}  # gates() looks through DDP
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in controller, p.ndim <= 1), []).append(p)
    params = [{"params": ps, "lr": cfg.lr * (cfg.controller_lr_mult if ctrl else 1.0),
               "weight_decay": 0.0 if flat else cfg.weight_decay} for (ctrl, flat), ps in sorted(groups.items())]
    for group in params:
        group["initial_lr"] = group["lr"]
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def _set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress_epochs: float) -> None:
    if progress_epochs < cfg.warmup_epochs:
        scale = (progress_epochs + 1e-3) / cfg.warmup_epochs
    else:
        done = (progress_epochs - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        scale = 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scale


class Checkpoint:
    """Model + optimizer state + progress in one safetensors file (JSON metadata for the non-tensor parts)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, info: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        state = optimizer.state_dict()
        plain: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    plain.setdefault(str(index), {})[key] = value
        meta = {"epoch": epoch, "info": info, "param_groups": state["param_groups"], "optimizer_plain": plain}
        atomic_save(tensors, self.path, {"gateify_checkpoint": json.dumps(meta)})

    def load(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[int, dict[str, Any]]:
        """Restore in place; returns ``(epochs done, info)``."""
        tensors, metadata = read_safetensors(self.path)
        try:
            meta = json.loads(metadata["gateify_checkpoint"])
        except (KeyError, json.JSONDecodeError) as e:
            raise TrainingError(f"'{self.path}' is not a gateify training checkpoint ({type(e).__name__}: {e}); "
                                f"delete it to start over, or point --out at another folder.") from e
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        check_fits(model, model_state, self.path, hint="Was it written with other --model/--dataset flags? Delete "
                    "it to start over, or point --out at another folder.")  # before anything is copied
        model.load_state_dict(model_state, strict=True)
        if optimizer is not None:
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, values in meta["optimizer_plain"].items():
                state.setdefault(int(index), {}).update(values)
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return int(meta["epoch"]), meta["info"]


@dataclass
class EvalResult:
    """Accuracy and, for a gated model, each test sample's hard decision per block; for a routed model, the path
    each test sample ended on."""

    accuracy: float
    labels: torch.Tensor
    predictions: torch.Tensor
    decisions: Optional[torch.Tensor] = None  # (N, blocks) bool
    blocks: list[str] = field(default_factory=list)
    levels: Optional[torch.Tensor] = None  # (N,) int64, routed models

    def level_shares(self, levels: int) -> list[float]:
        """Fraction of the samples that ended on each of ``levels`` paths (routed models)."""
        if self.levels is None:
            return []
        return (torch.bincount(self.levels, minlength=levels).float() / len(self.levels)).tolist()

    def keep_rate(self) -> dict[str, float]:
        if self.decisions is None:
            return {}
        return dict(zip(self.blocks, self.decisions.float().mean(0).tolist()))

    def minority_share(self) -> dict[str, float]:
        """Per block, the fraction of samples whose decision differs from the block's majority decision.

        0 everywhere means the gates collapsed into static depth pruning; per-sample routing shows as > 0.
        """
        if self.decisions is None:
            return {}
        rate = self.decisions.float().mean(0)
        return dict(zip(self.blocks, torch.minimum(rate, 1 - rate).tolist()))

    def keep_rate_per_class(self, num_classes: int) -> dict[str, list[float]]:
        if self.decisions is None:
            return {}
        out = {}
        for b, name in enumerate(self.blocks):
            d = self.decisions[:, b].float()
            out[name] = [float(d[self.labels == c].mean()) if (self.labels == c).any() else float("nan")
                         for c in range(num_classes)]
        return out

    def majority(self) -> dict[str, bool]:
        if self.decisions is None:
            return {}
        return dict(zip(self.blocks, (self.decisions.float().mean(0) >= 0.5).tolist()))


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, channels_last: bool = False) -> EvalResult:
    """Accuracy as inference computes it, with every sample's gate decisions: in ``eval()``, gates in ``"auto"`` or
    ``"gumbel"`` mode evaluated in ``"hard"`` mode (``"hard"``, ``"dense"``, ``"static"`` gates as they are)."""
    module = unwrap(model)
    found = gates(module)
    routed = is_routed(module)
    labels, preds, decisions, levels = [], [], [], []
    with torch.no_grad(), evaluating(module), record_decisions(module):
        for x, y in loader:
            x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            if routed:
                logits, level = module.forward_routes(x)
                levels.append(level.cpu())
            else:
                logits = module(x)
            preds.append(logits.argmax(1).cpu())
            labels.append(y.cpu())
            if found:
                decisions.append(torch.stack([g.last.gate.detach().bool().cpu() for g in found.values()], 1))
    labels_t, preds_t = torch.cat(labels), torch.cat(preds)
    return EvalResult(float((labels_t == preds_t).float().mean()), labels_t, preds_t,
                      torch.cat(decisions) if decisions else None, list(found),
                      torch.cat(levels) if levels else None)


def recalibrate_batchnorm(model: nn.Module, loader: Any, device: torch.device, *,
                          max_batches: Optional[int] = None) -> dict[str, int]:
    """Re-estimate every BatchNorm's running statistics on ``loader`` under the decisions inference makes.

    In ``"gumbel"`` training every branch runs on the whole batch, so a branch's BatchNorm statistics mix the samples
    its gate keeps with those it skips; at inference only the kept ones enter it. This re-estimates the running mean
    and variance of every ``_BatchNorm`` as a cumulative average (``momentum=None``) over ``loader``'s images, each
    branch on the samples its gate keeps (DS-Net, slimmable networks). The decisions are those of inference: a first
    pass in ``eval()`` with the current statistics records every controller's logits, and the second pass (BatchNorm
    in training mode, gates in ``"hard"`` mode, those in ``"static"``/``"dense"`` mode as they are) replays them, so
    that batch statistics cannot move a decision. No gradient, no parameter changes. A BatchNorm that no sample
    reached keeps its previous statistics. Modes, train/eval flags and momenta are restored.

    Returns:
        ``{BatchNorm module name: batches it saw}``.
    """
    module = unwrap(model)
    norms = {name: m for name, m in module.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for name, m in norms.items()}
    found = gates(module)
    modes = {name: g.mode for name, g in found.items()}
    flags = {m: m.training for m in module.modules()}
    images = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images.append((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in found}
    handles = []
    try:
        for g in found.values():
            if g.mode in ("auto", "gumbel"):
                g.mode = "hard"
        scorers = {name: g.scorer for name, g in found.items() if g.scorer.decides_from_input}
        module.eval()
        handles = [s.register_forward_hook(lambda m, i, o, name=name: logits[name].append(o.detach()))
                   for name, s in scorers.items()]
        with torch.no_grad():
            for x in images:  # the decisions inference makes, with the statistics the model has now
                module(x)
        for h in handles:
            h.remove()
        replay = {name: iter(v) for name, v in logits.items()}
        handles = [s.register_forward_hook(lambda m, i, o, name=name: next(replay[name]))
                   for name, s in scorers.items()]
        module.train()
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts the same
        with torch.no_grad():
            for x in images:
                module(x)
    finally:
        for h in handles:
            h.remove()
        for name, g in found.items():
            g.mode = modes[name]
        for m, flag in flags.items():
            m.training = flag
        for name, m in norms.items():
            m.momentum = saved[name][3]
    seen = {}
    for name, m in norms.items():
        seen[name] = int(m.num_batches_tracked)
        if seen[name] == 0:  # nobody ran this branch: keep what it had
            m.running_mean.copy_(saved[name][0])
            m.running_var.copy_(saved[name][1])
            m.num_batches_tracked.copy_(saved[name][2])
    return seen


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _finite_or_raise(loss: torch.Tensor, epoch: int, step: int, checkpoint: Optional[Checkpoint]) -> None:
    if not torch.isfinite(loss.detach()).all():
        kept = (f"the last good checkpoint is kept at '{checkpoint.path}'" if checkpoint is not None and
                checkpoint.exists() else "no checkpoint had been written yet")
        raise TrainingError(f"the loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; {kept}. "
                            f"Lower --lr, keep gradient clipping on, or check the data for NaN/inf values.")


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    cfg: TrainConfig,
    device: torch.device,
    *,
    regularizer: Optional[GateRegularizer] = None,
    teacher: Optional[nn.Module] = None,
    self_teacher: Optional[nn.Module] = None,
    checkpoint: Optional[Checkpoint] = None,
    resume: bool = False,
    on_epoch_end: Optional[Callable[[int, dict[str, float]], dict[str, float]]] = None,
    channels_last: bool = False,
    progress_desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` for ``cfg.epochs`` epochs; returns one dict of statistics per epoch run here.

    ``regularizer`` adds the gate regulariser's terms (controller gates). A routed model (:func:`gateify.route`)
    trains every path on every sample with a :class:`RouteLoss` built from ``cfg`` (label smoothing, distillation
    weight and temperature, self-distillation): the teacher's logits are distilled into every path.
    ``self_teacher`` (another model, e.g. the deeper model of a cascade) is distilled in as well, with weight
    ``cfg.self_distill``: what a routed model's cheap path gets from its deep path, for a fair comparison. ``on_epoch_end(epoch,
    stats)`` may evaluate and return more statistics to log; it runs before the epoch's checkpoint is written. With ``resume`` and an existing checkpoint, training restarts after its last epoch.
    """
    from tqdm import tqdm

    routing = (RouteLoss(model, distill_weight=cfg.distill_weight, temperature=cfg.distill_temperature,
                         self_distill=cfg.self_distill, label_smoothing=cfg.label_smoothing, survivors=cfg.survivors)
               if is_routed(model) else None)
    if self_teacher is not None:
        self_teacher.eval()
    optimizer = make_optimizer(model, cfg)
    start = 0
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    if resume and checkpoint is not None and checkpoint.exists():
        start, info = checkpoint.load(unwrap(model), optimizer)
        if info.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(info["scaler"])
        _logger.info("resumed from '%s' after epoch %d", checkpoint.path, start)
    autocast = dict(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                    enabled=cfg.amp)
    steps = len(train_loader)
    history: list[dict[str, float]] = []
    if teacher is not None:
        teacher.eval()
    # modules the caller put in eval() inside a model in train() (a frozen BatchNorm) stay in eval() every epoch
    frozen = [m for m in model.modules() if not m.training] if model.training else []
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # Gumbel noise and augmentation: same draws after a resume
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        for m in frozen:
            m.training = False
        totals = {"loss": 0.0, "task": 0.0, "flops_term": 0.0, "consistency": 0.0, "flops_fraction": 0.0,
                  "correct": 0.0, "seen": 0.0}
        bar = tqdm(train_loader, desc=f"{progress_desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (_is_main() and sys.stderr.isatty()))
        for step, (x, y) in enumerate(bar):
            progress = (epoch + step / steps) / cfg.epochs
            _set_lr(optimizer, cfg, epoch + step / steps)
            if regularizer is not None:
                regularizer.step(progress)
            x = x.to(device, non_blocking=True,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(**autocast):
                teacher_logits = None
                if teacher is not None and cfg.distill_weight > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x).float()
                if routing is not None:
                    terms = routing(x, y, teacher_logits)
                    task, logits = terms.total, terms.logits
                else:
                    logits = model(x)
                    task = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    if teacher_logits is not None:
                        task = task + cfg.distill_weight * distill_loss(logits.float(), teacher_logits,
                                                                        cfg.distill_temperature)
                    if self_teacher is not None and cfg.self_distill > 0:
                        with torch.no_grad():
                            deeper = self_teacher(x).float()
                        task = task + cfg.self_distill * distill_loss(logits.float(), deeper, cfg.distill_temperature)
            if regularizer is not None:
                terms = regularizer(task.float())
                loss = terms.total
                totals["flops_term"] += float(terms.flops) * len(y)
                totals["consistency"] += float(terms.consistency) * len(y)
                totals["flops_fraction"] += float(terms.flops_fraction) * len(y)
            else:
                loss = task.float()
            _finite_or_raise(loss, epoch, step, checkpoint)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            totals["loss"] += float(loss.detach()) * len(y)
            totals["task"] += float(task.detach()) * len(y)
            totals["correct"] += float((logits.argmax(1) == y).sum())
            totals["seen"] += len(y)
            bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.3f}")
        seen = totals.pop("seen")
        stats = {"epoch": epoch + 1, "train_acc": totals.pop("correct") / seen,
                 **{k: v / seen for k, v in totals.items()}}
        if regularizer is None:
            for key in ("flops_term", "consistency", "flops_fraction"):
                stats.pop(key)
        else:
            stats.update(flops_weight=regularizer.flops_weight, tau=regularizer.schedule(progress)["tau"],
                         noise=regularizer.schedule(progress)["noise"])
        if dist.is_initialized():  # DDP syncs gradients, not BatchNorm statistics: take rank 0's everywhere
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, 0)
        if on_epoch_end is not None:
            stats.update(on_epoch_end(epoch, stats))
        if checkpoint is not None and _is_main():
            checkpoint.save(unwrap(model), optimizer, epoch + 1,
                            {"stats": stats, "scaler": scaler.state_dict()})
        if dist.is_initialized():
            dist.barrier()
        history.append(stats)
        _logger.info("%s epoch %d/%d %s", progress_desc, epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k != "epoch"))
    return history


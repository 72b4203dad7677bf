"""The training loop: the DeiT recipe on timm's parts, from one CPU to many GPUs (DDP).

`train(cfg)` runs one run in `cfg.output` (docs/internals.md lists the folder's files) and reads top
to bottom: where the run starts, data and model, the recipe's parts, resumption, then epochs of
batches, each epoch ending with evaluation and a checkpoint.

Exact resumption: every epoch reseeds all random generators from (seed, epoch, rank), and a checkpoint
written mid-epoch (on SIGINT/SIGTERM) carries the generators' states and the position in the epoch,
so `resume="auto"` continues as if never stopped (exactly so for in-memory data on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

import spach
from spach.device import amp_dtype as parse_amp
from spach.device import autocast
from spach.errors import SpachError, first_line
from spach.files import (
    FolderLock,
    append_jsonl,
    atomic_save,
    atomic_write_text,
    check_writable,
    read_json,
)
from spach.models.choice import export_choices, restore_choices
from spach.plugins import import_plugins
from spach.train import checkpoint
from spach.train.config import TrainConfig, config_dict, scores_epoch, warmup_note
from spach.train.data import (
    Data,
    SkipSampler,
    build_data,
    canonical_dataset,
    train_sampler,
)
from spach.train.evaluate import PREDICTIONS_FILE, checked, evaluate, save_predictions
from spach.train.factory import build_model, check_model_name
from spach.train.logs import open_logs, resolve_log
from spach.train.progress import Progress
from spach.train.runtime import (
    Dist,
    StopFlag,
    max_mem_mb,
    rng_state,
    seed_all,
    set_rng_state,
    setup,
    stop_on_signals,
)


class Deadline(SpachError):
    """A run stopped because `cfg.deadline` passed; its checkpoint is saved and `resume="auto"` continues it."""


@dataclass
class TrainState:
    """Where a run stands; a checkpoint carries it beside the weights."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps into the current epoch (non-zero only in a mid-epoch checkpoint)
    updates: int = 0  # optimizer steps so far: the schedule's clock
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    partial: list[float] | None = None  # an interrupted epoch's running sums (see `_epoch`)
    rng: dict[str, Any] | None = None  # this rank's generators at the interruption
    elapsed: float = 0.0  # seconds of training and evaluation so far


@dataclass
class Parts:
    """What the recipe is made of, built once per run."""

    model: nn.Module
    ddp: nn.Module  # the model as trained (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    sched: CosineLRScheduler
    mixup: Mixup | None
    criterion: nn.Module
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler  # enabled only for fp16
    amp: torch.dtype | None
    data: Data
    steps: int  # optimizer steps per epoch


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue, with `cfg.resume`) one training run in `cfg.output`; returns its summary.

    The run folder is owned by this process while it trains (a second `train` on it fails at once).
    Safe to call many times in one process: it leaves no process group, signal handler, lock or global
    setting behind (the random generators are reseeded, as a training run must)."""
    canonical_dataset(cfg.dataset)
    import_plugins(cfg.imports, "--imports")  # before the model's name is checked: a plugin may register it
    check_model_name(cfg.model)
    check_writable(cfg.output, "--output", "folder")
    d = setup(cfg.device)
    out = Path(cfg.output)
    try:
        with FolderLock(out, "run folder") if d.main else contextlib.nullcontext(), stop_on_signals() as stop:
            return _train(cfg, d, out, stop, on_epoch_end)
    except SpachError as e:
        raise type(e)(first_line(e)) from None
    finally:
        d.close()


def _train(cfg: TrainConfig, d: Dist, out: Path, stop: StopFlag, on_epoch_end: Callable | None) -> dict[str, Any]:
    progress = Progress(cfg.progress, d.main, cfg.log_interval)

    # --- where the run starts: fresh, from its last checkpoint, or already finished
    resume_path = checkpoint.resume_point(cfg, out)
    ckpt = checkpoint.load_resumable(resume_path) if resume_path else None
    if ckpt is not None:
        checkpoint.check_same_model(ckpt, cfg, resume_path)
        summary = read_json(out / "summary.json")
        if ckpt["epoch"] >= cfg.epochs and isinstance(summary, dict):
            if d.main:
                print(f"{out} already finished its {ckpt['epoch']} epoch(s) (best top-1 {summary.get('best_top1', 0):.2f}); "
                      f"nothing to train: raise --epochs to continue it", file=sys.stderr, flush=True)
            return summary

    if cfg.deadline and time.time() >= cfg.deadline:
        raise Deadline(f"{out}: not started, its deadline has passed")

    # --- data and model
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, _pretrained_cfg(cfg), d.device, d.rank, d.world)
    model = build_model(cfg, data.num_classes, data.in_chans, data.img_size).to(d.device)
    steps = len(data.train_loader(train_sampler(data.train_size, cfg, d.rank, d.world)))
    if steps == 0:
        raise SpachError(f"{data.train_size} training images make no full batch of {cfg.batch_size} per process; lower --batch-size")

    # --- the recipe's parts: optimizer, schedule, Mixup/CutMix, loss, EMA, precision
    total_batch = cfg.batch_size * d.world
    lr = cfg.lr * total_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    p = _make_parts(cfg, d, model, data, steps, lr)

    # --- resumption: weights, optimizer and EMA state, where the run stood
    state = TrainState()
    if ckpt is not None:
        _restore(p, state, ckpt, d)
        progress.line(f"resuming {out} at epoch {state.epoch + 1}, step {state.step}")

    # --- the run folder: the resolved config and the epochs so far
    params = sum(t.numel() for t in model.parameters())
    resolved = dict(lr=lr, total_batch=total_batch, world_size=d.world, num_classes=data.num_classes, in_chans=data.in_chans,
                    img_size=data.img_size, device=str(d.device), amp=str(p.amp).replace("torch.", "") if p.amp else "off",
                    params=params, steps_per_epoch=steps, tensor_data_path=data.tensor_path, spach_version=spach.__version__,
                    log=resolve_log(cfg.log), **({"warmup_note": warmup_note(cfg)} if warmup_note(cfg) else {}))
    if d.main:
        if warmup_note(cfg):  # not a progress line: said whatever --progress is
            print(f"note: {warmup_note(cfg)}", file=sys.stderr, flush=True)
        atomic_write_text(out / "config.json", json.dumps({**config_dict(cfg), "resolved": resolved}, indent=2) + "\n")
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
        progress.line(f"training {cfg.model} ({params / 1e6:.2f}M params) on {canonical_dataset(cfg.dataset)} "
                      f"({data.train_size} images, {steps} steps/epoch x {cfg.epochs} epochs, batch {total_batch}, "
                      f"lr {lr:.2e}, {d.device}{', ' + resolved['amp'] if p.amp else ''}"
                      f"{f', {d.world} processes' if d.world > 1 else ''}) -> {out}")

    # --- the epochs
    run_logs = open_logs(resolved["log"] if d.main else "none", out, config_dict(cfg), first_epoch=state.epoch + 1)
    try:
        for epoch in range(state.epoch, cfg.epochs):
            sums = _epoch(cfg, d, p, state, epoch, stop, progress, out)
            record = _end_epoch(cfg, d, p, state, epoch, sums, out, progress)
            run_logs.epoch(record)
            if d.main and on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        run_logs.close()
    if d.main and cfg.save_format == "safetensors":  # the final weights (checkpoint.pth, for --resume, stays torch)
        checkpoint.save_weights(p.model.state_dict(), {"args": config_dict(cfg), "epoch": state.epoch,
                                "top1": state.history[-1]["top1"] if state.history else None}, out / "final", cfg.save_format)
    return checkpoint.summarize(cfg, state.history, state.best_top1, state.elapsed, params, out, write=d.main)


def _make_parts(cfg: TrainConfig, d: Dist, model: nn.Module, data: Data, steps: int, lr: float) -> Parts:
    amp = parse_amp(cfg.amp, d.device, training=True)
    extra = {"eps": cfg.opt_eps} if cfg.opt_eps and "adam" in cfg.opt.lower() else {}
    if d.device.type == "cpu" and cfg.opt.lower() in ("adam", "adamw"):
        extra["fused"] = True  # one kernel over all parameters: 2-4 ms of a small model's CPU step
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra)
    sched = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps),
                              warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                  mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=data.num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else \
        LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)
    ddp = model
    if d.world > 1:
        # the depthwise CPE weight (C, 1, 3, 3) gets grads of equivalent but differently written strides
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return Parts(model, ddp, optimizer, sched, mixup, criterion, ema, scaler, amp, data, steps)


def _restore(p: Parts, state: TrainState, ckpt: dict[str, Any], d: Dist) -> None:
    p.model.load_state_dict(ckpt["model"])
    p.optimizer.load_state_dict(ckpt["optimizer"])
    if p.ema is not None and "model_ema" in ckpt:
        p.ema.module.load_state_dict(ckpt["model_ema"])
    if p.scaler.is_enabled() and ckpt.get("scaler"):
        p.scaler.load_state_dict(ckpt["scaler"])
    for f in dataclasses.fields(TrainState):
        if f.name in ckpt:
            setattr(state, f.name, ckpt[f.name])
    restore_choices(ckpt.get("kernels"))  # continue with the kernels the run measured before it stopped
    rank_rng = ckpt.get("rng_per_rank")
    state.rng = rank_rng[d.rank] if rank_rng and d.rank < len(rank_rng) else None


def _epoch(cfg: TrainConfig, d: Dist, p: Parts, state: TrainState, epoch: int, stop: StopFlag, progress: Progress,
           out: Path) -> list[float]:
    """One epoch of training steps (from `state.step` when resuming mid-epoch). Returns the running
    sums [loss x images, images, seconds of training, skipped bad images]."""
    start = state.step
    if start and state.rng is not None:
        set_rng_state(state.rng, p.data.generator)
    else:
        seed_all(cfg.seed, epoch, d.rank, p.data.generator)
    sampler = train_sampler(p.data.train_size, cfg, d.rank, d.world)
    sampler.set_epoch(epoch)
    loader = p.data.train_loader(SkipSampler(sampler, start * cfg.batch_size) if start else sampler)
    sums = list(state.partial) if start and state.partial else [0.0, 0.0, 0.0, 0.0]
    p.sched.step_update(state.updates)
    p.ddp.train()
    progress.start(epoch, cfg.epochs, p.steps, start)
    t0 = time.time()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    for step, (x, y) in enumerate(checked(loader), start=start):
        # the batch (a skipped bad image can make it odd, which Mixup cannot pair)
        sums[3] += cfg.batch_size - len(x)
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if p.mixup is not None:
            if len(x) % 2:
                x, y = x[:-1], y[:-1]
            x, y = p.mixup(x, y)
        # forward, and a stop for a non-finite loss or a signal, agreed by every rank
        loss = step_loss(p.ddp, p.criterion, x, y, d.device, p.amp)
        loss_value = loss.item()
        late = bool(cfg.deadline) and time.time() >= cfg.deadline
        flags = d.all_max(torch.tensor([0.0 if math.isfinite(loss_value) else 1.0, float(stop.set), float(late)], device=d.device))
        if flags[0] > 0:
            kept = f"the last good checkpoint (epoch {state.epoch}{f' step {state.step}' if state.step else ''}) is kept in " \
                f"{out}" if (out / "checkpoint.pth").is_file() else f"no checkpoint had been written to {out} yet"
            raise SpachError(f"loss became {loss_value} at epoch {epoch + 1} step {step + 1}; stopped, {kept}; "
                             "lower --lr, set --clip-grad or use --amp off")
        # backward and update (the scaler is a no-op unless fp16)
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
        if cfg.clip_grad:
            p.scaler.unscale_(p.optimizer)
            nn.utils.clip_grad_norm_(p.model.parameters(), cfg.clip_grad)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        state.updates += 1
        if p.ema is not None:
            p.ema.update(p.model, step=state.updates)
        p.sched.step_update(state.updates)
        sums[0] += loss_value * len(x)
        sums[1] += len(x)
        progress.step(step, loss_value, p.optimizer.param_groups[0]["lr"])
        if flags[1] > 0 or flags[2] > 0:
            sums[2] += time.time() - t0
            _interrupt(cfg, d, p, state, epoch, step + 1, sums, progress, out, late=not flags[1] > 0)
    progress.close()
    sums[2] += time.time() - t0
    return sums


def step_loss(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              amp: torch.dtype | None) -> torch.Tensor:
    """The training loss of one batch: the forward pass under autocast, the loss in fp32 (a bf16 loss
    keeps 8 bits: the logged losses, and the battle's statistics on them, would be rounded)."""
    with autocast(device, amp):
        out = model(x)
    return criterion(out.float(), y)


def _end_epoch(cfg: TrainConfig, d: Dist, p: Parts, state: TrainState, epoch: int, sums: list[float], out: Path,
               progress: Progress) -> dict[str, Any]:
    """Evaluate, record the epoch, save the checkpoint (and `best.pth` when the top-1 improved)."""
    t_eval = time.time()
    train_sums = d.all_sum(torch.tensor(sums[:2], dtype=torch.float64, device=d.device))
    train_time = d.all_max(torch.tensor([sums[2]], dtype=torch.float64, device=d.device)).item()
    distributed = d.world > 1
    last = epoch + 1 == cfg.epochs
    record: dict[str, Any] = {
        "epoch": epoch + 1, "train_loss": train_sums[0].item() / max(train_sums[1].item(), 1.0),
        "lr": p.optimizer.param_groups[0]["lr"], "images_per_s": train_sums[1].item() / max(train_time, 1e-9),
    }
    unscored = 0.0
    if scores_epoch(cfg, epoch + 1):  # --eval-every: the weights are the same whether an epoch is scored or not
        val = evaluate(p.model, progress.evaluating(p.data.val_loader, f"testing on {p.data.val_size} images"), d.device,
                       p.amp, distributed=distributed, predictions=last)
        if last:  # every test image's prediction, for paired per-image statistics across runs (the battle's)
            save_predictions(d, val, out / PREDICTIONS_FILE)
        record.update(val_loss=val["loss"], top1=val["top1"], top5=val["top5"])
        if p.data.train_eval_loader is not None:
            te = evaluate(p.model, progress.evaluating(p.data.train_eval_loader, "evaluating on a training subset"),
                          d.device, p.amp, distributed=distributed)
            record.update(train_eval_loss=te["loss"], train_eval_top1=te["top1"])
        if p.ema is not None:
            ema = evaluate(p.ema.module, progress.evaluating(p.data.val_loader, "testing the EMA weights"), d.device,
                           p.amp, distributed=distributed)
            record.update(ema_top1=ema["top1"], ema_val_loss=ema["loss"])
        unscored = p.data.val_size - val["n"]
    bad = d.all_sum(torch.tensor([sums[3]], dtype=torch.float64, device=d.device)).item() + unscored
    if bad:
        record["skipped_images"] = int(bad)
    record.update(epoch_time=train_time + time.time() - t_eval, max_mem_mb=max_mem_mb(d.device))
    state.elapsed += record["epoch_time"]
    state.epoch, state.step, state.partial, state.rng = epoch + 1, 0, None, None
    state.history.append(record)
    improved = "top1" in record and record["top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, record.get("top1", -1.0))
    if d.main:
        _save(cfg, p, state, out)
        append_jsonl(out / "metrics.jsonl", record)
        if improved:
            checkpoint.save_weights(p.model.state_dict(), {"args": config_dict(cfg), "epoch": epoch + 1, "top1": record["top1"]},
                                    out / "best", cfg.save_format)
        scores = (f" val_loss {record['val_loss']:.4f} top1 {record['top1']:.2f} top5 {record['top5']:.2f}"
                  if "top1" in record else " (not scored: --eval-every)")
        extra = f" train_eval_loss {record['train_eval_loss']:.4f}" if "train_eval_loss" in record else ""
        progress.line(f"epoch {epoch + 1}/{cfg.epochs} train_loss {record['train_loss']:.4f}{scores}{extra} lr {record['lr']:.2e} "
                      f"{record['images_per_s']:.0f} img/s {record['epoch_time']:.1f}s")
    return record


def _save(cfg: TrainConfig, p: Parts, state: TrainState, out: Path, rng: list | None = None) -> None:
    ckpt = {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(), "args": config_dict(cfg),
            "kernels": export_choices(), **{k: v for k, v in dataclasses.asdict(state).items() if k != "rng"}}
    if p.ema is not None:
        ckpt["model_ema"] = p.ema.module.state_dict()
    if p.scaler.is_enabled():
        ckpt["scaler"] = p.scaler.state_dict()
    if rng is not None:
        ckpt["rng_per_rank"] = rng
    atomic_save(ckpt, out / "checkpoint.pth")


def _interrupt(cfg: TrainConfig, d: Dist, p: Parts, state: TrainState, epoch: int, step: int, sums: list[float],
               progress: Progress, out: Path, late: bool = False) -> None:
    """Save the run mid-epoch (position, running sums, every rank's generators) and stop: KeyboardInterrupt
    for a stop signal, `Deadline` when `cfg.deadline` passed (`late`)."""
    progress.close()
    rng = rng_state(p.data.generator)
    if d.world > 1:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if d.main:
        _save(cfg, p, dataclasses.replace(state, epoch=epoch, step=step, partial=list(sums)), out, rng=gathered)
        why = "the deadline passed" if late else "interrupted"
        print(f"{why}: saved {out / 'checkpoint.pth'} at epoch {epoch + 1} step {step}; "
              f"continue with --resume auto", file=sys.stderr, flush=True)
    if late:
        raise Deadline(f"{out}: stopped at its deadline at epoch {epoch + 1} step {step} (checkpoint saved; --resume auto "
                       "continues it)")
    raise KeyboardInterrupt


def _pretrained_cfg(cfg: TrainConfig) -> dict[str, Any]:
    """The model's resize/crop/mean/std, for image folders (building on the meta device costs nothing)."""
    if canonical_dataset(cfg.dataset) != "imagefolder":
        return {}
    try:
        with torch.device("meta"):
            return dict(build_model(dataclasses.replace(cfg, pretrained=""), 1000, 3, cfg.img_size).pretrained_cfg)
    except Exception:  # an unknown or broken model fails with its own message when it is built for real
        return {}


"""Training and evaluation: the DeiT recipe on timm's parts, from one CPU to many GPUs (DDP).

`train(cfg)` runs one run in `cfg.output` (see docs/internals.md for the folder's files). Exact
resumption: every epoch reseeds all random generators from (seed, epoch, rank), and a checkpoint
written mid-epoch (on SIGINT/SIGTERM) carries the generators' states and the position in the epoch,
so `resume="auto"` continues as if never stopped (exactly so for in-memory data on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from spach import checkpoint
from spach.data import SkipSampler, build_data, canonical_dataset, train_sampler
from spach.errors import CheckpointError, SpachError


def _knob(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every training knob; the defaults are the paper's (DeiT) ImageNet recipe. Flat and JSON-serialisable."""

    # model
    model: str = _knob("spach_ms_xxs_patch4_224_conv", "model: a zoo name ('spach models'), 'spach' (built from --model-kwargs only) or any timm model name", group="model")
    model_kwargs: dict = _knob({}, "architecture overrides as JSON, e.g. '{\"net_arch\": [[[\"conv\",1]],[[\"attn\",1]]], \"hidden_dim\": 16}'", group="model")
    pretrained: str = _knob("", "start from this checkpoint (official or spach); a head for another class count is re-initialised (fine-tuning)", group="model")
    drop_path: float = _knob(0.1, "stochastic depth rate", group="model")
    drop: float = _knob(0.0, "dropout rate", group="model")
    # data
    dataset: str = _knob("imagefolder", "imagefolder (train/ and val/ class folders), fashion-mnist (fmnist), cifar10, cifar100, or tiny (built-in toy set)", group="data")
    data_path: str = _knob("", "data folder (fashion-mnist defaults to /usr/share/datasets/fashion-mnist)", group="data")
    img_size: int = _knob(0, "training and evaluation resolution (0: the dataset's own for in-memory sets, the model's for folders)", group="data")
    mean: list = _knob([], "normalisation mean per channel (empty: the dataset's own, or the model's for folders)", group="data")
    std: list = _knob([], "normalisation std per channel (empty: as --mean)", group="data")
    train_subset: int = _knob(0, "train on this many training images only, a fixed random subset (0: all)", group="data")
    val_subset: int = _knob(0, "validate on this many validation images only, a fixed random subset (0: all)", group="data")
    eval_train_subset: int = _knob(0, "also evaluate each epoch on this many training images, un-augmented (train_eval_loss/top1; 0: off)", group="data")
    workers: int = _knob(4, "data loader worker processes for image folders (in-memory sets load in the main process)", group="data")
    skip_bad_images: bool = _knob(False, "count and skip unreadable images instead of failing", group="data")
    # recipe
    epochs: int = _knob(300, "training epochs", group="recipe")
    batch_size: int = _knob(128, "batch size per process (the paper: 1024 in all)", group="recipe")
    eval_batch_size: int = _knob(0, "evaluation batch size per process (0: --batch-size)", group="recipe")
    lr: float = _knob(5e-4, "base learning rate; the actual lr is lr x total batch / --lr-base-size", group="recipe")
    lr_base_size: int = _knob(512, "batch size at which --lr applies (0: use --lr as is)", group="recipe")
    min_lr: float = _knob(1e-5, "final lr of the cosine schedule", group="recipe")
    warmup_lr: float = _knob(1e-6, "lr at the start of the linear warm-up", group="recipe")
    warmup_epochs: float = _knob(20, "warm-up epochs", group="recipe")
    opt: str = _knob("adamw", "optimizer (any timm.optim name)", group="recipe")
    opt_eps: float = _knob(1e-8, "optimizer epsilon", group="recipe")
    momentum: float = _knob(0.9, "momentum (SGD-type optimizers)", group="recipe")
    weight_decay: float = _knob(0.05, "weight decay (not on norms, biases, gamma, position embeddings)", group="recipe")
    clip_grad: float = _knob(0.0, "clip the gradient norm to this (0: off)", group="recipe")
    smoothing: float = _knob(0.1, "label smoothing", group="recipe")
    mixup: float = _knob(0.8, "Mixup alpha (0: off)", group="recipe")
    cutmix: float = _knob(1.0, "CutMix alpha (0: off)", group="recipe")
    mixup_prob: float = _knob(1.0, "probability of mixing a batch", group="recipe")
    mixup_switch_prob: float = _knob(0.5, "probability of CutMix rather than Mixup when both are on", group="recipe")
    mixup_mode: str = _knob("batch", "mix per batch, pair or elem", group="recipe")
    aa: str = _knob("rand-m9-mstd0.5-inc1", "RandAugment policy in timm's notation ('none': off)", group="recipe")
    color_jitter: float = _knob(0.4, "colour jitter strength (0: off)", group="recipe")
    train_interpolation: str = _knob("bicubic", "resize interpolation of the training crops (image folders)", group="recipe")
    scale: list = _knob([0.08, 1.0], "random-resized-crop area range", group="recipe")
    ratio: list = _knob([3 / 4, 4 / 3], "random-resized-crop aspect range", group="recipe")
    hflip: float = _knob(0.5, "horizontal flip probability", group="recipe")
    reprob: float = _knob(0.25, "random erasing probability", group="recipe")
    remode: str = _knob("pixel", "random erasing fill: const, rand or pixel", group="recipe")
    recount: int = _knob(1, "random erasing count", group="recipe")
    repeated_aug: int = _knob(3, "repeated augmentation: each image this many times per epoch, across processes (1: off)", group="recipe")
    model_ema: bool = _knob(True, "keep an EMA of the weights (ModelEmaV3); its top-1 is logged as ema_top1", group="recipe")
    model_ema_decay: float = _knob(0.99996, "EMA decay", group="recipe")
    amp: str = _knob("auto", "mixed precision: auto (bf16 or fp16 on GPU, off on CPU), bf16, fp16 or off", group="recipe")
    # run
    output: str = _knob("runs/train", "run folder (config, metrics, checkpoints)", group="run")
    resume: str = _knob("", "'auto': continue the run in --output if there is one; or a checkpoint path to continue from", group="run")
    seed: int = _knob(0, "random seed", group="run")
    device: str = _knob("auto", "auto, cpu, cuda or cuda:N", group="run")
    progress: str = _knob("auto", "auto (a bar on a terminal, periodic lines otherwise), bar, lines or none", group="run")
    log_interval: int = _knob(50, "steps between progress lines", group="run")
    tensorboard: bool = _knob(False, "also log to TensorBoard in the run folder (needs the tensorboard package)", group="run")
    preset: str = _knob("", "named small-data preset, recorded here (see 'spach train --preset')", group="run")


# Settings that may change when a run is resumed; any other difference means another run.
RESUMABLE_CHANGES = {"resume", "workers", "progress", "log_interval", "tensorboard", "epochs", "device", "eval_batch_size", "output"}
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ------------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def _setup(device: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then join the group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SpachError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpachError(f"device {device} asked for, but no CUDA GPU is available; use --device cpu")
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if world > 1 else 0
    return _Dist(rank, world, dev, owns)


# ------------------------------------------------------------------------------------ randomness
def _seed_all(seed: int, epoch: int, rank: int) -> None:
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int = 0) -> nn.Module:
    """A spach model (zoo name or "spach"), or any timm model as an outside baseline (img_size 0: the model's own)."""
    import spach
    import timm

    kw = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if img_size:
        kw["img_size"] = img_size
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    if cfg.model == "spach" or cfg.model in spach.list_models() or cfg.model not in timm.list_models():
        return spach.create_model(cfg.model, pretrained=cfg.pretrained or None, **kw)
    extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.pretrained)) if cfg.pretrained else {}
    try:
        return timm.create_model(cfg.model, **kw, **extra)
    except TypeError:  # a model without an img_size argument (most CNNs)
        kw.pop("img_size", None)
        return timm.create_model(cfg.model, **kw, **extra)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_CHOICES:
        raise SpachError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str, amp_dtype: torch.dtype | None = None,
             distributed: bool = False) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 (%) of `model` over `loader` (summed over ranks when
    `distributed`, each rank holding its own shard). Also `n`, the number of images seen."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in _checked(loader):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), hit[:, :1].sum().double(),
                             hit.sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if distributed and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "n": int(sums[3].item())}


def _checked(loader: Any) -> Iterator[Any]:
    """Iterate a loader, turning a worker's multi-line re-raised SpachError back into one line."""
    try:
        yield from loader
    except SpachError as e:
        raise type(e)(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if "\n" not in msg:
        return msg
    last = msg.splitlines()[-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last


# ------------------------------------------------------------------------------------ signals
class _StopFlag:
    """SIGINT/SIGTERM set `.set` (the loop saves at the next step boundary); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.set = False
        self.signum = 0

    def __call__(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield flag
        return
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if flag.set:  # arrived after the last training step (e.g. during the final evaluation): the run is saved
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------ progress
class _Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise (rank 0 only)."""

    def __init__(self, mode: str, enabled: bool, interval: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.interval = max(1, interval)
        self.bar: Any = None

    def start(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.t0, self.done0 = epoch, epochs, total, time.time(), done
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)

    def step(self, i: int, loss: float, lr: float) -> None:
        if self.mode == "bar":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.mode == "lines" and (i + 1) % self.interval == 0:
            rate = (i + 1 - self.done0) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - i - 1) / max(rate, 1e-9)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {i + 1}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if self.mode != "none":
            print(text, flush=True)


def _max_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process, KiB on Linux


# ------------------------------------------------------------------------------------ run folder
def _check_run_folder(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, if any; refuses a folder that holds another run."""
    ckpt = out / "checkpoint.pth"
    explicit = cfg.resume not in ("", "auto")
    if explicit and not Path(cfg.resume).is_file():
        raise SpachError(f"--resume {cfg.resume}: no such checkpoint file; pass a checkpoint.pth or 'auto'")
    if out.exists() and not out.is_dir():
        raise SpachError(f"output {out} is a file, not a folder; choose another --output")
    saved = out / "config.json"
    if not saved.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise SpachError(f"output folder {out} already holds other files; choose an empty or new --output")
        return Path(cfg.resume) if explicit else None
    try:
        old = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SpachError(f"{saved} is unreadable; choose another --output") from None
    old.pop("resolved", None)
    new = config_dict(cfg)
    differ = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if differ:
        raise SpachError(f"output folder {out} holds a different run (it differs in {', '.join(differ[:4])}); "
                         f"choose another --output")
    if explicit:
        return Path(cfg.resume)
    if not ckpt.is_file():
        return None  # the earlier run stopped before its first checkpoint: start again
    if cfg.resume != "auto":
        raise SpachError(f"output folder {out} already holds this run; pass --resume auto to continue it, or choose another --output")
    return ckpt


def _check_same_model(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    args = ckpt.get("args") or {}
    mine = config_dict(cfg)
    for key in ("model", "model_kwargs"):
        if key in args and args[key] != mine[key]:
            raise CheckpointError(f"checkpoint {path} is of another model ({key} {args[key]!r}, not {mine[key]!r}); "
                                  f"pass the matching --model, or another --output/--resume")


# ------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue, with `cfg.resume`) one training run in `cfg.output`; returns its summary.

    Safe to call many times in one process: it leaves no process group, signal handler or global
    setting behind (the random generators are reseeded, as a training run must)."""
    canonical_dataset(cfg.dataset)
    d = _setup(cfg.device)
    try:
        with _stop_on_signals() as stop:
            return _Run(cfg, d, stop, on_epoch_end).run()
    except SpachError as e:
        raise type(e)(_one_line(e)) from None
    finally:
        if d.owns_group:
            dist.destroy_process_group()


class _Run:
    def __init__(self, cfg: TrainConfig, d: _Dist, stop: _StopFlag, on_epoch_end: Callable | None):
        self.cfg, self.d, self.stop, self.on_epoch_end = cfg, d, stop, on_epoch_end
        self.out = Path(cfg.output)
        self.progress = _Progress(cfg.progress, d.main, cfg.log_interval)

    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        amp_dtype = _amp_dtype(cfg.amp, d.device)
        if cfg.mixup_mode not in ("batch", "pair", "elem"):
            raise SpachError(f"unknown --mixup-mode {cfg.mixup_mode!r}; choose batch, pair or elem")
        resume_path = _check_run_folder(cfg, self.out)
        ckpt = checkpoint.load(resume_path) if resume_path else None
        if ckpt is not None:
            _check_same_model(ckpt, cfg, resume_path)
        if ckpt is not None and ckpt["epoch"] >= cfg.epochs and (self.out / "summary.json").is_file():
            return json.loads((self.out / "summary.json").read_text())

        torch.manual_seed(cfg.seed)
        import spach

        pcfg = self._pretrained_cfg()
        data = build_data(cfg, pcfg, d.device, d.rank, d.world)
        model = build_model(cfg, data.num_classes, data.in_chans, data.img_size).to(d.device)
        params = sum(p.numel() for p in model.parameters())
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        if mixing and cfg.batch_size % 2:
            raise SpachError(f"Mixup/CutMix need an even --batch-size (got {cfg.batch_size})")
        steps = len(data.train_loader(train_sampler(data.train_size, cfg, d.rank, d.world)))
        if steps == 0:
            raise SpachError(f"{data.train_size} training images make no full batch of {cfg.batch_size} per process; lower --batch-size")

        total_batch = cfg.batch_size * d.world
        lr = cfg.lr * total_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                        **({"eps": cfg.opt_eps} if cfg.opt_eps and "adam" in cfg.opt.lower() else {}))
        sched = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps),
                                  warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                      mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=data.num_classes) if mixing else None
        criterion = SoftTargetCrossEntropy() if mixing else \
            LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        scaler = torch.amp.GradScaler(d.device.type) if amp_dtype == torch.float16 else None

        state = dict(epoch=0, step=0, updates=0, best_top1=-1.0, history=[], partial=None, rng=None, elapsed=0.0)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ema is not None and "model_ema" in ckpt:
                ema.module.load_state_dict(ckpt["model_ema"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            state.update({k: ckpt[k] for k in state if k in ckpt})
            rank_rng = ckpt.get("rng_per_rank")
            state["rng"] = rank_rng[d.rank] if rank_rng and d.rank < len(rank_rng) else None
            if d.main:
                self.progress.line(f"resuming {self.out} at epoch {state['epoch'] + 1}, step {state['step']}")
        ddp_model = model
        if d.world > 1:
            # the depthwise CPE weight (C, 1, 3, 3) gets grads of equivalent but differently written strides
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

        resolved = dict(lr=lr, total_batch=total_batch, world_size=d.world, num_classes=data.num_classes, in_chans=data.in_chans,
                        img_size=data.img_size, device=str(d.device), amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                        params=params, steps_per_epoch=steps, tensor_data_path=data.tensor_path, spach_version=spach.__version__)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(self.out / "config.json", json.dumps({**config_dict(cfg), "resolved": resolved}, indent=2) + "\n")
            checkpoint.atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
            self.progress.line(f"training {cfg.model} ({params / 1e6:.2f}M params) on {canonical_dataset(cfg.dataset)} "
                               f"({data.train_size} images, {steps} steps/epoch x {cfg.epochs} epochs, batch {total_batch}, "
                               f"lr {lr:.2e}, {d.device}{', ' + resolved['amp'] if amp_dtype else ''}{f', {d.world} processes' if d.world > 1 else ''}) -> {self.out}")
        tb = self._tensorboard()

        self.parts = dict(model=model, ddp=ddp_model, optimizer=optimizer, sched=sched, mixup=mixup, criterion=criterion,
                          ema=ema, scaler=scaler, amp=amp_dtype, data=data, params=params, resolved=resolved)
        try:
            for epoch in range(state["epoch"], cfg.epochs):
                record = self._epoch(epoch, state, steps)
                if tb is not None:
                    for k, v in record.items():
                        if k != "epoch" and isinstance(v, (int, float)):
                            tb.add_scalar(k, v, epoch + 1)
                if d.main and self.on_epoch_end is not None:
                    self.on_epoch_end(record)
        finally:
            if tb is not None:
                tb.close()
        return self._summary(state, params)

    def _pretrained_cfg(self) -> dict[str, Any]:
        if canonical_dataset(self.cfg.dataset) != "imagefolder":
            return {}
        try:  # the resize/crop/mean/std to evaluate with; building on the meta device costs nothing
            with torch.device("meta"):
                return dict(build_model(dataclasses.replace(self.cfg, pretrained=""), 1000, 3, 0).pretrained_cfg)
        except Exception:
            return {}

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.d.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.progress.line("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _epoch(self, epoch: int, state: dict[str, Any], steps: int) -> dict[str, Any]:
        cfg, d, p = self.cfg, self.d, self.parts
        model, ddp, optimizer, sched = p["model"], p["ddp"], p["optimizer"], p["sched"]
        start = state["step"]
        if start and state["rng"] is not None:
            _set_rng_state(state["rng"])
        else:
            _seed_all(cfg.seed, epoch, d.rank)
        sampler = train_sampler(p["data"].train_size, cfg, d.rank, d.world)
        sampler.set_epoch(epoch)
        loader = p["data"].train_loader(SkipSampler(sampler, start * cfg.batch_size) if start else sampler)
        # running sums: loss x images, images, seconds of training, skipped bad images (kept across a mid-epoch resume)
        sums = list(state["partial"]) if start and state["partial"] else [0.0, 0.0, 0.0, 0.0]
        sched.step_update(state["updates"])
        ddp.train()
        self.progress.start(epoch, cfg.epochs, steps, start)
        t0 = time.time()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        step = start
        for step, (x, y) in enumerate(_checked(loader), start=start):
            sums[3] += cfg.batch_size - len(x)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)  # no-op for in-memory sets
            if p["mixup"] is not None:
                if len(x) % 2:  # a skipped bad image made the batch odd
                    x, y = x[:-1], y[:-1]
                x, y = p["mixup"](x, y)
            with _autocast(d.device, p["amp"]):
                loss = p["criterion"](ddp(x), y)
            loss_value = loss.item()
            flags = d.all_max(torch.tensor([0.0 if math.isfinite(loss_value) else 1.0, float(self.stop.set)], device=d.device))
            if flags[0] > 0:
                last = f"epoch {state['epoch']}" + (f" step {state['step']}" if state["step"] else "")
                raise SpachError(f"loss became {loss_value} at epoch {epoch + 1} step {step + 1}; stopped, the last good checkpoint "
                                 f"({last}) is kept in {self.out}; lower --lr, set --clip-grad or use --amp off")
            optimizer.zero_grad(set_to_none=True)
            if p["scaler"] is not None:
                p["scaler"].scale(loss).backward()
                if cfg.clip_grad:
                    p["scaler"].unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                p["scaler"].step(optimizer)
                p["scaler"].update()
            else:
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
            state["updates"] += 1
            if p["ema"] is not None:
                p["ema"].update(model, step=state["updates"])
            sched.step_update(state["updates"])
            sums[0] += loss_value * len(x)
            sums[1] += len(x)
            self.progress.step(step, loss_value, optimizer.param_groups[0]["lr"])
            if flags[1] > 0:
                sums[2] += time.time() - t0
                self._interrupt(epoch, step + 1, sums, state)
        self.progress.close()
        sums[2] += time.time() - t0
        return self._end_epoch(epoch, sums, state)

    def _end_epoch(self, epoch: int, sums: list[float], state: dict[str, Any]) -> dict[str, Any]:
        cfg, d, p = self.cfg, self.d, self.parts
        t_eval = time.time()
        train_sums = d.all_sum(torch.tensor(sums[:2], dtype=torch.float64, device=d.device))
        train_time = d.all_max(torch.tensor([sums[2]], dtype=torch.float64, device=d.device)).item()
        val = evaluate(p["model"], p["data"].val_loader, d.device, p["amp"], distributed=d.world > 1)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": train_sums[0].item() / max(train_sums[1].item(), 1.0),
            "val_loss": val["loss"], "top1": val["top1"], "top5": val["top5"],
            "lr": p["optimizer"].param_groups[0]["lr"], "images_per_s": train_sums[1].item() / max(train_time, 1e-9),
        }
        if p["data"].train_eval_loader is not None:
            te = evaluate(p["model"], p["data"].train_eval_loader, d.device, p["amp"], distributed=d.world > 1)
            record.update(train_eval_loss=te["loss"], train_eval_top1=te["top1"])
        if p["ema"] is not None:
            ema = evaluate(p["ema"].module, p["data"].val_loader, d.device, p["amp"], distributed=d.world > 1)
            record.update(ema_top1=ema["top1"], ema_val_loss=ema["loss"])
        bad = d.all_sum(torch.tensor([sums[3]], dtype=torch.float64, device=d.device)).item() + p["data"].val_size - val["n"]
        if bad:
            record["skipped_images"] = int(bad)
        record.update(epoch_time=train_time + time.time() - t_eval, max_mem_mb=_max_mem_mb(d.device))
        state["elapsed"] += record["epoch_time"]
        state.update(epoch=epoch + 1, step=0, partial=None, rng=None)
        state["history"].append(record)
        improved = record["top1"] > state["best_top1"]
        if improved:
            state["best_top1"] = record["top1"]
        if d.main:
            self._save(state, rng=None)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                checkpoint.atomic_save({"model": p["model"].state_dict(), "args": config_dict(cfg), "epoch": epoch + 1,
                                        "top1": record["top1"]}, self.out / "best.pth")
            extra = f" train_eval_loss {record['train_eval_loss']:.4f}" if "train_eval_loss" in record else ""
            self.progress.line(f"epoch {epoch + 1}/{cfg.epochs} train_loss {record['train_loss']:.4f} val_loss {record['val_loss']:.4f} "
                               f"top1 {record['top1']:.2f} top5 {record['top5']:.2f}{extra} lr {record['lr']:.2e} "
                               f"{record['images_per_s']:.0f} img/s {record['epoch_time']:.1f}s")
        return record

    def _save(self, state: dict[str, Any], rng: list | None) -> None:
        p = self.parts
        ckpt = {"model": p["model"].state_dict(), "optimizer": p["optimizer"].state_dict(), "args": config_dict(self.cfg),
                **{k: state[k] for k in ("epoch", "step", "updates", "best_top1", "history", "partial", "elapsed")}}
        if p["ema"] is not None:
            ckpt["model_ema"] = p["ema"].module.state_dict()
        if p["scaler"] is not None:
            ckpt["scaler"] = p["scaler"].state_dict()
        if rng is not None:
            ckpt["rng_per_rank"] = rng
        checkpoint.atomic_save(ckpt, self.out / "checkpoint.pth")

    def _interrupt(self, epoch: int, step: int, sums: list[float], state: dict[str, Any]) -> None:
        """Save the run mid-epoch (position, running sums, every rank's generators) and stop."""
        self.progress.close()
        rng = _rng_state()
        if self.d.world > 1:
            gathered: list[Any] = [None] * self.d.world
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if self.d.main:
            self._save({**state, "epoch": epoch, "step": step, "partial": list(sums)}, rng=gathered)
            print(f"interrupted: saved {self.out / 'checkpoint.pth'} at epoch {epoch + 1} step {step}; "
                  f"continue with --resume auto", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    def _summary(self, state: dict[str, Any], params: int) -> dict[str, Any]:
        hist = state["history"]
        last = hist[-1] if hist else {}
        summary = {
            "model": self.cfg.model, "best_top1": state["best_top1"], "final_top1": last.get("top1"), "final_top5": last.get("top5"),
            "final_val_loss": last.get("val_loss"), "final_train_loss": last.get("train_loss"),
            "epochs": len(hist), "wall_time_s": state["elapsed"], "params": params,
            "images_per_s": sum(r["images_per_s"] for r in hist) / max(len(hist), 1), "output": str(self.out),
        }
        if "train_eval_loss" in last:
            summary.update(final_train_eval_loss=last["train_eval_loss"], final_train_eval_top1=last["train_eval_top1"])
        if "ema_top1" in last:
            summary["final_ema_top1"] = last["ema_top1"]
        if self.d.main:
            checkpoint.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


# ------------------------------------------------------------------------------------ spach eval
def evaluate_checkpoint(model: str | None, pretrained: str, data_path: str | None, dataset: str = "imagefolder",
                        batch_size: int = 128, workers: int = 4, device: str = "auto", img_size: int = 0,
                        amp: str = "auto", model_kwargs: dict | None = None, use_ema: bool = False,
                        skip_bad_images: bool = False, throughput: bool = False, compile: bool = False) -> dict[str, Any]:
    """Top-1/top-5/loss of a checkpoint on the validation split. Image folders use the model's
    pretrained config (resize, crop, mean/std); a spach training checkpoint also brings its own
    model name, architecture overrides, resolution and normalisation. The model runs in
    `spach.optimize`'s fastest inference setup for the device."""
    from spach.data import eval_loader_for
    from spach.optimize import optimize

    if not Path(pretrained).is_file():
        raise CheckpointError(f"checkpoint {pretrained} does not exist; pass the path of a .pth file")
    args = checkpoint.load(pretrained).get("args")
    args = args if isinstance(args, dict) else {}
    if model and args.get("model") and model != args["model"]:
        raise CheckpointError(f"checkpoint {pretrained} is of model {args['model']!r}, not {model!r}; drop --model or pass the right one")
    model = model or args.get("model")
    if not model:
        raise SpachError(f"{pretrained} does not name its model; pass --model")
    d = _setup(device)
    amp_dtype = _amp_dtype(amp, d.device)
    dataset = canonical_dataset(dataset)
    cfg = TrainConfig(model=model, model_kwargs=model_kwargs if model_kwargs is not None else args.get("model_kwargs", {}),
                      pretrained="", drop_path=0.0)
    size = img_size or args.get("img_size", 0)
    mean, std = args.get("mean") or None, args.get("std") or None
    with torch.device("meta"):  # a free probe, for the model's pretrained config (resize, crop, mean/std)
        probe = build_model(cfg, 1000, 3)
    loader, n = eval_loader_for(probe, dataset, data_path, batch_size, workers, d.device, size, mean, std, skip_bad_images)
    first_x = next(iter(loader))[0]
    num_classes = _dataset_classes(loader)
    net = build_model(dataclasses.replace(cfg, pretrained=""), num_classes, first_x.shape[1], size or first_x.shape[-1])
    _load_strict(net, pretrained, use_ema)
    fast = optimize(net, device=d.device, dtype=amp_dtype or torch.float32, compile=compile)
    result = evaluate(fast, loader, d.device)
    result.update(model=model, checkpoint=str(pretrained), dataset=dataset, images=n, device=str(d.device))
    if throughput:
        from spach.profile import throughput as measure

        result["throughput"] = measure(net, batch_size=batch_size, img_size=first_x.shape[-1], device=d.device,
                                       dtype=amp_dtype, warmup=50, repeats=30)
    return result


def _dataset_classes(loader: Any) -> int:
    ds = loader.data if hasattr(loader, "data") else loader.dataset.ds
    return len(ds.classes)


def _load_strict(net: nn.Module, path: str, use_ema: bool) -> None:
    """Load every weight, the head included (evaluating a freshly initialised head would be meaningless)."""
    from spach.convert import check_fits, checkpoint_filter_fn, read_checkpoint

    state = read_checkpoint(path, use_ema)
    if hasattr(net, "config"):  # a spach model: official names are converted
        state = checkpoint_filter_fn(state, net)
    check_fits(state, net)
    net.load_state_dict(state)

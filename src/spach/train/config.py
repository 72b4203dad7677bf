"""The training configuration: `TrainConfig`, every knob of a run with the paper's (DeiT) ImageNet
recipe as defaults, and the checks every value passes before anything runs (`spach train` flags,
config files and battle studies all build a `TrainConfig`, so they share these checks)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data.transforms_factory import transforms_imagenet_train
from timm.optim import list_optimizers

from spach.device import AMP_CHOICES
from spach.errors import SpachError
from spach.models.limits import MAX_IMG_SIZE
from spach.train.logs import parse_log
from spach.train.runtime import default_workers


class ConfigError(SpachError):
    """A bad value of one `TrainConfig` field; `field` and `problem` let callers name it their way
    (`--batch-size` on the command line, `recipe.batch_size` in a study)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class Default(float):
    """A recipe default (TrainConfig's or a preset's), told apart from the same number given by a flag, a
    config file or a study: a default warm-up that would fill the whole run is cut to fit it, a given one
    is refused (`check`)."""


class _Cut(Default):
    """A default warm-up cut to fit the run (said by `warmup_note`)."""


DEIT_WARMUP = (20, 300)  # DeiT's warm-up: 20 of its 300 epochs


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
    imports: list = _knob([], "modules or .py files to import first: plugins that register custom mixers or models (their "
                              "code runs); recorded (absolute paths), so eval, export and a resume import them too",
                          group="model", item=str)
    # data
    dataset: str = _knob("imagefolder", "imagefolder (train/ and val/ class folders), fashion-mnist (fmnist), cifar10, cifar100, or tiny (built-in toy set)", group="data")
    data_path: str = _knob("", "data folder (fashion-mnist defaults to /usr/share/datasets/fashion-mnist)", group="data")
    img_size: int = _knob(0, "training and evaluation resolution (0: the dataset's own for in-memory sets, the model's for folders)", group="data")
    mean: list = _knob([], "normalisation mean per channel (empty: the dataset's own, or the model's for folders)", group="data")
    std: list = _knob([], "normalisation std per channel (empty: as --mean)", group="data")
    train_subset: int = _knob(0, "train on this many training images only, a fixed random subset (0: all)", group="data")
    val_subset: int = _knob(0, "validate on this many validation images only, a fixed random subset (0: all)", group="data")
    eval_train_subset: int = _knob(0, "also evaluate on this many training images, un-augmented, whenever the validation set is scored (train_eval_loss/top1; 0: off)", group="data")
    workers: int = _knob(default_workers(), "data loader worker processes for image folders (in-memory sets load in the main "
                                            "process; default: at most 4, no more than this machine's CPUs)", group="data")
    skip_bad_images: bool = _knob(False, "count and skip unreadable images instead of failing", group="data")
    # recipe
    epochs: int = _knob(300, "training epochs", group="recipe")
    batch_size: int = _knob(128, "batch size per process (the paper: 1024 in all)", group="recipe")
    eval_batch_size: int = _knob(0, "evaluation batch size per process (0: --batch-size)", group="recipe")
    lr: float = _knob(5e-4, "base learning rate; the actual lr is lr x total batch / --lr-base-size", group="recipe")
    lr_base_size: int = _knob(512, "batch size at which --lr applies (0: use --lr as is)", group="recipe")
    min_lr: float = _knob(1e-5, "final lr of the cosine schedule", group="recipe")
    warmup_lr: float = _knob(1e-6, "lr at the start of the linear warm-up", group="recipe")
    warmup_epochs: float = _knob(Default(DEIT_WARMUP[0]), f"warm-up epochs (the default, DeiT's {DEIT_WARMUP[0]} of "
                                 f"{DEIT_WARMUP[1]}, is cut to the same share of a run it would fill; a value given must "
                                 "be fewer than --epochs)", group="recipe")
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
    amp: str = _knob("auto", "mixed precision: auto (bf16 or fp16 on GPU; bf16 on CPUs with native bf16, else off), bf16, fp16 or off", group="recipe")
    # run
    output: str = _knob("runs/train", "run folder (config, metrics, checkpoints)", group="run")
    resume: str = _knob("", "'auto': continue the run in --output if there is one; or a checkpoint path to continue from", group="run")
    seed: int = _knob(0, "random seed", group="run")
    device: str = _knob("auto", "auto, cpu, cuda or cuda:N", group="run")
    progress: str = _knob("auto", "auto (a bar on a terminal, periodic lines otherwise), bar, lines or none", group="run")
    log_interval: int = _knob(50, "steps between progress lines", group="run")
    eval_every: int = _knob(1, "score the validation set (and --eval-train-subset) every N epochs and always after the last one; "
                               "0: only after the last one (the weights trained are the same either way)", group="run")
    deadline: float = _knob(0.0, "stop at the first training step after this Unix time, saving a checkpoint that --resume auto "
                                 "continues (0: no deadline; a battle sets it from its budget)", group="run")
    log: str = _knob("auto", "experiment logs beside metrics.jsonl: tensorboard, wandb (offline), both comma-separated, "
                             "none, or auto (tensorboard when it is installed; the choice is recorded in config.json)", group="run")
    save_format: str = _knob("torch", "format of the model weights kept (best, and final): torch (.pth) or safetensors "
                                      "(the resume checkpoint stays torch)", group="run")
    preset: str = _knob("", "named small-data preset, recorded here (see 'spach train --preset')", group="run")

    def __post_init__(self) -> None:
        check(self)
        if isinstance(self.warmup_epochs, Default) and self.warmup_epochs and self.warmup_epochs >= self.epochs:
            self.warmup_epochs = _Cut(round(self.epochs * DEIT_WARMUP[0] / DEIT_WARMUP[1], 4))
        # plugin files by absolute path: eval, export or a resume elsewhere import the same files
        self.imports = [os.path.abspath(os.path.expanduser(i)) if i.endswith(".py") else i for i in self.imports]


# Settings that may change when a run is resumed; any other difference means another run.
# ("tensorboard" is the knob `log` replaced: run folders of earlier versions still hold it; "imports" name
# where the mixers come from, which may move, and runs of earlier versions record none.)
RESUMABLE_CHANGES = {"resume", "workers", "progress", "log_interval", "log", "tensorboard", "save_format", "epochs", "device",
                     "eval_batch_size", "output", "imports", "eval_every", "deadline"}


def scores_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (1-based) ends with scoring the validation set (and the training subset)."""
    return epoch >= cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)


def warmup_note(cfg: TrainConfig) -> str:
    """The one-line notice of a default warm-up cut to fit the run ('' when it was not)."""
    if not isinstance(cfg.warmup_epochs, _Cut):
        return ""
    return (f"the default warm-up would last the whole run ({cfg.epochs} epoch(s)): cut to {cfg.warmup_epochs:g} epochs, "
            f"DeiT's share ({DEIT_WARMUP[0]} of {DEIT_WARMUP[1]}); --warmup-epochs sets it")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


DATASET_NAMES = ("imagefolder", "fashion-mnist", "fmnist", "cifar10", "cifar100", "tiny", "imagenet", "folder")
_CHOICES = {"amp": AMP_CHOICES, "mixup_mode": ("batch", "pair", "elem"), "remode": ("const", "rand", "pixel"),
            "progress": ("auto", "bar", "lines", "none"), "save_format": ("torch", "safetensors"),
            "train_interpolation": ("bilinear", "bicubic", "nearest", "random", "lanczos", "box", "hamming")}
_AT_LEAST = {"epochs": 1, "eval_every": 0, "deadline": 0, "batch_size": 1, "repeated_aug": 1, "recount": 1, "log_interval": 1, "workers": 0, "seed": 0,
             "train_subset": 0, "val_subset": 0, "eval_train_subset": 0, "img_size": 0, "eval_batch_size": 0,
             "lr_base_size": 0, "warmup_epochs": 0, "min_lr": 0, "warmup_lr": 0, "weight_decay": 0, "clip_grad": 0,
             "mixup": 0, "cutmix": 0, "color_jitter": 0, "momentum": 0}
# Upper bounds no run reaches on purpose: the seed is numpy's and torch's (32 bits); the image side is
# the models' own limit (spach.models.limits).
_AT_MOST = {"seed": 2**32 - 1, "img_size": MAX_IMG_SIZE}
_PROBABILITY = ("mixup_prob", "mixup_switch_prob", "hflip", "reprob")
_RATE = ("smoothing", "drop_path", "drop")  # in [0, 1)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# Model arguments with a flag of their own (or derived from the data): --model-kwargs may not set them.
MODEL_KWARGS_FLAGS = {"num_classes": "it comes from the dataset", "in_chans": "it comes from the dataset",
                      "img_size": "use --img-size", "drop_path_rate": "use --drop-path", "drop_rate": "use --drop"}
# Model arguments that would make building a model read, download or reshape other things than the
# architecture: refused in any stored or given model_kwargs (settings must not widen what a file can do).
MODEL_KWARGS_REFUSED = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
                        "cache_dir", "features_only", "feature_cfg", "feature_cls", "out_indices", "output_stride")


def check_model_kwargs(kwargs: dict) -> None:
    """A ConfigError for a model_kwargs key that has its own flag or would widen what building the model does."""
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError("model_kwargs", f"keys must be strings, got {key!r}")
        if key in MODEL_KWARGS_FLAGS:
            raise ConfigError("model_kwargs", f"may not set {key} ({MODEL_KWARGS_FLAGS[key]})")
        if key in MODEL_KWARGS_REFUSED:
            raise ConfigError("model_kwargs", f"may not set {key}: it would make building the model load or change more "
                                              "than its architecture (start from weights with --pretrained CKPT)")


def check(cfg: TrainConfig) -> None:
    """Raise a ConfigError for the first value no run could use (checked without touching data or devices)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), _TYPES[str(f.type)]
        if not _type_ok(value, kind):
            raise ConfigError(f.name, f"must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value!r}")
    for name, low in _AT_LEAST.items():
        if getattr(cfg, name) < low:
            raise ConfigError(name, f"must be >= {low}, got {getattr(cfg, name)!r}")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs and not isinstance(cfg.warmup_epochs, Default):
        raise ConfigError("warmup_epochs", f"must be fewer than the run's epochs ({cfg.warmup_epochs:g} >= {cfg.epochs}): "
                                           "it would never leave its warm-up; lower it (0: no warm-up)")
    for name, high in _AT_MOST.items():
        if getattr(cfg, name) > high:
            raise ConfigError(name, f"must be <= {high}, got {getattr(cfg, name)!r}")
    for name in _PROBABILITY:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(name, f"is a probability: it must lie in [0, 1], got {getattr(cfg, name)!r}")
    for name in _RATE:
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(name, f"must lie in [0, 1), got {getattr(cfg, name)!r}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if cfg.lr <= 0:
        raise ConfigError("lr", f"must be > 0, got {cfg.lr!r}")
    if cfg.opt_eps <= 0:
        raise ConfigError("opt_eps", f"must be > 0, got {cfg.opt_eps!r}")
    if not 0 < cfg.model_ema_decay < 1:
        raise ConfigError("model_ema_decay", f"must lie in (0, 1), got {cfg.model_ema_decay!r}")
    if cfg.dataset.lower() not in DATASET_NAMES:
        raise ConfigError("dataset", f"names an unknown dataset {cfg.dataset!r}; choose one of imagefolder, "
                                     "fashion-mnist (fmnist), cifar10, cifar100, tiny")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError("batch_size", f"must be even when Mixup/CutMix is on (got {cfg.batch_size}); "
                                        "pick an even one or set mixup and cutmix to 0")
    _check_pair("scale", cfg.scale, upper=1.0)
    _check_pair("ratio", cfg.ratio, upper=math.inf)
    for name in ("mean", "std"):
        values = getattr(cfg, name)
        if not all(_type_ok(v, float) and math.isfinite(v) for v in values):
            raise ConfigError(name, f"must be a list of numbers (one per image channel), got {values!r}")
    if any(v <= 0 for v in cfg.std):
        raise ConfigError("std", f"must be > 0 for every channel (it divides the pixels), got {cfg.std!r}")
    if cfg.std and cfg.mean and len(cfg.std) != len(cfg.mean):
        raise ConfigError("std", f"has {len(cfg.std)} values but mean has {len(cfg.mean)}; give one per channel")
    if bool(cfg.std) != bool(cfg.mean):
        raise ConfigError("std" if cfg.mean else "mean", "must be given together with "
                          + ("mean" if cfg.mean else "std") + " (one value per image channel each)")
    try:
        parse_log(cfg.log)
    except ValueError as e:
        raise ConfigError("log", str(e)) from None
    check_model_kwargs(cfg.model_kwargs)
    if not all(isinstance(i, str) and i.strip() for i in cfg.imports):
        raise ConfigError("imports", f"must be a list of module names or .py files, got {cfg.imports!r}")
    _check_opt(cfg.opt)
    _check_aa(cfg.aa)
    _check_device(cfg.device)


def _check_pair(name: str, values: list, upper: float) -> None:
    if len(values) != 2 or not all(_type_ok(v, float) for v in values) or not 0 < values[0] <= values[1] <= upper:
        bound = "1" if upper == 1.0 else "inf"
        raise ConfigError(name, f"must be two numbers lo, hi with 0 < lo <= hi <= {bound}, got {values!r}")


def _check_opt(opt: str) -> None:
    name = opt.lower().split("_")[-1]  # timm accepts e.g. 'lookahead_adamw'
    if name not in list_optimizers():
        raise ConfigError("opt", f"{opt!r} is not a timm optimizer (e.g. adamw, sgd, lamb; timm.optim.list_optimizers())")


def _check_aa(aa: str) -> None:
    if aa in ("", "none"):
        return
    try:
        transforms_imagenet_train(32, auto_augment=aa)
    except Exception:
        raise ConfigError("aa", f"{aa!r} is not an augmentation policy timm knows (e.g. rand-m9-mstd0.5-inc1, "
                                "augmix-m5, original, or 'none')") from None


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")

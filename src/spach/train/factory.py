"""The model a training config names: a spach model (zoo name or "spach" with architecture
overrides), or any timm model as an outside baseline."""
from __future__ import annotations

import difflib
import os
import sys

import timm
import torch.nn as nn

from spach.errors import SpachError
from spach.models.convert import read_checkpoint
from spach.models.zoo import create_model, list_models
from spach.train.config import TrainConfig


def check_model_name(name: str) -> None:
    """A one-line error for a name that is neither 'spach', a zoo name nor a timm model (before any
    data is read or worker started), suggesting close names."""
    if name == "spach" or name in list_models() or name in timm.list_models():
        return
    close = difflib.get_close_matches(name, ["spach", *list_models()], n=3) \
        or difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see 'spach models' or timm.list_models()"
    raise SpachError(f"unknown model {name!r}; {hint}")


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int = 0) -> nn.Module:
    """`cfg.model` for `num_classes` classes and `in_chans` input channels (img_size 0: the model's own).
    With `cfg.pretrained`, a checkpoint head of another class count starts fresh (fine-tuning), said in one line."""
    kw = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if img_size:
        kw["img_size"] = img_size
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    spach_model = cfg.model == "spach" or cfg.model in list_models() or cfg.model not in timm.list_models()
    classifier = "head" if spach_model else getattr(timm.models.get_pretrained_cfg(cfg.model), "classifier", None) or "head"
    head = _head_classes(cfg.pretrained, classifier) if cfg.pretrained else None
    if head is not None and head != num_classes and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"fine-tuning: {cfg.pretrained} has a {head}-class head; {classifier} starts freshly initialised for "
              f"{num_classes} classes", file=sys.stderr, flush=True)
    if spach_model:
        return create_model(cfg.model, pretrained=cfg.pretrained or None, **kw)
    # timm drops the file's head whenever num_classes differs from its pretrained config's (1000), even when
    # the file's own head fits: the overlay says what the file holds
    overlay = dict(file=cfg.pretrained, **({"num_classes": head} if head else {}))
    extra = dict(pretrained=True, pretrained_cfg_overlay=overlay) if cfg.pretrained else {}
    try:
        return timm.create_model(cfg.model, **kw, **extra)
    except TypeError:  # a model without an img_size argument (most CNNs)
        kw.pop("img_size", None)
        return timm.create_model(cfg.model, **kw, **extra)


def _head_classes(path: str, classifier: str) -> int | None:
    """The class count of a checkpoint's head (None when it has none under that name)."""
    weight = read_checkpoint(path).get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim else None

"""The model a training config names: a spach model (zoo name or "spach" with architecture
overrides), or any timm model as an outside baseline."""
from __future__ import annotations

import timm
import torch.nn as nn

from spach.models.zoo import create_model, list_models
from spach.train.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, img_size: int = 0) -> nn.Module:
    """`cfg.model` for `num_classes` classes and `in_chans` input channels (img_size 0: the model's own)."""
    kw = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if img_size:
        kw["img_size"] = img_size
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    if cfg.model == "spach" or cfg.model in list_models() or cfg.model not in timm.list_models():
        return create_model(cfg.model, pretrained=cfg.pretrained or None, **kw)
    extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=cfg.pretrained)) if cfg.pretrained else {}
    try:
        return timm.create_model(cfg.model, **kw, **extra)
    except TypeError:  # a model without an img_size argument (most CNNs)
        kw.pop("img_size", None)
        return timm.create_model(cfg.model, **kw, **extra)

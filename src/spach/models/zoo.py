"""The official model zoo of every family, by name: `create_model` and `list_models`.

Importing this module registers all variants with timm (SPACH, sMLPNet, ShiftViT), so
`timm.create_model("spach_ms_s_patch4_224_hybrid", pretrained=True)` loads the official weights too.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any

import timm
import torch.nn as nn

from spach.errors import SpachError
from spach.models import shiftvit, smlpnet, spach_variants  # noqa: F401  (registers the variants)
from spach.models.backbone import SpachConfig, SpachNet
from spach.models.convert import load_checkpoint
from spach.models.limits import check_size
from spach.models.registry import (
    OFFICIAL_TOP1,
    family_cfg,
    family_of_variant,
    feature_net,
    sync_cfg,
    variant_names,
)

__all__ = ["OFFICIAL_TOP1", "create_model", "list_models"]


def list_models(pattern: str = "*") -> list[str]:
    """Names of the official variants (all families) matching a glob pattern."""
    return [n for n in variant_names() if fnmatch.fnmatch(n, pattern)]


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    use_ema: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a model by zoo name (or `"spach"`: a SPACH model from config overrides only).

    `pretrained=True` loads the official weights (downloaded once into the cache, see
    `spach.models.weights`); otherwise `pretrained` is the path of an official or spach checkpoint.
    Either is loaded strictly and safely; a head
    for another `num_classes` is left freshly initialised (fine-tuning). `features_only=True`
    (with `out_indices`) returns the feature maps as `(B, C, H, W)`.
    """
    features_only = overrides.pop("features_only", False)
    out_indices = overrides.pop("out_indices", None)
    family = spach_variants.FAMILY if name == "spach" else family_of_variant(name)
    if family is None:
        close = difflib.get_close_matches(name, variant_names(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run 'spach models' for the list"
        raise SpachError(f"unknown model {name!r}; {hint}")
    unknown = set(overrides) - set(family.options)
    if unknown:
        raise SpachError(
            f"unknown model option(s) {', '.join(sorted(unknown))} for {family.title} models; options are: "
            f"{', '.join(family.options)}"
        )
    official = pretrained is True
    if official and name == "spach":
        raise SpachError("pretrained=True loads the official weights of a zoo model; name one (see 'spach models'), "
                         "or pass the path of a checkpoint")
    if name == "spach":
        check_size(name, overrides.get("img_size"), lambda: SpachNet(SpachConfig(**overrides)))
        model: nn.Module = SpachNet(SpachConfig(**overrides))
        model.pretrained_cfg = family_cfg(family)
        sync_cfg(model, "spach")
    else:  # pretrained=True: timm's builder downloads and loads the official weights (spach.models.weights)
        model = timm.create_model(name, pretrained=official, **overrides)
    if pretrained and not official:
        load_checkpoint(model, pretrained, use_ema=use_ema)
    return feature_net(model, out_indices) if features_only else model

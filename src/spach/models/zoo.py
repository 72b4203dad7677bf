"""The named SPACH variants (the official model zoo), their pretrained configs and timm registration.

Every variant is a short function that only states its config; `import spach` registers them all
with timm, so `timm.create_model("spach_ms_s_patch4_224_hybrid", pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))` loads official weights.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

from spach.errors import SpachError
from spach.models.backbone import SpachConfig, SpachNet
from spach.models.convert import checkpoint_filter_fn, load_checkpoint

# Released ImageNet-1K top-1 (%) of the official checkpoints.
OFFICIAL_TOP1 = {
    "spach_ms_xxs_patch4_224_conv": 73.1,
    "spach_ms_xxs_patch4_224_attn": 65.4,
    "spach_ms_xxs_patch4_224_mlp": 74.5,
    "spach_ms_s_patch4_224_conv": 81.6,
    "spach_ms_s_patch4_224_attn": 82.9,
    "spach_ms_s_patch4_224_mlp": 82.1,
    "spach_ms_xs_patch4_224_hybrid": 82.4,
    "spach_ms_s_patch4_224_hybrid": 83.7,
    "spach_ms_s_plus_patch4_224_hybrid": 83.9,
}

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "mit", "paper_ids": "arXiv:2108.13002",
        **kwargs,
    }


# timm reads `default_cfgs` of this module when each variant below registers, so it comes first.
default_cfgs = generate_default_cfgs({
    **{f"spach_{size}_patch16_224_{m}.in1k": _cfg() for size in ("xxs", "xs", "s") for m in ("conv", "attn", "mlp")},
    **{f"spach_ms_{size}_patch4_224_{m}.in1k": _cfg() for size in ("xxs", "xs", "s") for m in ("conv", "attn", "mlp")},
    "spach_ms_xs_patch4_224_hybrid.in1k": _cfg(),
    "spach_ms_s_patch4_224_hybrid.in1k": _cfg(),
    "spach_ms_s_plus_patch4_224_hybrid.in1k": _cfg(first_conv="stem.proj.0"),
})
_NAMES = sorted(default_cfgs)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    cfg_kwargs = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices", "feature_cls")}
    num_stages = len(SpachConfig(**{k: v for k, v in cfg_kwargs.items() if k in SpachConfig.__dataclass_fields__}).net_arch)
    return build_model_with_cfg(
        SpachNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_stages))),
        **kwargs,
    )


def _ss(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> nn.Module:
    """Single-stage: patch 16, one width."""
    return _create(variant, pretrained, **{**dict(patch_size=16), **cfg, **kwargs})


def _ms(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> nn.Module:
    """Multi-stage: patch 4, widths C, 2C, 4C, 8C, first stage always conv."""
    return _create(variant, pretrained, **{**dict(patch_size=4), **cfg, **kwargs})


def _pyramid(mixer: str, depths: tuple[int, int, int, int]) -> list:
    return [[("conv", depths[0])]] + [[(mixer, d)] for d in depths[1:]]


# --- single-stage ----------------------------------------------------------------------------
@register_model
def spach_xxs_patch16_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xxs_patch16_224_conv", pretrained, kwargs, hidden_dim=384, num_heads=12, net_arch=[("conv", 12)])


@register_model
def spach_xxs_patch16_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xxs_patch16_224_attn", pretrained, kwargs, hidden_dim=192, num_heads=6, net_arch=[("attn", 12)])


@register_model
def spach_xxs_patch16_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xxs_patch16_224_mlp", pretrained, kwargs, hidden_dim=384, num_heads=12, net_arch=[("mlp", 12)])


@register_model
def spach_xs_patch16_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xs_patch16_224_conv", pretrained, kwargs, hidden_dim=384, num_heads=12, net_arch=[("conv", 24)])


@register_model
def spach_xs_patch16_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xs_patch16_224_attn", pretrained, kwargs, hidden_dim=384, num_heads=12, net_arch=[("attn", 12)])


@register_model
def spach_xs_patch16_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_xs_patch16_224_mlp", pretrained, kwargs, hidden_dim=384, num_heads=12, net_arch=[("mlp", 24)])


@register_model
def spach_s_patch16_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_s_patch16_224_conv", pretrained, kwargs, hidden_dim=512, num_heads=16, channel_ratio=3.0,
               net_arch=[("conv", 24)])


@register_model
def spach_s_patch16_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_s_patch16_224_attn", pretrained, kwargs, hidden_dim=512, num_heads=16, channel_ratio=3.0,
               net_arch=[("attn", 12)])


@register_model
def spach_s_patch16_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ss("spach_s_patch16_224_mlp", pretrained, kwargs, hidden_dim=512, num_heads=16, channel_ratio=3.0,
               net_arch=[("mlp", 24)])


# --- multi-stage -----------------------------------------------------------------------------
@register_model
def spach_ms_xxs_patch4_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xxs_patch4_224_conv", pretrained, kwargs, hidden_dim=64, num_heads=2,
               net_arch=_pyramid("conv", (2, 2, 6, 2)))


@register_model
def spach_ms_xxs_patch4_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xxs_patch4_224_attn", pretrained, kwargs, hidden_dim=32, num_heads=1,
               net_arch=_pyramid("attn", (2, 2, 6, 2)))


@register_model
def spach_ms_xxs_patch4_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xxs_patch4_224_mlp", pretrained, kwargs, hidden_dim=64, num_heads=2,
               net_arch=_pyramid("mlp", (2, 2, 6, 2)))


@register_model
def spach_ms_xs_patch4_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xs_patch4_224_conv", pretrained, kwargs, hidden_dim=96, num_heads=3,
               net_arch=_pyramid("conv", (3, 4, 12, 3)))


@register_model
def spach_ms_xs_patch4_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xs_patch4_224_attn", pretrained, kwargs, hidden_dim=64, num_heads=2,
               net_arch=_pyramid("attn", (3, 4, 12, 3)))


@register_model
def spach_ms_xs_patch4_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xs_patch4_224_mlp", pretrained, kwargs, hidden_dim=96, num_heads=3,
               net_arch=_pyramid("mlp", (3, 4, 12, 3)))


@register_model
def spach_ms_xs_patch4_224_hybrid(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_xs_patch4_224_hybrid", pretrained, kwargs, hidden_dim=96, num_heads=3,
               net_arch=[[("conv", 3)], [("conv", 4)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]])


@register_model
def spach_ms_s_patch4_224_conv(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_s_patch4_224_conv", pretrained, kwargs, hidden_dim=128, num_heads=4, channel_ratio=3.0,
               net_arch=_pyramid("conv", (3, 4, 12, 3)))


@register_model
def spach_ms_s_patch4_224_attn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_s_patch4_224_attn", pretrained, kwargs, hidden_dim=96, num_heads=3, channel_ratio=3.0,
               net_arch=_pyramid("attn", (3, 4, 12, 3)))


@register_model
def spach_ms_s_patch4_224_mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_s_patch4_224_mlp", pretrained, kwargs, hidden_dim=128, num_heads=4, channel_ratio=3.0,
               net_arch=_pyramid("mlp", (3, 4, 12, 3)))


_HYBRID_S = [[("conv", 3)], [("conv", 2), ("attn", 2)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]]


@register_model
def spach_ms_s_patch4_224_hybrid(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _ms("spach_ms_s_patch4_224_hybrid", pretrained, kwargs, hidden_dim=128, num_heads=4, channel_ratio=3.0,
               net_arch=_HYBRID_S)


@register_model
def spach_ms_s_plus_patch4_224_hybrid(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Hybrid-MS-S+: Hybrid-MS-S with the LV-ViT 4-conv stem."""
    return _ms("spach_ms_s_plus_patch4_224_hybrid", pretrained, kwargs, hidden_dim=128, num_heads=4,
               channel_ratio=3.0, stem_type="conv4", net_arch=_HYBRID_S)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the official SPACH variants matching a glob pattern."""
    return sorted(n for n in _NAMES if fnmatch.fnmatch(n, pattern))


def create_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    use_ema: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a SPACH model by zoo name (or `"spach"` with config overrides only).

    `pretrained` is the path of an official or spach checkpoint, loaded strictly and safely; a head
    for another `num_classes` is left freshly initialised (fine-tuning). `features_only=True`
    (with `out_indices`) returns the stage feature maps as `(B, C, H, W)`.
    """
    features_only = overrides.pop("features_only", False)
    out_indices = overrides.pop("out_indices", None)
    unknown = set(overrides) - set(SpachConfig.__dataclass_fields__)
    if unknown:
        raise SpachError(
            f"unknown model option(s) {', '.join(sorted(unknown))}; options are: "
            f"{', '.join(SpachConfig.__dataclass_fields__)}"
        )
    if name == "spach":
        model: nn.Module = SpachNet(SpachConfig(**overrides))
        model.pretrained_cfg = _cfg(input_size=(model.in_chans, *model.img_size), architecture="spach")
    elif name in _NAMES:
        model = timm.create_model(name, pretrained=False, **overrides)
    else:
        close = difflib.get_close_matches(name, _NAMES, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run 'spach models' for the list"
        raise SpachError(f"unknown model {name!r}; {hint}")
    if pretrained:
        load_checkpoint(model, pretrained, use_ema=use_ema)
    if features_only:
        model = FeatureGetterNet(model, out_indices=out_indices if out_indices is not None else len(model.stages))
    return model

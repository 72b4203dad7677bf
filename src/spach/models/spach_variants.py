"""The named SPACH variants (the official model zoo): their pretrained configs and timm registration.

Every variant is a short function that only states its config. Single-stage models end on a 14x14
grid at 224, multi-stage ones on 7x7; MLP models are tied to their input size.
"""
from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from spach.models.backbone import SpachConfig, SpachNet
from spach.models.convert import checkpoint_filter_fn
from spach.models.registry import Family, family_cfg, register_family, zoo_cfgs
from spach.models.weights import build

FAMILY = register_family(Family(
    name="spach", title="SPACH", model_cls=SpachNet, config_cls=SpachConfig, filter_fn=checkpoint_filter_fn,
    checkpoint_prefixes=("stem.",),
    cfg=dict(first_conv="stem.proj", classifier="head", paper_ids="arXiv:2108.13002"),
))


def _variant_cfg(name: str) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(pool_size=(7, 7) if "_ms_" in name else (14, 14), fixed_input_size=name.endswith("_mlp"))
    if "_plus_" in name:
        cfg["first_conv"] = "stem.proj.0"
    return cfg


# timm reads `default_cfgs` of this module when each variant below registers, so it comes first.
default_cfgs = zoo_cfgs(FAMILY, {f"{name}.in1k": _variant_cfg(name) for name in (
    *(f"spach_{size}_patch16_224_{m}" for size in ("xxs", "xs", "s") for m in ("conv", "attn", "mlp")),
    *(f"spach_ms_{size}_patch4_224_{m}" for size in ("xxs", "xs", "s") for m in ("conv", "attn", "mlp")),
    "spach_ms_xs_patch4_224_hybrid", "spach_ms_s_patch4_224_hybrid", "spach_ms_s_plus_patch4_224_hybrid",
)})


def _ss(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> nn.Module:
    """Single-stage: patch 16, one width."""
    return build(FAMILY, variant, pretrained, **{**dict(patch_size=16), **cfg, **kwargs})


def _ms(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> nn.Module:
    """Multi-stage: patch 4, widths C, 2C, 4C, 8C, first stage always conv."""
    return build(FAMILY, variant, pretrained, **{**dict(patch_size=4), **cfg, **kwargs})


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


# --- "spach": any SPACH model, from its config alone ------------------------------------------
# As `spach.create_model("spach", **config)`. Registered with timm (not a zoo variant: `spach models`
# does not list it) so that a trained custom architecture exported by `spach export --format timm`
# (config.json: architecture "spach" and the full config as model_args) loads with
# `timm.create_model("local-dir:FOLDER" or "hf-hub:user/repo", pretrained=True)`.
default_cfgs.update(generate_default_cfgs({"spach": family_cfg(FAMILY)}))


@register_model
def spach(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build(FAMILY, "spach", pretrained, **kwargs)

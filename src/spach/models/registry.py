"""What every model family shares: its entry in the family registry, timm pretrained configs, the
timm builder (features, config sync) and the released top-1 of the official checkpoints.

A family (SPACH, sMLPNet, ShiftViT) is one model class with a config dataclass and a
`checkpoint_filter_fn`; its file lists its variants with `zoo_cfgs(FAMILY, {...})` and registers
one short function per variant with timm, each calling `build(FAMILY, name, pretrained, **kwargs)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs
from timm.models._features import FeatureGetterNet

# Released ImageNet-1K top-1 (%) of the official checkpoints (224x224).
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
    "smlpnet_tiny": 81.9,
    "smlpnet_small": 83.1,
    "smlpnet_base": 83.4,
    "shiftvit_light_tiny": 79.4,
    "shiftvit_r2_tiny": 81.7,
    "shiftvit_light_small": 81.6,
    "shiftvit_r2_small": 82.8,
}


# The official checkpoints (microsoft/SPACH release v1.0, every file its README links; no hashes are
# published): the `url` of each model's pretrained config. `spach.models.weights` downloads them.
OFFICIAL_RELEASE = "https://github.com/microsoft/SPACH/releases/download/v1.0/"
OFFICIAL_WEIGHTS = {name: OFFICIAL_RELEASE + file for name, file in {
    "spach_ms_xxs_patch4_224_conv": "spach_ms_conv_xxs.pth",
    "spach_ms_xxs_patch4_224_attn": "spach_ms_trans_xxs.pth",
    "spach_ms_xxs_patch4_224_mlp": "spach_ms_mlp_xxs.pth",
    "spach_ms_s_patch4_224_conv": "spach_ms_conv_s.pth",
    "spach_ms_s_patch4_224_attn": "spach_ms_trans_s.pth",
    "spach_ms_s_patch4_224_mlp": "spach_ms_mlp_s.pth",
    "spach_ms_s_patch4_224_hybrid": "spach_ms_hybrid_s.pth",
    "spach_ms_s_plus_patch4_224_hybrid": "spach_ms_hybrid_s+.pth",
    "smlpnet_small": "smlp_s.pth",
    "smlpnet_base": "smlp_b.pth",
    "shiftvit_light_tiny": "shiftvit_tiny_light.pth",
    "shiftvit_r2_tiny": "shiftvit_tiny_r2.pth",
    "shiftvit_light_small": "shiftvit_small_light.pth",
    "shiftvit_r2_small": "shiftvit_small_r2.pth",
}.items()}


@dataclass(frozen=True)
class Family:
    """A model family: `model_cls(cfg=None, **options)` where `options` are `config_cls`'s fields."""

    name: str                                   # short name: 'spach', 'smlp', 'shift'
    title: str                                  # as the papers write it
    model_cls: type[nn.Module]
    config_cls: type
    filter_fn: Callable[[dict, nn.Module], dict]  # official or own checkpoint -> this model's state dict
    checkpoint_prefixes: tuple[str, ...]        # keys that only this family's checkpoints have
    cfg: dict[str, Any]                         # its timm pretrained-config entries (first_conv, classifier, ...)

    @property
    def options(self) -> list[str]:
        return list(self.config_cls.__dataclass_fields__)

    @property
    def classifier(self) -> str:
        return self.cfg["classifier"]


_VARIANTS: dict[str, Family] = {}
_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def family_named(name: str) -> Family:
    return _FAMILIES[name]


def family_cfg(family: Family, **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained config: the official code's ImageNet evaluation defaults, the family's entries, `kwargs`."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "license": "mit", **family.cfg, **kwargs,
    }


def zoo_cfgs(family: Family, cfgs: dict[str, dict[str, Any]]) -> dict:
    """timm `default_cfgs` for a family's variants (keys 'name.tag', values: entries beyond
    `family_cfg`); also lists the names in the zoo."""
    for key in cfgs:
        _VARIANTS[key.split(".")[0]] = family
    return generate_default_cfgs({key: family_cfg(family, **_release(key.split(".")[0]), **cfg) for key, cfg in cfgs.items()})


def _release(name: str) -> dict[str, Any]:
    """The pretrained-config entries of a variant's official checkpoint: its source and released top-1."""
    if name not in OFFICIAL_WEIGHTS:
        return {}
    return dict(url=OFFICIAL_WEIGHTS[name], origin_url="https://github.com/microsoft/SPACH",
                notes=(f"official checkpoint, ImageNet-1k top-1 {OFFICIAL_TOP1[name]}",))


def variant_names() -> list[str]:
    return sorted(_VARIANTS)


def family_of_variant(name: str) -> Family | None:
    return _VARIANTS.get(name)


def family_of_model(model: nn.Module) -> Family | None:
    return next((f for f in _FAMILIES.values() if isinstance(model, f.model_cls)), None)


def family_of_checkpoint(state_dict: dict[str, Any]) -> Family | None:
    """The family whose checkpoints (official or spach layout) have these keys, if one does."""
    return next((f for f in _FAMILIES.values() if any(k.startswith(f.checkpoint_prefixes) for k in state_dict)), None)


def sync_cfg(model: nn.Module, name: str) -> nn.Module:
    """Make the model's pretrained config describe this instance (its input size, final grid, whether
    it is tied to its input size) and carry the released top-1 of its official checkpoint."""
    chans, (h, w) = model.in_chans, model.img_size
    grid = model.feature_info[-1]["reduction"]
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "architecture": name,
        "input_size": (chans, h, w),
        "pool_size": (h // grid, w // grid),
        "fixed_input_size": model.fixed_input_size,
        "top1": OFFICIAL_TOP1.get(name) if (h, w) == (224, 224) else None,
    }
    model.default_cfg = model.pretrained_cfg
    return model


def feature_net(model: nn.Module, out_indices: int | tuple[int, ...] | None = None) -> nn.Module:
    """timm's `features_only` wrapper: `forward_intermediates` outputs as `(B, C, H, W)` maps."""
    out = FeatureGetterNet(model, out_indices=model.default_out_indices if out_indices is None else out_indices)
    out.pretrained_cfg = out.default_cfg = model.pretrained_cfg
    return out

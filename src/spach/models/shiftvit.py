"""ShiftViT ("When Shift Operation Meets Vision Transformer", arXiv 2201.10801), as DESIGN.md 2b
defines it, in the official parameter layout, with timm's conventions.

Patch embedding (4x4 conv + GroupNorm(1)), four stages of width `E * 2**i`; each block replaces its
input by the zero-parameter shift (`spach.models.mixers.shift_channels`), then adds a GroupNorm(1) +
1x1-conv MLP; the first three stages end with a patch merging (GroupNorm(1), 2x2 stride-2 conv).
No `from __future__ import annotations`: see backbone.py.
"""
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from spach.errors import SpachError
from spach.models.blocks import to_nchw, to_nhwc
from spach.models.checks import check_global_pool
from spach.models.convert import check_fits
from spach.models.mixers import shift_channels
from spach.models.registry import Family, register_family, zoo_cfgs
from spach.models.weights import build


@dataclass
class ShiftViTConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = field(default=(2, 2, 6, 2))
    mlp_ratio: float = 4.0
    n_div: int = 12
    patch_size: int = 4
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        size = self.img_size
        self.img_size = (size, size) if isinstance(size, int) else tuple(size)
        check_global_pool(self.global_pool)
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if any(s % stride for s in self.img_size):
            raise SpachError(
                f"ShiftViT's img_size {self.img_size} is not divisible by its total stride {stride}; pick a multiple of {stride}"
            )


# --- blocks --------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """1x1 conv -> GELU -> Dropout -> 1x1 conv -> Dropout, on `(B, C, H, W)`."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ShiftViTBlock(nn.Module):
    """`x = shift(x)` (no residual), then `x = x + DP(MLP(GroupNorm(1)(x)))`."""

    def __init__(self, dim: int, n_div: int, mlp_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.g = dim // n_div
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = shift_channels(x, self.g)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """GroupNorm(1, C), then a 2x2 stride-2 conv to 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.reduction = nn.Conv2d(dim, 2 * dim, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class BasicLayer(nn.Module):
    """A stage: blocks, then (stages 1-3 of 4) the patch merging to the next width."""

    def __init__(self, blocks: list[ShiftViTBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


# --- the model -----------------------------------------------------------------------------------
class ShiftViT(nn.Module):
    """ShiftViT. Input `(B, in_chans, H, W)`; `forward_features` returns the normalised last-stage
    map `(B, C, H/32, W/32)`; `forward_head` pools (mean) and classifies."""

    output_fmt = "NCHW"
    fixed_input_size = False

    def __init__(self, cfg: ShiftViTConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or ShiftViTConfig(**kwargs)
        self.config = cfg
        self.family = "shift"
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.img_size = cfg.img_size
        self.global_pool = cfg.global_pool
        n = len(cfg.depths)
        self.num_features = self.head_hidden_size = cfg.embed_dim * 2 ** (n - 1)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        layers, k, self.feature_info = [], 0, []
        for i, depth in enumerate(cfg.depths):
            dim = cfg.embed_dim * 2**i
            blocks = [ShiftViTBlock(dim, cfg.n_div, cfg.mlp_ratio, cfg.drop_rate, dpr[k + j]) for j in range(depth)]
            k += depth
            layers.append(BasicLayer(blocks, PatchMerging(dim) if i < n - 1 else None))
            self.feature_info.append(dict(num_chs=dim, reduction=cfg.patch_size * 2**i, module=f"layers.{i}.blocks"))
        self.layers = nn.ModuleList(layers)
        self.default_out_indices = n
        self.norm = nn.GroupNorm(1, self.num_features)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._classifier(cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = self._classifier(num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        if self.global_pool == "":  # per-position logits, still (B, classes, H, W)
            return to_nchw(self.head(to_nhwc(x)))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs before their patch merging (timm's feature API), `(B, C, H, W)` (or 'NHWC')."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise SpachError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        last = len(self.layers) - 1
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        for i, layer in enumerate(layers):
            x = layer.forward_blocks(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y if output_fmt == "NCHW" else to_nhwc(y))
            if layer.downsample is not None:
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ShiftViT checkpoints already have this model's names: check the fit (bar the head)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    check_fits(state_dict, model, skip_prefixes=("head.",))
    return state_dict


FAMILY = register_family(Family(
    name="shift", title="ShiftViT", model_cls=ShiftViT, config_cls=ShiftViTConfig, filter_fn=checkpoint_filter_fn,
    checkpoint_prefixes=("patch_embed.",),
    cfg=dict(first_conv="patch_embed.proj", classifier="head", paper_ids="arXiv:2201.10801"),
))

# --- variants ------------------------------------------------------------------------------------
# The official registrations: the base models split channels in 16 groups, not 12.
default_cfgs = zoo_cfgs(FAMILY, {
    f"shiftvit_{kind}_{size}.in1k": {} for kind in ("light", "r4", "r2") for size in ("tiny", "small", "base")
})


def _create(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> ShiftViT:
    return build(FAMILY, variant, pretrained, **{**cfg, **kwargs})


@register_model
def shiftvit_light_tiny(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_light_tiny", pretrained, kwargs, embed_dim=96, depths=(2, 2, 6, 2), mlp_ratio=4, drop_path_rate=0.2,
    )


@register_model
def shiftvit_r4_tiny(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r4_tiny", pretrained, kwargs, embed_dim=96, depths=(2, 2, 12, 3), mlp_ratio=4, drop_path_rate=0.2,
    )


@register_model
def shiftvit_r2_tiny(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r2_tiny", pretrained, kwargs, embed_dim=96, depths=(6, 8, 18, 6), mlp_ratio=2, drop_path_rate=0.2,
    )


@register_model
def shiftvit_light_small(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_light_small", pretrained, kwargs, embed_dim=96, depths=(2, 2, 18, 2), mlp_ratio=4, drop_path_rate=0.4,
    )


@register_model
def shiftvit_r4_small(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r4_small", pretrained, kwargs, embed_dim=96, depths=(2, 6, 24, 4), mlp_ratio=4, drop_path_rate=0.4,
    )


@register_model
def shiftvit_r2_small(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r2_small", pretrained, kwargs, embed_dim=96, depths=(10, 18, 36, 10), mlp_ratio=2, drop_path_rate=0.4,
    )


@register_model
def shiftvit_light_base(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_light_base", pretrained, kwargs, embed_dim=128, depths=(2, 2, 18, 2), mlp_ratio=4, drop_path_rate=0.5,
        n_div=16,
    )


@register_model
def shiftvit_r4_base(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r4_base", pretrained, kwargs, embed_dim=128, depths=(4, 6, 22, 4), mlp_ratio=4, drop_path_rate=0.5,
        n_div=16,
    )


@register_model
def shiftvit_r2_base(pretrained: bool = False, **kwargs: Any) -> ShiftViT:
    return _create(
        "shiftvit_r2_base", pretrained, kwargs, embed_dim=128, depths=(10, 18, 36, 10), mlp_ratio=2, drop_path_rate=0.6,
        n_div=16,
    )

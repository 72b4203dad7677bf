"""sMLPNet ("Sparse MLP for Image Recognition: Is Self-Attention Really Necessary?", arXiv 2109.05422),
as DESIGN.md 2b defines it, with timm's conventions.

Four stages of width `dim * 2**i`; each opens with a strided conv (the patch embedding in stage 0)
and runs blocks `x = x + DP(T(x)); x = x + DP(F(x))`: `T` = BN-GELU-depthwise conv then the sparse
MLP (mixing along the width and along the height, fused with the input), `F` = a channel MLP.
The sparse MLP's matrices tie a model to its input size.

Parameter names inside a block are the official ones (`conv_merge.BN`, `proj_h`, sic `proh_w`, ...);
the official code keeps blocks in two flat lists (`token_mix.{k}`, `channel_mix.{k}`) and the stage
openers in `to_patch_embedding.{i}.0`, here they live in `stages.{i}`: `checkpoint_filter_fn` and
`smlpnet_to_official` convert. No `from __future__ import annotations`: see backbone.py.
"""
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from spach.errors import SpachError
from spach.models.blocks import to_nchw, to_nhwc
from spach.models.checks import check_global_pool, check_grid
from spach.models.convert import check_fits
from spach.models.registry import Family, register_family, zoo_cfgs
from spach.models.weights import build

torch.fx.wrap("check_grid")


@dataclass
class SMLPNetConfig:
    dim: int = 80
    alpha: int = 3
    depths: tuple[int, ...] = field(default=(2, 8, 14, 2))
    patch_size: int = 4
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        size = self.img_size
        self.img_size = (size, size) if isinstance(size, int) else tuple(size)
        check_global_pool(self.global_pool)
        stride = self.patch_size * 2 ** (len(self.depths) - 1)
        if any(s % stride for s in self.img_size):
            raise SpachError(
                f"sMLPNet's img_size {self.img_size} is not divisible by its total stride {stride}; pick a multiple of {stride}"
            )

    def grid(self, stage: int) -> tuple[int, int]:
        f = self.patch_size * 2**stage
        return self.img_size[0] // f, self.img_size[1] // f


# --- blocks --------------------------------------------------------------------------------------
class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(x)


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nchw(x)


class BNActConv(nn.Module):
    """BatchNorm -> GELU -> depthwise 3x3 conv without bias (official `BN_Activ_Conv`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(dim)
        self.Activ = nn.GELU()
        self.Conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv(self.Activ(self.BN(x)))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_merge = BNActConv(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_merge(x)


class SparseMLP(nn.Module):
    """`z = GELU(BN(x))`; output `fuse([z, z mixed along the width, z mixed along the height])`.

    The official names say the opposite of what the layers do: `proj_h` (a `W x W` 1x1 conv applied
    with the width as channels) mixes along the width, `proh_w` (`H x H`) along the height.
    """

    def __init__(self, dim: int, grid_size: tuple[int, int]):
        super().__init__()
        height, width = grid_size
        self.activation = nn.GELU()
        self.BN = nn.BatchNorm2d(dim)
        self.proj_h = nn.Conv2d(width, width, 1)
        self.proh_w = nn.Conv2d(height, height, 1)
        self.fuse = nn.Conv2d(3 * dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.activation(self.BN(x))
        along_w = self.proj_h(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, W, C, H): width as channels
        along_h = self.proh_w(z.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # (B, H, C, W): height as channels
        return self.fuse(torch.cat([z, along_w, along_h], dim=1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SMLPBlock(nn.Module):
    """`x = x + DP(token_mix(x))`, then `x = x + DP(channel_mix(x))`, one drop-path rate for both."""

    def __init__(self, dim: int, grid_size: tuple[int, int], alpha: int, drop: float, drop_path: float):
        super().__init__()
        self.token_mix = nn.Sequential(DWConv(dim), SparseMLP(dim, grid_size))
        self.channel_mix = nn.Sequential(
            ToChannelsLast(), nn.LayerNorm(dim), FeedForward(dim, dim * alpha, drop), ToChannelsFirst(),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.token_mix(x))
        return x + self.drop_path(self.channel_mix(x))


class SMLPStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[SMLPBlock]):
        super().__init__()
        self.downsample = nn.Sequential(downsample)  # '.0.' as in the official to_patch_embedding.{i}.0
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)


# --- the model -----------------------------------------------------------------------------------
class SMLPNet(nn.Module):
    """sMLPNet. Input `(B, in_chans, H, W)` at exactly `img_size`; `forward_features` returns the
    batch-normalised last-stage map `(B, C, H/32, W/32)`; `forward_head` pools (mean) and classifies."""

    output_fmt = "NCHW"
    fixed_input_size = True

    def __init__(self, cfg: SMLPNetConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or SMLPNetConfig(**kwargs)
        self.config = cfg
        self.family = "smlp"
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.img_size = cfg.img_size
        self.global_pool = cfg.global_pool
        n = len(cfg.depths)
        self.num_features = self.head_hidden_size = cfg.dim * 2 ** (n - 1)
        total = sum(cfg.depths)
        stages, k, self.feature_info = [], 0, []
        for i, depth in enumerate(cfg.depths):
            dim = cfg.dim * 2**i
            if i == 0:
                downsample = nn.Conv2d(cfg.in_chans, dim, cfg.patch_size, cfg.patch_size, bias=False)
            else:
                downsample = nn.Conv2d(dim // 2, dim, 2, 2, bias=False)
            blocks = []
            for _ in range(depth):
                blocks.append(SMLPBlock(dim, cfg.grid(i), cfg.alpha, cfg.drop_rate, cfg.drop_path_rate * k / max(total - 1, 1)))
                k += 1
            stages.append(SMLPStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=cfg.patch_size * 2**i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.default_out_indices = n
        self.batch_norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.mlp_head = nn.Sequential(self._classifier(cfg.num_classes))

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.mlp_head[0]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        self.mlp_head = nn.Sequential(self._classifier(num_classes))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_grid(x, self.img_size[0], self.img_size[1], 2, "sMLPNet input size")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        for stage in self.stages:
            x = stage(x)
        return self.batch_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        if self.global_pool == "":  # per-position logits, still (B, classes, H, W)
            return to_nchw(self.mlp_head(to_nhwc(x)))
        return self.mlp_head(x)

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
        """Stage outputs (timm's feature API), `(B, C, H, W)` (or `(B, H, W, C)` with 'NHWC')."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise SpachError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        last = len(self.stages) - 1
        intermediates = []
        x = self._check_input(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.batch_norm(x) if norm and i == last else x
                intermediates.append(y if output_fmt == "NCHW" else to_nhwc(y))
        if intermediates_only:
            return intermediates
        return self.batch_norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.batch_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# --- checkpoints ---------------------------------------------------------------------------------
def _official_depths(state_dict: dict[str, torch.Tensor]) -> list[int]:
    """Blocks per stage of an official state dict: runs of equal width in `token_mix`."""
    conv = re.compile(r"^token_mix\.(\d+)\.0\.conv_merge\.Conv\.weight$")
    widths = {int(m[1]): v.shape[0] for k, v in state_dict.items() if (m := conv.match(k))}
    depths: list[int] = []
    for k in range(len(widths)):
        if k and widths[k] == widths[k - 1]:
            depths[-1] += 1
        else:
            depths.append(1)
    return depths


def official_to_smlpnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official sMLPNet state dict in our layout (the flat block lists grouped into stages)."""
    starts, k = [], 0
    for d in _official_depths(state_dict):
        starts.append(k)
        k += d
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^to_patch_embedding\.(\d+)\.0\.(.+)$", key):
            key = f"stages.{m[1]}.downsample.0.{m[2]}"
        elif m := re.match(r"^(token_mix|channel_mix)\.(\d+)\.(.+)$", key):
            k = int(m[2])
            stage = max(i for i, s in enumerate(starts) if s <= k)
            key = f"stages.{stage}.blocks.{k - starts[stage]}.{m[1]}.{m[3]}"
        out[key] = value
    return out


def smlpnet_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export to the official layout (e.g. to evaluate weights trained here with the official code)."""
    depths: dict[int, int] = {}
    for key in state_dict:
        if m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", key):
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^stages\.(\d+)\.downsample\.0\.(.+)$", key):
            key = f"to_patch_embedding.{m[1]}.0.{m[2]}"
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(token_mix|channel_mix)\.(.+)$", key):
            k = sum(depths[i] for i in range(int(m[1]))) + int(m[2])
            key = f"{m[3]}.{k}.{m[4]}"
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official (or spach) sMLPNet checkpoint -> this model's state dict, its fit checked (bar the head)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("token_mix.") for k in state_dict):
        state_dict = official_to_smlpnet(state_dict)
    check_fits(state_dict, model, skip_prefixes=("mlp_head.",))
    return state_dict


FAMILY = register_family(Family(
    name="smlp", title="sMLPNet", model_cls=SMLPNet, config_cls=SMLPNetConfig, filter_fn=checkpoint_filter_fn,
    checkpoint_prefixes=("to_patch_embedding.", "stages.0.downsample.0."),
    cfg=dict(first_conv="stages.0.downsample.0", classifier="mlp_head.0", paper_ids="arXiv:2109.05422", fixed_input_size=True),
))

# --- variants ------------------------------------------------------------------------------------
default_cfgs = zoo_cfgs(FAMILY, {f"smlpnet_{size}.in1k": {} for size in ("tiny", "small", "base")})


def _create(variant: str, pretrained: bool, kwargs: dict, **cfg: Any) -> SMLPNet:
    return build(FAMILY, variant, pretrained, **{**cfg, **kwargs})


@register_model
def smlpnet_tiny(pretrained: bool = False, **kwargs: Any) -> SMLPNet:
    return _create("smlpnet_tiny", pretrained, kwargs, dim=80, alpha=3, depths=(2, 8, 14, 2), drop_path_rate=0.0)


@register_model
def smlpnet_small(pretrained: bool = False, **kwargs: Any) -> SMLPNet:
    return _create("smlpnet_small", pretrained, kwargs, dim=96, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.2)


@register_model
def smlpnet_base(pretrained: bool = False, **kwargs: Any) -> SMLPNet:
    return _create("smlpnet_base", pretrained, kwargs, dim=112, alpha=3, depths=(2, 10, 24, 2), drop_path_rate=0.3)

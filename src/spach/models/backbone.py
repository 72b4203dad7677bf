"""The SPACH backbone: one model class for single- and multi-stage layouts, driven by `SpachConfig`.

A layout is a list of stages; each stage is a list of `(mixer, depth)` runs at one width. Stage `i`
has width `hidden_dim * 2**i`; stages after the first open with a 2x downsample. One stage is the
single-stage (ViT-like) layout, four the multi-stage (pyramid) layout; other counts work too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

from spach.errors import SpachError
from spach.models.blocks import (
    LN_EPS,
    ChannelsLastGroupNorm1,
    Downsample,
    LayerNorm,
    MixingBlock,
    Stem,
    to_nchw,
)
from spach.models.mixers import MixerContext, build_mixer, canonical_mixer

Arch = list[list[tuple[str, int]]]


def normalize_arch(net_arch: Sequence) -> Arch:
    """Accept the official formats: `[("attn", 12)]` (single-stage) or one list per stage."""
    if not net_arch:
        raise SpachError("net_arch is empty; give e.g. [('attn', 12)] or [[('conv', 2)], [('attn', 2)], ...]")
    if isinstance(net_arch[0], (tuple, list)) and len(net_arch[0]) == 2 and isinstance(net_arch[0][0], str):
        net_arch = [net_arch]
    arch: Arch = []
    for stage in net_arch:
        runs = []
        for run in stage:
            if not (isinstance(run, (tuple, list)) and len(run) == 2 and isinstance(run[1], int) and run[1] > 0):
                raise SpachError(f"net_arch entry {run!r} is not a (mixer_name, depth) pair with depth >= 1")
            runs.append((canonical_mixer(run[0]), run[1]))
        if not runs:
            raise SpachError("net_arch has an empty stage; every stage needs at least one (mixer, depth) pair")
        arch.append(runs)
    return arch


def family_of(arch: Arch) -> str:
    """'conv', 'attn', 'mlp' (or a custom mixer's name) when one mixer is used beyond the always-conv
    first stage of a pyramid; 'hybrid' when several are."""
    mixers = {m for stage in (arch[1:] if len(arch) > 1 else arch) for m, _ in stage}
    return mixers.pop() if len(mixers) == 1 else "hybrid"


@dataclass
class SpachConfig:
    net_arch: Any = field(default_factory=lambda: [("attn", 12)])
    hidden_dim: int = 384
    num_heads: int = 12
    patch_size: int = 16
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    token_ratio: float = 0.5
    channel_ratio: float = 2.0
    stem_type: str = "conv1"
    cpe: bool = True
    pos_embed: bool = False
    layer_scale: float | None = 1e-4
    shared_spatial_func: bool = False
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        self.net_arch = normalize_arch(self.net_arch)
        size = self.img_size
        self.img_size = (size, size) if isinstance(size, int) else tuple(size)
        if self.stem_type not in ("conv1", "conv4"):
            raise SpachError(f"stem_type must be 'conv1' or 'conv4', not {self.stem_type!r}")
        if self.stem_type == "conv4" and self.patch_size % 2:
            raise SpachError(f"the conv4 stem needs an even patch_size, got {self.patch_size}")
        stride = self.patch_size * 2 ** (len(self.net_arch) - 1)
        if any(s % stride for s in self.img_size):
            raise SpachError(
                f"img_size {self.img_size} is not divisible by the total stride {stride} "
                f"(patch {self.patch_size} x {len(self.net_arch) - 1} downsamples); pick a multiple of {stride}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.net_arch)

    def grid(self, stage: int) -> tuple[int, int]:
        f = self.patch_size * 2**stage
        return self.img_size[0] // f, self.img_size[1] // f

    def width(self, stage: int) -> int:
        return self.hidden_dim * 2**stage

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["net_arch"] = [[list(run) for run in stage] for stage in self.net_arch]
        return d


class Stage(nn.Module):
    def __init__(self, blocks: list[MixingBlock], downsample: nn.Module | None):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class SpachNet(nn.Module):
    """SPACH backbone. Input `(B, in_chans, H, W)`; `forward_features` returns normalised
    `(B, H', W', C)` tokens, `forward_head` pools them (mean) and classifies."""

    def __init__(self, cfg: SpachConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or SpachConfig(**kwargs)
        self.config = cfg
        self.family = family_of(cfg.net_arch)
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.img_size = cfg.img_size
        self.num_features = cfg.width(cfg.num_stages - 1)

        self.stem = Stem(cfg.stem_type, cfg.in_chans, cfg.hidden_dim, cfg.patch_size)
        self.norm_pre = LayerNorm(cfg.hidden_dim, eps=LN_EPS)
        self.pos_embed = nn.Parameter(torch.zeros(1, *cfg.grid(0), cfg.hidden_dim)) if cfg.pos_embed else None

        depths = [sum(d for _, d in stage) for stage in cfg.net_arch]
        total = sum(depths)
        if cfg.num_stages == 1:
            dpr = [cfg.drop_path_rate] * total
        else:
            dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        stages, k = [], 0
        self.feature_info = []
        for i, runs in enumerate(cfg.net_arch):
            dim = cfg.width(i)
            ctx = MixerContext(
                dim=dim, grid_size=cfg.grid(i), num_heads=cfg.num_heads, token_ratio=cfg.token_ratio,
                qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, drop=cfg.drop_rate,
            )
            shared: dict[str, nn.Module | None] = {}
            blocks = []
            for name, depth in runs:
                for _ in range(depth):
                    if not cfg.shared_spatial_func or name not in shared:
                        shared[name] = build_mixer(name, ctx)
                    blocks.append(MixingBlock(
                        dim, shared[name], cfg.channel_ratio, cfg.cpe, cfg.layer_scale, cfg.drop_rate, dpr[k],
                    ))
                    k += 1
            stages.append(Stage(blocks, Downsample(cfg.width(i - 1), dim) if i > 0 else None))
            stride = cfg.patch_size * 2**i
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)

        self.norm = LayerNorm(self.num_features, eps=LN_EPS)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, ChannelsLastGroupNorm1)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

    # --- timm conventions -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay (besides 1-d ones)."""
        skip = {"pos_embed"} if self.pos_embed is not None else set()
        return skip | {n for n, p in self.named_parameters() if n.endswith(".gamma") or p.ndim <= 1}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise SpachError(f"SPACH models pool by mean over tokens ('avg'); got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.stem(x))
        if self.pos_embed is not None:
            if x.shape[1:3] != self.pos_embed.shape[1:3]:
                raise SpachError(
                    f"the position embedding was built for a {tuple(self.pos_embed.shape[1:3])} token grid, "
                    f"got {tuple(x.shape[1:3])}; build the model with this img_size"
                )
            x = x + self.pos_embed
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

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
        """Stage outputs (timm's feature API): `(B, C, H, W)` with `output_fmt='NCHW'`, else `(B, H, W, C)`."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise SpachError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._embed(x)
        stages = self.stages if not (stop_early or torch.jit.is_scripting()) else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(to_nchw(y) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

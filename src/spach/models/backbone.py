"""The SPACH backbone: one model class for single- and multi-stage layouts, driven by `SpachConfig`.

A layout is a list of stages; each stage is a list of `(mixer, depth)` runs at one width. Stage `i`
has width `hidden_dim * 2**i`; stages after the first open with a 2x downsample. One stage is the
single-stage (ViT-like) layout, four the multi-stage (pyramid) layout; other counts work too.

No `from __future__ import annotations` here: torch.fx copies `forward`'s annotations into the code it
generates, and TorchScript cannot resolve them as strings.
"""
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

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
from spach.models import dwconv, focal, gated, gmlp, scan, window  # noqa: F401  (register the mixers after SPACH, DESIGN.md 2c)
from spach.models.checks import check_global_pool, check_grid
from spach.models.mixers import MixerContext, build_mixer, canonical_mixer

torch.fx.wrap("check_grid")

Arch = list[list[tuple[str, int]]]


def normalize_arch(net_arch: Sequence) -> Arch:
    """Accept the official formats: `[("attn", 12)]` (single-stage) or one list per stage."""
    if not isinstance(net_arch, (list, tuple)) or not net_arch:
        raise SpachError(f"net_arch {'is empty' if not net_arch else f'must be a non-empty list, got {net_arch!r}'}; give e.g. [('attn', 12)] (single-stage) "
                         "or [[('conv', 2)], [('attn', 2)], ...] (one list per stage)")
    if isinstance(net_arch[0], (tuple, list)) and len(net_arch[0]) == 2 and isinstance(net_arch[0][0], str):
        net_arch = [net_arch]
    arch: Arch = []
    for stage in net_arch:
        if not isinstance(stage, (list, tuple)):
            raise SpachError(f"net_arch stage {stage!r} is not a list of (mixer_name, depth) pairs")
        runs = []
        for run in stage:
            if not (isinstance(run, (tuple, list)) and len(run) == 2 and isinstance(run[0], str)
                    and isinstance(run[1], int) and not isinstance(run[1], bool) and run[1] > 0):
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
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_heads", "patch_size", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpachError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise SpachError(f"num_classes must be an integer >= 0 (0: no head), got {self.num_classes!r}")
        for name in ("token_ratio", "channel_ratio"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise SpachError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not isinstance(getattr(self, name), (int, float)) or not 0 <= getattr(self, name) < 1:
                raise SpachError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        self.net_arch = normalize_arch(self.net_arch)
        check_global_pool(self.global_pool)
        size = self.img_size
        if not isinstance(size, (int, list, tuple)):
            raise SpachError(f"img_size must be an integer or (height, width), got {size!r}")
        self.img_size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.img_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.img_size):
            raise SpachError(f"img_size must be an integer or (height, width) >= 1, got {size!r}")
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
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)


class SpachNet(nn.Module):
    """SPACH backbone. Input `(B, in_chans, H, W)`; `forward_features` returns normalised
    `(B, H', W', C)` tokens, `forward_head` pools them (mean) and classifies.

    timm's feature points (`feature_info`, `forward_intermediates`): one per stage in multi-stage
    layouts, one per block in the single-stage layout (as timm's ViTs)."""

    output_fmt = "NHWC"

    def __init__(self, cfg: SpachConfig | None = None, **kwargs: Any):
        super().__init__()
        cfg = cfg or SpachConfig(**kwargs)
        self.config = cfg
        self.family = family_of(cfg.net_arch)
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.img_size = cfg.img_size
        self.num_features = self.head_hidden_size = cfg.width(cfg.num_stages - 1)
        self.global_pool = cfg.global_pool
        self.grad_checkpointing = False

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
                qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, drop=cfg.drop_rate, channel_ratio=cfg.channel_ratio,
            )
            shared: dict[str, nn.Module | None] = {}
            blocks = []
            for name, depth in runs:
                for j in range(depth):
                    if not cfg.shared_spatial_func or name not in shared:  # a shared mixer: built for the first block
                        shared[name] = build_mixer(name, replace(ctx, block_index=j))
                    blocks.append(MixingBlock(
                        dim, shared[name], cfg.channel_ratio, cfg.cpe, cfg.layer_scale, cfg.drop_rate, dpr[k],
                    ))
                    k += 1
            stages.append(Stage(blocks, Downsample(cfg.width(i - 1), dim) if i > 0 else None))
            stride = cfg.patch_size * 2**i
            if cfg.num_stages == 1:
                self.feature_info += [dict(num_chs=dim, reduction=stride, module=f"stages.0.blocks.{j}") for j in range(k)]
            else:
                self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.default_out_indices = min(3, k) if cfg.num_stages == 1 else cfg.num_stages

        self.norm = LayerNorm(self.num_features, eps=LN_EPS)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.fixed_input_size = cfg.pos_embed or any(getattr(m, "fixed_input_size", False) for m in self.modules())
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
        for m in self.modules():  # a mixer's own init (gMLP's near-identity gate) after the generic one
            if m is not self and callable(getattr(m, "init_weights", None)):
                m.init_weights()
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
        return skip | {n for n, p in self.named_parameters()
                       if n.endswith(".gamma") or p.ndim <= 1 or getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.stem(x))
        if self.pos_embed is not None:
            x = check_grid(x, self.pos_embed.shape[1], self.pos_embed.shape[2], 1, "the position embedding's token grid")
            x = x + self.pos_embed
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _feature_modules(self) -> list[nn.Module]:
        return list(self.stages[0].blocks) if len(self.stages) == 1 else list(self.stages)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature-point outputs (timm's feature API): `(B, C, H, W)` with `output_fmt='NCHW'`, else
        `(B, H, W, C)`; `norm` applies the final norm to those of the final width."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise SpachError(f"output_fmt must be 'NCHW' or 'NHWC', not {output_fmt!r}")
        modules = self._feature_modules()
        take, max_index = feature_take_indices(len(modules), indices)
        per_block = len(self.stages) == 1 and self.grad_checkpointing
        intermediates = []
        x = self._embed(x)
        for i, module in enumerate(modules[: max_index + 1] if stop_early else modules):
            x = checkpoint(module, x) if per_block else module(x)
            if i in take:
                y = self.norm(x) if norm and self.feature_info[i]["num_chs"] == self.num_features else x
                intermediates.append(to_nchw(y) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        if len(self.stages) == 1:
            self.stages[0].blocks = self.stages[0].blocks[: max_index + 1]
        else:
            self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

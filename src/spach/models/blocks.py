"""Building blocks of the SPACH backbone: the mixing block, stems and the stage downsample.

Inside the network, tokens live as channels-last images `(B, H, W, C)`: the same memory as the
`(B, N, C)` token sequence of the official code, and a free `permute` away from a channels-last
`(B, C, H, W)` view, so the depthwise convolutions and the downsample need no layout copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

LN_EPS = 1e-6


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view in channels-last memory format (no copy)."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) view; contiguous when `x` is channels-last."""
    return x.permute(0, 2, 3, 1)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and result) that normalises a bf16/fp16 CPU input of a width
    that is not a multiple of 16 in fp32: torch's low-precision CPU kernel runs such widths through a
    scalar tail, 4x slower than fp32 at width 24 (forward + backward; the battle's first stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and self.normalized_shape[-1] % 16:
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


class MixingBlock(nn.Module):
    """`y = x + DropPath(gamma * S(LN1(x))) + CPE(x)`, then `out = y + DropPath(MLP(LN2(y)))`.

    `mixer=None` is the conv family: no LN1, no gamma, only the depthwise-conv bypass (CPE).
    A shared mixer is passed in already built; the block only holds a reference to it.
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module | None,
        channel_ratio: float = 2.0,
        cpe: bool = True,
        layer_scale: float | None = 1e-4,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if mixer is not None:
            self.norm1 = LayerNorm(dim, eps=LN_EPS)
            self.mixer = mixer
            self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None
        else:
            self.mixer = None
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * channel_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.mixer is not None:
            s = self.mixer(self.norm1(x))
            if self.gamma is not None and isinstance(self.drop_path, nn.Identity):
                y = torch.addcmul(x, s, self.gamma)  # x + gamma * s in one pass over memory
            else:
                y = x + self.drop_path(s * self.gamma if self.gamma is not None else s)
        if self.cpe is not None:
            c = to_nhwc(self.cpe(to_nchw(x)))
            # Accumulate into a buffer this block allocated (never into the input x).
            y = y.add_(c) if self.mixer is not None else y + c
        return y + self.drop_path(self.mlp(self.norm2(y)))


class ChannelsLastGroupNorm1(nn.GroupNorm):
    """GroupNorm with one group on `(B, H, W, C)` tokens: a LayerNorm over (H, W, C) plus a
    per-channel affine, computed without converting the layout."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[1:], eps=self.eps), self.weight)


class Downsample(nn.Module):
    """Stage transition: 2x2 stride-2 conv doubling the width (no bias), then GroupNorm(1, 2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2, bias=False)
        self.norm = ChannelsLastGroupNorm1(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_nhwc(self.conv(to_nchw(x))))


class Stem(nn.Module):
    """Patch embedding. `conv1`: one `patch x patch` conv. `conv4` (LV-ViT, the "+" models): a 7x7/2
    conv and two 3x3 convs (BN, ReLU) then a `patch/2` conv. Returns `(B, H/p, W/p, C)` tokens."""

    def __init__(self, stem_type: str, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        if stem_type == "conv1":
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        elif stem_type == "conv4":
            mid = 64
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, mid, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, dim, kernel_size=patch_size // 2, stride=patch_size // 2),
            )
        else:
            raise ValueError(f"unknown stem_type {stem_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.proj(x.contiguous(memory_format=torch.channels_last))).contiguous()

"""MambaOut's Gated CNN block (Yu & Wang 2024, "MambaOut: Do We Really Need Mamba for Vision?",
arXiv 2405.07992) as the `gatedconv` entry of a SPACH layout.

On channels-last tokens `X` of width C, with hidden width h and `[g, i, c]` split at `(h, h - C, C)`:

    [g, i, c] = split(X W1 + b1)                 W1: C -> 2h
    Y = (act(g) * [i, DWConv_7x7(c)]) W2 + b2    W2: h -> C, act = GELU

It is timm's `mambaout.GatedConvBlock` (kernel 7, `conv_ratio` 1: the 7x7 depthwise conv sees C of the
h channels) without its own residual and norm, which the skeleton supplies.

How it sits in the SPACH skeleton. A Gated CNN block has no separate channel MLP: it is a gated MLP
with a large-kernel depthwise conv on part of its hidden width. So it takes the **channel MLP's
place** in the skeleton's block, and the block has no spatial-mixer branch (as the conv family's):

    y   = x + CPE(x)                               (the skeleton's 3x3 depthwise bypass, if cpe)
    out = y + DropPath(GatedCNN(LN2(y)))           (no layer scale: the skeleton has none on this branch)

Cost matching. The skeleton's channel MLP of ratio r costs 2 r C^2 MACs per token; the Gated CNN's
linear layers cost 3 h C, so h = 2 r C / 3 (int) makes them equal: r = 4 gives MambaOut's 8/3
expansion, the skeleton's default r = 2 gives 4/3. A `gatedconv` block then costs
`9C + 3hC + 49C` per token (CPE, linear layers, 7x7 conv) against a conv block's `9C + 2rC^2`: the
same up to the 49C of its 7x7 conv. Its parameters: `2hC + 2h + 49C + C + hC + C` for the unit,
plus the block's LN2 and CPE.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from spach.errors import SpachError
from spach.models.mixers import register_mixer


@register_mixer("gatedconv")
class GatedConv(nn.Module):
    """MambaOut's Gated CNN unit; `replaces_channel_mlp`: the block puts it where its channel MLP goes."""

    replaces_channel_mlp = True

    def __init__(self, dim: int, channel_ratio: float = 2.0, drop: float = 0.0, kernel_size: int = 7):
        super().__init__()
        hidden = int(2 * channel_ratio / 3 * dim)
        if hidden < dim:
            raise SpachError(
                f"the gatedconv block's hidden width int(2/3 * channel_ratio * C) = {hidden} is below its {dim} "
                f"convolved channels; use a channel_ratio of at least 1.5 (got {channel_ratio})"
            )
        self.split_sizes = [hidden, hidden - dim, dim]
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        g, i, c = torch.split(self.fc1(x), self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.drop(self.act(g) * torch.cat((i, c), dim=-1))))


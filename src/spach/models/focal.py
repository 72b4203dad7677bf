"""Focal modulation as a spatial mixer: `focal` (L = 2 levels) or `focal<L>` (Yang et al., "Focal
Modulation Networks", NeurIPS 2022, arXiv 2203.11926).

    [q, z_0, g] = Linear(C, 2C + L + 1)(x)                            (query, context, L + 1 gates)
    z_l = GELU(DWConv_{k_l}(z_{l-1})),  k_l = k_0 + 2(l - 1),  l = 1..L    (k_0 = 3: kernels 3, 5, 7, ...)
    z_{L+1} = GELU(mean over the grid of z_L)                           (the global level)
    S(x) = proj(q * h(sum_{l=1}^{L+1} g_l z_l)),   h, proj = Linear(C, C)   (1x1 convolutions)

as timm's `FocalModulation` (FocalNet's defaults: L = 2 "srf", L = 3 "lrf", k_0 = 3; no post-norm, the
modulator not normalised). MACs per token: C(2C + L + 1) + 2C^2 + C sum_l k_l^2 (the global mean is a
reduction, left out like the norms).
"""
import torch
import torch.nn as nn

from spach.errors import SpachError
from spach.models.blocks import to_nchw, to_nhwc
from spach.models.mixers import register_mixer


@register_mixer("focal", param="focal_level")
class FocalModulation(nn.Module):
    """Gated sum of L depthwise-conv context levels and a global one, modulating a linear query."""

    def __init__(self, dim: int, focal_level: int = 2, focal_window: int = 3, drop: float = 0.0):
        super().__init__()
        if focal_level < 1:
            raise SpachError(
                f"focal{focal_level}: focal modulation needs at least 1 level; use focal2 (FocalNet's srf) or focal3 (lrf)"
            )
        self.dim, self.focal_level = dim, focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.focal_layers = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False)
            for k in (focal_window + 2 * level for level in range(focal_level))
        )
        self.act = nn.GELU()
        self.h = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, L = self.dim, self.focal_level
        q, ctx, gates = torch.split(self.f(x), [C, C, L + 1], dim=-1)
        ctx = ctx.contiguous()  # (B, H, W, C): the convolutions run on its channels-last view
        ctx_all = torch.zeros_like(ctx)
        for level, conv in enumerate(self.focal_layers):
            ctx = self.act(to_nhwc(conv(to_nchw(ctx))))
            ctx_all = ctx_all + ctx * gates[..., level:level + 1]
        ctx_global = self.act(ctx.mean(dim=(1, 2), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[..., L:]
        return self.proj_drop(self.proj(q * self.h(ctx_all)))

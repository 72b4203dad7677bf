"""Building blocks of the SPACH backbone: the mixing block, stems and the stage downsample.

Inside the network, tokens live as channels-last images `(B, H, W, C)`: the same memory as the
`(B, N, C)` token sequence of the official code, and a free `permute` away from a channels-last
`(B, C, H, W)` view, so the depthwise convolutions and the downsample need no layout copies.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

LN_EPS = 1e-6


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs x's matmuls and convs in, or None where autocast is off (or, as on
    the meta device, does not exist). None in TorchScript and while FX traces: their graphs take the
    plain path, which gives the same result under autocast, just without the copies saved."""
    if torch.jit.is_scripting():
        return None
    return _eager_autocast_dtype(x)


@torch.jit.unused
def _eager_autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return None
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


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
        if not torch.jit.is_scripting():  # (scripted and FX-traced graphs normalise in the input's dtype)
            if _slow_low_precision_width(x, self.normalized_shape[-1]):
                return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@torch.jit.unused
def _slow_low_precision_width(x: torch.Tensor, width: int) -> bool:
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    return x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and width % 16 != 0


class MixingBlock(nn.Module):
    """`y = x + DropPath(gamma * S(LN1(x))) + CPE(x)`, then `out = y + DropPath(MLP(LN2(y)))`.

    The CPE's residual `x + CPE(x)` runs as one depthwise conv whose kernel has the identity added
    (the same sum, up to rounding), in the residual stream's own precision.

    `mixer=None` is the conv family: no LN1, no gamma, only the depthwise-conv bypass (CPE).
    A mixer that `replaces_channel_mlp` (MambaOut's Gated CNN) goes in the MLP's place instead:
    `y = x + CPE(x)`, `out = y + DropPath(mixer(LN2(y)))`.
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
        channel_mixer = mixer if getattr(mixer, "replaces_channel_mlp", False) else None
        if channel_mixer is not None:
            mixer = None
        if mixer is not None:
            self.norm1 = LayerNorm(dim, eps=LN_EPS)
            self.mixer = mixer
            self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None
        else:
            self.mixer = None
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        if cpe:  # the identity as a depthwise 3x3 kernel: x + CPE(x) is one conv with it added
            self.register_buffer("cpe_identity", F.pad(torch.ones(dim, 1, 1, 1), (1, 1, 1, 1)), persistent=False)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        if channel_mixer is None:
            channel_mixer = Mlp(dim, int(dim * channel_ratio), act_layer=nn.GELU, drop=drop)
        self.mlp = channel_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._with_cpe(x) if self.cpe is not None else x
        if self.mixer is not None:
            s = self.mixer(self.norm1(x))
            if self.gamma is not None and isinstance(self.drop_path, nn.Identity):
                y = torch.addcmul(y, s, self.gamma)  # y + gamma * s in one pass over memory
            else:
                y = y + self.drop_path(s * self.gamma if self.gamma is not None else s)
        return y + self.drop_path(self.mlp(self.norm2(y)))

    def _with_cpe(self, x: torch.Tensor) -> torch.Tensor:
        """`x + CPE(x)` as one depthwise conv, the identity added to the kernel's centre tap: no separate
        add forward or backward. It runs in x's precision: on an fp32 residual stream autocast would
        round x to bf16 (and cast the result and its gradients back), so it is off for this conv."""
        weight = self.cpe.weight + self.cpe_identity
        if autocast_dtype(x) is not None and x.dtype == torch.float32:
            return self._conv_without_autocast(x, weight)
        return self._conv(x, weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return to_nhwc(F.conv2d(to_nchw(x), weight, self.cpe.bias, padding=1, groups=self.cpe.groups))

    @torch.jit.unused
    def _conv_without_autocast(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._conv(x, weight)


class ChannelsLastGroupNorm1(nn.GroupNorm):
    """GroupNorm with one group on `(B, H, W, C)` tokens: a LayerNorm over (H, W, C) plus a
    per-channel affine, computed without converting the layout."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[1:], eps=self.eps)
        # the affine in y's dtype, as nn.GroupNorm returns under autocast: fp32 parameters would
        # promote a bf16 residual stream to fp32 (a cast in front of every later op)
        return torch.addcmul(self.bias.to(y.dtype), y, self.weight.to(y.dtype))


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
        low = autocast_dtype(x)
        if low is not None and x.dtype == torch.float32:
            # one copy for the layout and autocast's cast of the image, instead of one each
            x = x.to(low, memory_format=torch.channels_last)
        return to_nhwc(self.proj(x.contiguous(memory_format=torch.channels_last))).contiguous()

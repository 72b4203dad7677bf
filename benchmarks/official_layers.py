"""A faithful `nn.Module` port of the official SPACH layers (microsoft/SPACH), the baseline of
`vs_reference.py`: the same ops in the same order as the official code, run the official way
(eager; autocast for bf16).

- tokens are `(B, N, C)` throughout;
- attention: `Linear` qkv, reshape to (B, N, 3, heads, head_dim), permute, index q/k/v (the
  non-contiguous views are copied by `matmul`), `q * scale`, `q @ k^T`, `softmax`, `@ v`, transpose
  back, `Linear` proj;
- token-mixing MLP: `Linear` on the transposed `(B, C, N)` tokens;
- CPE and the stage downsample: tokens reshaped to NCHW (einops' `b (h w) c -> b c h w`), the conv,
  then back to `(B, N, C)` tokens;
- the block: `x + gamma_1 * S(norm1(x))`, `+ CPE(x)` (the block input), `+ channel_func(norm2(.))`.

`OfficialNet.from_state_dict(sd, num_heads)` builds the modules from an official-layout state dict
(`spach.spach_to_official(model.state_dict())`) and loads it strictly (parameter names are the
official ones). `tests/test_official_layers.py` checks it against `tests/official_reference.py`.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

LN_EPS = 1e-6


def tokens_to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TokenMLP(nn.Module):
    def __init__(self, num_tokens: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(num_tokens, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_tokens)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x.transpose(1, 2)
        x = self.fc2(self.act(self.fc1(x)))
        return x.transpose(1, 2)


class ChannelMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvOnImage(nn.Module):
    """`net = [to NCHW, module, to tokens]`, the official wrapper of the CPE and the downsample."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.net = nn.ModuleList([nn.Identity(), module, nn.Identity()])

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return image_to_tokens(self.net[1](tokens_to_image(x, h, w)))


class MixingBlock(nn.Module):
    def __init__(self, dim: int, spatial_func: nn.Module | None, mlp_hidden: int, cpe: bool, gamma: bool):
        super().__init__()
        if spatial_func is not None:
            self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
            self.spatial_func = spatial_func
            self.gamma_1 = nn.Parameter(torch.ones(1, 1, dim)) if gamma else None
        else:
            self.spatial_func = None
        self.cpe_net = ConvOnImage(nn.Conv2d(dim, dim, 3, padding=1, groups=dim)) if cpe else None
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.channel_func = ChannelMLP(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        y = x
        if self.spatial_func is not None:
            s = self.spatial_func(self.norm1(x), h, w)
            y = x + (self.gamma_1 * s if self.gamma_1 is not None else s)
        if self.cpe_net is not None:
            y = y + self.cpe_net(x, h, w)
        return y + self.channel_func(self.norm2(y), h, w)


class Downsample(ConvOnImage):
    def __init__(self, dim: int, out_dim: int):
        super().__init__(nn.Sequential(nn.Conv2d(dim, out_dim, 2, stride=2, bias=False), nn.GroupNorm(1, out_dim)))


class Stem(nn.Module):
    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        if "stem.proj.weight" in sd:
            out, cin, k, _ = sd["stem.proj.weight"].shape
            self.proj = nn.Conv2d(cin, out, k, stride=k)
        else:
            mid, cin = sd["stem.proj.0.weight"].shape[:2]
            out, _, k, _ = sd["stem.proj.9.weight"].shape
            self.proj = nn.Sequential(
                nn.Conv2d(cin, mid, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, out, k, stride=k),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _block(sd: dict[str, torch.Tensor], p: str, num_heads: int) -> nn.Module:
    if p + ".net.1.0.weight" in sd:
        out, dim = sd[p + ".net.1.0.weight"].shape[:2]
        return Downsample(dim, out)
    hidden, dim = sd[p + ".channel_func.fc1.weight"].shape
    if p + ".spatial_func.qkv.weight" in sd:
        spatial: nn.Module | None = Attention(dim, num_heads)
    elif p + ".spatial_func.fc1.weight" in sd:
        spatial = TokenMLP(*reversed(sd[p + ".spatial_func.fc1.weight"].shape))
    else:
        spatial = None
    return MixingBlock(dim, spatial, hidden, cpe=p + ".cpe_net.net.1.weight" in sd, gamma=p + ".gamma_1" in sd)


class OfficialNet(nn.Module):
    """The official model (single-stage `blocks.*` or multi-stage `layer{1..4}.*`), input `(B, C, H, W)`."""

    def __init__(self, sd: dict[str, torch.Tensor], num_heads: int):
        super().__init__()
        self.stem = Stem(sd)
        dim = sd["norm1.weight"].shape[0]
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        prefixes = sorted({m[1] for k in sd if (m := re.match(r"(blocks|layer\d)\.", k))})
        self.stage_names = prefixes
        for name in prefixes:
            n = 1 + max(int(m[1]) for k in sd if (m := re.match(rf"{name}\.(\d+)\.", k)))
            self.add_module(name, nn.ModuleList([_block(sd, f"{name}.{j}", num_heads) for j in range(n)]))
        self.norm2 = nn.LayerNorm(sd["norm2.weight"].shape[0], eps=LN_EPS)
        self.head = nn.Linear(*reversed(sd["head.weight"].shape))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], num_heads: int) -> "OfficialNet":
        net = cls(sd, num_heads)
        net.load_state_dict(sd, strict=True)
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[-2:]
        x = self.norm1(image_to_tokens(x))
        for name in self.stage_names:
            for blk in getattr(self, name):
                x = blk(x, h, w)
                if isinstance(blk, Downsample):
                    h, w = h // 2, w // 2
        return self.head(self.norm2(x).mean(dim=1))

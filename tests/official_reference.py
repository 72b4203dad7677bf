"""A straightforward transcription of DESIGN.md section 2, written against the *official* parameter
names and the official `(B, N, C)` token layout (transposes, explicit softmax). Tests use it as the
oracle for our models: same state dict (official layout) + same input => same output."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

EPS = 1e-6


def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=EPS)


def _linear(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return x @ sd[p + ".weight"].t() + sd[p + ".bias"]


def _tokens_to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w)


def _image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def attention(x: torch.Tensor, sd: dict, p: str, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    d = c // num_heads
    qkv = _linear(x, sd, p + ".qkv").reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return _linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".proj")


def token_mlp(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    t = x.transpose(1, 2)  # (B, C, N)
    t = _linear(F.gelu(_linear(t, sd, p + ".fc1")), sd, p + ".fc2")
    return t.transpose(1, 2)


def block(x: torch.Tensor, sd: dict, p: str, h: int, w: int, num_heads: int) -> torch.Tensor:
    y = x
    if p + ".norm1.weight" in sd:
        z = _ln(x, sd, p + ".norm1")
        s = attention(z, sd, p + ".spatial_func", num_heads) if p + ".spatial_func.qkv.weight" in sd else token_mlp(z, sd, p + ".spatial_func")
        y = x + (sd[p + ".gamma_1"] * s if p + ".gamma_1" in sd else s)
    if p + ".cpe_net.net.1.weight" in sd:
        c = x.shape[-1]
        conv = F.conv2d(_tokens_to_image(x, h, w), sd[p + ".cpe_net.net.1.weight"], sd[p + ".cpe_net.net.1.bias"], padding=1, groups=c)
        y = y + _image_to_tokens(conv)
    mlp = _linear(F.gelu(_linear(_ln(y, sd, p + ".norm2"), sd, p + ".channel_func.fc1")), sd, p + ".channel_func.fc2")
    return y + mlp


def stem(x: torch.Tensor, sd: dict) -> torch.Tensor:
    if "stem.proj.weight" in sd:
        k = sd["stem.proj.weight"].shape[-1]
        return F.conv2d(x, sd["stem.proj.weight"], sd["stem.proj.bias"], stride=k)
    for i, (stride, pad) in zip((0, 3, 6), ((2, 3), (1, 1), (1, 1))):
        x = F.conv2d(x, sd[f"stem.proj.{i}.weight"], stride=stride, padding=pad)
        bn = f"stem.proj.{i + 1}"
        x = F.relu(F.batch_norm(x, sd[bn + ".running_mean"], sd[bn + ".running_var"], sd[bn + ".weight"], sd[bn + ".bias"], eps=1e-5))
    k = sd["stem.proj.9.weight"].shape[-1]
    return F.conv2d(x, sd["stem.proj.9.weight"], sd["stem.proj.9.bias"], stride=k)


def forward(sd: dict, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The official model's logits for input `x` (B, C, H, W) with official state dict `sd`."""
    x = stem(x, sd)
    h, w = x.shape[-2:]
    x = _ln(_image_to_tokens(x), sd, "norm1")
    if any(k.startswith("blocks.") for k in sd):
        n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        for j in range(n):
            x = block(x, sd, f"blocks.{j}", h, w, num_heads)
    else:
        for s in range(1, 5):
            n = 1 + max(int(m[1]) for k in sd if (m := re.match(rf"layer{s}\.(\d+)\.", k)))
            for j in range(n):
                p = f"layer{s}.{j}"
                if p + ".net.1.0.weight" in sd:  # downsample
                    img = F.conv2d(_tokens_to_image(x, h, w), sd[p + ".net.1.0.weight"], stride=2)
                    img = F.group_norm(img, 1, sd[p + ".net.1.1.weight"], sd[p + ".net.1.1.bias"], eps=1e-5)
                    h, w = img.shape[-2:]
                    x = _image_to_tokens(img)
                else:
                    x = block(x, sd, p, h, w, num_heads)
    x = _ln(x, sd, "norm2").mean(dim=1)
    return _linear(x, sd, "head")

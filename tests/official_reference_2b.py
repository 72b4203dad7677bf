"""A straightforward transcription of DESIGN.md section 2b (sMLPNet and ShiftViT), written against the
*official* parameter names and layouts, in plain tensor ops (einsum for the sparse MLP's axis
mixing, slice assignment for the shift). Tests use it as the oracle for our models: same state dict
(official layout) + same input => same output. BatchNorm runs in inference mode (running stats)."""
import re

import torch
import torch.nn.functional as F

EPS = 1e-5


def _bn(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], eps=EPS)


def _gn1(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.group_norm(x, 1, sd[p + ".weight"], sd[p + ".bias"], eps=EPS)


def _linear(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return x @ sd[p + ".weight"].t() + sd[p + ".bias"]


def _count(sd: dict, pattern: str) -> int:
    return 1 + max(int(m[1]) for k in sd if (m := re.match(pattern, k)))


# --- sMLPNet --------------------------------------------------------------------------------------
def smlp_token_mix(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    c = x.shape[1]
    y = F.conv2d(F.gelu(_bn(x, sd, p + ".0.conv_merge.BN")), sd[p + ".0.conv_merge.Conv.weight"], padding=1, groups=c)
    z = F.gelu(_bn(y, sd, p + ".1.BN"))
    # proj_h holds the W x W matrix: it mixes along the width; proh_w (H x H) along the height.
    mix_w, bias_w = sd[p + ".1.proj_h.weight"][:, :, 0, 0], sd[p + ".1.proj_h.bias"]
    mix_h, bias_h = sd[p + ".1.proh_w.weight"][:, :, 0, 0], sd[p + ".1.proh_w.bias"]
    a = torch.einsum("vw,bchw->bchv", mix_w, z) + bias_w[None, None, None, :]
    b = torch.einsum("gh,bchw->bcgw", mix_h, z) + bias_h[None, None, :, None]
    return F.conv2d(torch.cat([z, a, b], dim=1), sd[p + ".1.fuse.weight"])


def smlp_channel_mix(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    t = x.permute(0, 2, 3, 1)
    t = F.layer_norm(t, t.shape[-1:], sd[p + ".1.weight"], sd[p + ".1.bias"], eps=EPS)
    t = _linear(F.gelu(_linear(t, sd, p + ".2.net.0")), sd, p + ".2.net.3")
    return t.permute(0, 3, 1, 2)


def smlpnet_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The official sMLPNet's logits for input `x` (B, C, H, W) with official state dict `sd`."""
    k, n = 0, _count(sd, r"token_mix\.(\d+)\.")
    for i in range(_count(sd, r"to_patch_embedding\.(\d+)\.")):
        w = sd[f"to_patch_embedding.{i}.0.weight"]
        x = F.conv2d(x, w, stride=w.shape[-1])
        while k < n and sd[f"token_mix.{k}.0.conv_merge.Conv.weight"].shape[0] == x.shape[1]:
            x = x + smlp_token_mix(x, sd, f"token_mix.{k}")
            x = x + smlp_channel_mix(x, sd, f"channel_mix.{k}")
            k += 1
    x = _bn(x, sd, "batch_norm").mean(dim=(2, 3))
    return _linear(x, sd, "mlp_head.0")


# --- ShiftViT ------------------------------------------------------------------------------------
def shift(x: torch.Tensor, n_div: int) -> torch.Tensor:
    g = x.shape[1] // n_div
    out = torch.zeros_like(x)
    out[:, :g, :, :-1] = x[:, :g, :, 1:]                 # left: out[..., w] = x[..., w + 1]
    out[:, g:2 * g, :, 1:] = x[:, g:2 * g, :, :-1]       # right
    out[:, 2 * g:3 * g, :-1, :] = x[:, 2 * g:3 * g, 1:, :]  # up
    out[:, 3 * g:4 * g, 1:, :] = x[:, 3 * g:4 * g, :-1, :]  # down
    out[:, 4 * g:] = x[:, 4 * g:]
    return out


def _conv1x1(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"])


def shiftvit_forward(sd: dict, x: torch.Tensor, n_div: int = 12) -> torch.Tensor:
    """The official ShiftViT's logits for input `x` (B, C, H, W) with official state dict `sd`."""
    w = sd["patch_embed.proj.weight"]
    x = _gn1(F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]), sd, "patch_embed.norm")
    for i in range(_count(sd, r"layers\.(\d+)\.")):
        for j in range(_count(sd, rf"layers\.{i}\.blocks\.(\d+)\.")):
            p = f"layers.{i}.blocks.{j}"
            x = shift(x, n_div)
            x = x + _conv1x1(F.gelu(_conv1x1(_gn1(x, sd, p + ".norm2"), sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
        if f"layers.{i}.downsample.reduction.weight" in sd:
            x = F.conv2d(_gn1(x, sd, f"layers.{i}.downsample.norm"), sd[f"layers.{i}.downsample.reduction.weight"], stride=2)
    x = _gn1(x, sd, "norm").mean(dim=(2, 3))
    return _linear(x, sd, "head")

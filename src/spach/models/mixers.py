"""Spatial mixers: the one module that differs between the SPACH families, and their registry.

Every mixer maps channels-last image tokens `(B, H, W, C)` to the same shape. Its constructor names
the facts it needs from `MixerContext` (e.g. `dim`, `num_heads`, `num_tokens`); the builder passes
exactly those, so a new mixer is a small class plus one `@register_mixer("name")` line:

    @register_mixer("maxpool")
    class MaxPool(nn.Module):
        def __init__(self, pool_size: int = 3):
            super().__init__()
            self.pool = nn.MaxPool2d(pool_size, 1, pool_size // 2)

        def forward(self, x):                       # (B, H, W, C)
            y = x.permute(0, 3, 1, 2)               # channels-last view, no copy
            return (self.pool(y) - y).permute(0, 2, 3, 1)

Ops that torch's FLOP counter does not see (pooling, say) are counted by an `uncounted_macs(x)`
method on the mixer (see `spach.models.flops`). A mixer whose weights need their own initialisation
(the backbone gives every Linear xavier-uniform weights) does it in an `init_weights()` method, which
the backbone calls after its own init (as timm's models do); a parameter to keep out of weight decay
carries `_no_weight_decay = True` (Swin's relative position bias table, the scan's A and D).

A mixer with one integer hyper-parameter registers with `param=` naming its constructor argument:
`@register_mixer("dwconv", param="kernel_size")` makes `dwconv7`, `dwconv31`, ... name it with that
value; the bare `dwconv` is the constructor's default (`dwconv7`), which is also its canonical name.

The "conv" family has no spatial-mixing module at all (its block is only the 3x3 depthwise conv bypass
and the channel MLP): its name is listed in `MIXERS_WITHOUT_MODULE` and `build_mixer` returns None.
A mixer class with `replaces_channel_mlp = True` (MambaOut's Gated CNN, `spach.models.gated`) is put in
the block's channel-MLP slot instead: its block has the CPE and that module, no LN1/gamma branch.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from spach.errors import SpachError
from spach.models.attention import multi_head_attention
from spach.models.checks import check_grid
from spach.models.token_mlp import token_mlp

torch.fx.wrap("check_grid")


@dataclass(frozen=True)
class MixerContext:
    """What a block knows when it builds its mixer; a mixer's __init__ takes any subset by name."""

    dim: int
    grid_size: tuple[int, int]
    num_heads: int = 1
    token_ratio: float = 0.5
    qkv_bias: bool = True
    attn_drop: float = 0.0
    drop: float = 0.0
    channel_ratio: float = 2.0
    block_index: int = 0  # the block's place in its net_arch run of this mixer (0 = first): Swin shifts odd ones

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


_MIXERS: dict[str, type[nn.Module]] = {}
_PARAMS: dict[str, str] = {}  # mixer name -> the constructor argument a number after the name sets
# Mixer names whose block has no spatial-mixing module (the conv family: CPE + channel MLP only).
MIXERS_WITHOUT_MODULE = {"conv"}
_ALIASES = {"pass": "conv", "transformer": "attn", "trans": "attn"}
_NUMBERED = re.compile(r"([A-Za-z_]\w*?)(\d+)")


def register_mixer(name: str, param: str | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a spatial mixer available by `name` in every layout. With `param` (an
    integer constructor argument with a default), `name<int>` builds it with that value."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        numbered = _NUMBERED.fullmatch(name)
        if name in _MIXERS or name in MIXERS_WITHOUT_MODULE or name in _ALIASES or (numbered and numbered[1] in _PARAMS):
            raise ValueError(f"a spatial mixer named {name!r} is already registered")
        if param is not None:
            arg = inspect.signature(cls.__init__).parameters.get(param)
            if arg is None or not isinstance(arg.default, int):
                raise ValueError(f"mixer {name!r}: param {param!r} must be an integer argument of {cls.__name__} with a default")
            _PARAMS[name] = param
        _MIXERS[name] = cls
        return cls

    return add


def _split(name: str) -> tuple[str, int | None]:
    """('dwconv', 7) for 'dwconv7' when 'dwconv' takes a number; (name, None) otherwise."""
    numbered = _NUMBERED.fullmatch(name)
    if numbered and numbered[1] in _PARAMS and name not in _MIXERS:
        return numbered[1], int(numbered[2])
    return name, None


def _default(name: str) -> int:
    return inspect.signature(_MIXERS[name].__init__).parameters[_PARAMS[name]].default


def canonical_mixer(name: str) -> str:
    """The registered name for `name` (resolving official aliases such as 'pass'; a mixer that takes a
    number always with it: 'window' -> 'window7'), or a clear error."""
    name, value = _split(_ALIASES.get(name, name))
    if name in _PARAMS:
        return f"{name}{_default(name) if value is None else value}"
    if name not in _MIXERS and name not in MIXERS_WITHOUT_MODULE:
        raise SpachError(
            f"unknown spatial mixer {name!r}; known: {', '.join(list_mixers(forms=True))} "
            "(register a new one with spach.register_mixer)"
        )
    return name


def list_mixers(forms: bool = False) -> list[str]:
    """The mixer names a `net_arch` takes; a mixer that takes a number is listed by its default
    ('dwconv7'), or with `forms=True` by its form ('dwconv<kernel_size>')."""
    numbered = {n: f"{n}<{p}>" if forms else f"{n}{_default(n)}" for n, p in _PARAMS.items()}
    return sorted(MIXERS_WITHOUT_MODULE | {numbered.get(n, n) for n in _MIXERS})


def build_mixer(name: str, ctx: MixerContext) -> nn.Module | None:
    """Build mixer `name`, passing only the context fields its constructor asks for (and the number
    in a name such as 'dwconv7' as the argument that mixer registered for it)."""
    name, value = _split(canonical_mixer(name))
    if name in MIXERS_WITHOUT_MODULE:
        return None
    cls = _MIXERS[name]
    available = {f.name: getattr(ctx, f.name) for f in fields(ctx)} | {"num_tokens": ctx.num_tokens}
    wanted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in available.items() if k in wanted}
    if value is not None:
        kwargs[_PARAMS[name]] = value
    return cls(**kwargs)


@register_mixer("attn")
class Attention(nn.Module):
    """Multi-head self-attention over all tokens; the kernel is picked per device, dtype and shape by
    measured speed (`spach.models.attention`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise SpachError(f"attention width {dim} is not divisible by num_heads={num_heads}; pick num_heads dividing it")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3 * C)
        y = multi_head_attention(qkv, self.num_heads, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(y.reshape(B, H, W, C)))


@register_mixer("mlp")
class TokenMLP(nn.Module):
    """MLP along the token axis (MLP-Mixer style); its weights tie the model to one token count.

    Parameters keep the official `nn.Linear(N, N*ratio)` layout; the product runs in the form measured
    fastest for the call (`spach.models.token_mlp`: from the left per image, batch-folded, or the
    official `Linear` on transposed tokens).
    """

    fixed_input_size = True

    def __init__(self, grid_size: tuple[int, int], token_ratio: float = 0.5, drop: float = 0.0):
        super().__init__()
        self.grid_size = tuple(grid_size)
        num_tokens = self.num_tokens = grid_size[0] * grid_size[1]
        hidden = int(num_tokens * token_ratio)
        if hidden < 1:  # torch would build zero-width layers with only a warning
            raise SpachError(
                f"the token-mixing MLP on a {grid_size[0]}x{grid_size[1]} token grid has int({num_tokens} * {token_ratio}) = 0 "
                f"hidden units; build the model with a larger img_size or a token_ratio of at least {1 / num_tokens:g}"
            )
        self.fc1 = nn.Linear(num_tokens, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_tokens)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_grid(x, self.grid_size[0], self.grid_size[1], 1, "the token-mixing MLP's token grid")
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        if torch.jit.is_scripting():  # TorchScript cannot call the chosen form: the `left` one, written out
            t = self.drop(self.act(torch.baddbmm(self.fc1.bias[:, None], self.fc1.weight.expand(B, -1, -1), t)))
            t = self.drop(torch.baddbmm(self.fc2.bias[:, None], self.fc2.weight.expand(B, -1, -1), t))
        else:
            t = self._mix(t)
        return t.reshape(B, H, W, C)

    @torch.jit.unused
    def _mix(self, t: torch.Tensor) -> torch.Tensor:
        return token_mlp(t, self.fc1, self.fc2, self.act, self.drop)


# --- mixers beyond the paper (DESIGN.md 2b): the shift, the sparse MLP, and two lower bounds ------
def shift_channels(x: torch.Tensor, g: int) -> torch.Tensor:
    """ShiftViT's zero-parameter shift of `(B, C, H, W)` features (`g = C // n_div`): channels
    `[0, g)` move one pixel left along the width, `[g, 2g)` right, `[2g, 3g)` up along the height,
    `[3g, 4g)` down (vacated pixels are 0); the rest stay."""
    left = F.pad(x[:, :g, :, 1:], (0, 1))
    right = F.pad(x[:, g:2 * g, :, :-1], (1, 0))
    up = F.pad(x[:, 2 * g:3 * g, 1:, :], (0, 0, 0, 1))
    down = F.pad(x[:, 3 * g:4 * g, :-1, :], (0, 0, 1, 0))
    return torch.cat([left, right, up, down, x[:, 4 * g:]], dim=1)


@register_mixer("shift")
class Shift(nn.Module):
    """ShiftViT's shift as a spatial mixer: no parameters, no multiply-accumulates."""

    def __init__(self, dim: int, n_div: int = 12):
        super().__init__()
        if dim < n_div:
            raise SpachError(
                f"the shift mixer moves dim // {n_div} channels per direction; width {dim} moves none: use a width >= {n_div}"
            )
        self.g = dim // n_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_channels(x.permute(0, 3, 1, 2), self.g).permute(0, 2, 3, 1)


@register_mixer("smlp")
class SparseMLP(nn.Module):
    """sMLPNet's sparse MLP as a spatial mixer: `z = GELU(x)` (the block's LN1 stands in for sMLPNet's
    BatchNorm), `a` = `z` mixed along the width (`W x W` matrix + bias), `b` = `z` mixed along the
    height (`H x H`), output `Linear(3C, C, no bias)` of `[z, a, b]`. Tied to its grid like `mlp`.
    MACs per image: `H*W*C*(W + H) + 3*H*W*C*C`."""

    fixed_input_size = True

    def __init__(self, dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.proj_w = nn.Linear(grid_size[1], grid_size[1])
        self.proj_h = nn.Linear(grid_size[0], grid_size[0])
        self.fuse = nn.Linear(3 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.gelu(check_grid(x, self.grid_size[0], self.grid_size[1], 1, "the sparse-MLP mixer's token grid"))
        a = self.proj_w(z.transpose(2, 3)).transpose(2, 3)         # (B, H, C, W): mixes the width
        b = self.proj_h(z.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # (B, C, W, H): mixes the height
        return self.fuse(torch.cat([z, a, b], dim=-1))


@register_mixer("pool")
class Pool(nn.Module):
    """PoolFormer's pooling: `avgpool3x3(x) - x` (padding not counted in the average). torch's
    counter skips pooling; it is counted like a 3x3 depthwise conv: `9*H*W*C` MACs per image."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)
        return (self.pool(y) - y).permute(0, 2, 3, 1)

    def uncounted_macs(self, x: torch.Tensor) -> int:
        return x.numel() * self.pool.kernel_size**2


@register_mixer("identity")
class Identity(nn.Module):
    """MetaFormer's identity mixer: the block reduces to `x + gamma * LN1(x)`, the CPE and the
    channel MLP; the lower bound of what spatial mixing adds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

"""A selective state-space scan over the token grid as the `scan` mixer: Mamba's selective SSM (Gu &
Dao 2023, arXiv 2312.00752) run along several orders of the grid and merged, as VMamba's SS2D (Liu
et al. 2024, arXiv 2401.10166; Vim, Zhu et al. 2024, scans forward and backward).

The selective scan, per direction, inner channel e and state n, along the token sequence t:

    delta_t = softplus(W_dt (W_x x_t)[:R] + b_dt)            input-dependent step (E,)
    B_t, C_t = (W_x x_t)[R:R+N], (W_x x_t)[R+N:]              input-dependent B and C (N,)
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t            A = -exp(A_log) < 0 (S4D-real init)
    y_t = C_t . h_t + D x_t

The mixer (VMamba's SS2D; in the skeleton's mixer slot: LN1 before, gamma, the channel MLP after, as
VMamba v2's VSS block):

    [x, z] = in_proj(X)                          C -> 2E, no bias
    x = SiLU(DWConv3x3(x))                       with bias
    sequences: rows (row-major), columns (column-major), and both reversed (K = 4; K = 2: rows both ways)
    y = sum over directions of each scan's output, put back in row-major order
    out = out_proj(LN(y) * SiLU(z))              E -> C, no bias

Each direction has its own x_proj (E -> R + 2N), dt_proj (R -> E, with bias), A_log (E, N) and D (E).
Defaults: N = 1 state and E = C (VMamba's own Tiny: `ssm_d_state=1`, `ssm_ratio=1`), R = ceil(C / 16),
K = 4, Mamba's init. At the default battle's widths (C = 28-32, 8x8 tokens) the mixer then costs 4.4k-5.4k
MACs per token, between conv's 9C and attention's 6.7k-8.2k (4C^2 + 2NC); Mamba's N = 16 would cost 3.4x
attention there, and every state multiplies the elementwise work the CPU streams.

MACs per token: `2EC + 9E + K E (R + 2N) + K R E + K E (9N + 1) + E C`. torch's FLOP counter sees the
projections and the conv; the scan itself (elementwise work) it does not, so `uncounted_macs` adds
`K E (9N + 1)` per token: Mamba's reference count of the recurrence, 9 E N per token and direction
(mamba_ssm / VMamba `flops_selective_scan_fn`), plus E for `D x`. The gate, the norm and the merge are
elementwise and count 0, as everywhere in spach.

The scan runs in float32 (under autocast too) as a chunked scan (`linear_scan`), time-first; its
backward pass is the same scan run backwards in time (no autograd graph through the chunks).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from spach.models.blocks import LN_EPS, LayerNorm
from spach.models.mixers import register_mixer


def linear_scan(a: torch.Tensor, u: torch.Tensor, chunk: int = 8, reverse: bool = False) -> torch.Tensor:
    """`h_t = a_t * h_{t-1} + u_t` along dim 0 (`h_{-1} = 0`); `reverse`: `h_t = a_t * h_{t+1} + u_t`
    (`h_T = 0`). A chunked scan: the sequence is cut into chunks of `chunk` steps; one step of the
    recurrence at a time runs for all chunks at once (`chunk` vector operations, each over T/chunk
    tokens), with the running product of `a`. The chunks' end states obey the same recurrence with the
    chunks' products as decays, one level up: solved the same way until one chunk is left, then each
    chunk adds its incoming state times its running product. Python runs `3 * chunk` vector operations
    per level and log_chunk(T) levels, never a step per token. Only products of the decays are formed
    (no `exp(-cumsum)` factors): nothing overflows, and the result is the recurrence's up to rounding.

    No autograd through it (it writes in place): `selective_scan` gives it its own backward pass.
    """
    if chunk < 2:
        raise ValueError(f"the scan's chunk must be at least 2 steps, got {chunk}")
    levels: List[Tuple[torch.Tensor, torch.Tensor, int]] = []
    while True:
        length = a.shape[0]
        h, p = _scan_chunks(a, u, min(chunk, length), reverse)
        levels.append((h, p, length))
        if h.shape[0] == 1:
            break
        end = 0 if reverse else h.shape[1] - 1
        a, u = p[:, end], h[:, end]
    states = levels[-1][0].flatten(0, 1)[: levels[-1][2]]
    for k in range(len(levels) - 2, -1, -1):
        h, p, length = levels[k]
        zero = torch.zeros_like(states[:1])
        incoming = torch.cat([states[1:], zero]) if reverse else torch.cat([zero, states[:-1]])
        for i in range(h.shape[1]):
            h[:, i].addcmul_(p[:, i], incoming)
        states = h.flatten(0, 1)[:length]
    return states


def _scan_chunks(a: torch.Tensor, u: torch.Tensor, size: int, reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(states from a zero start, running products of `a`) within each chunk, both `(chunks, size, ...)`."""
    count = (a.shape[0] + size - 1) // size
    pad = count * size - a.shape[0]
    if pad:  # padded steps come after the sequence's end in either direction: they change none of its states
        spec = [0, 0] * (a.dim() - 1) + [0, pad]
        a, u = F.pad(a, spec), F.pad(u, spec)
    shape = [count, size] + list(a.shape[1:])
    a, u = a.reshape(shape), u.reshape(shape)
    h, p = torch.empty_like(u), torch.empty_like(a)
    first, stop, step = (size - 1, -1, -1) if reverse else (0, size, 1)
    h[:, first] = u[:, first]
    p[:, first] = a[:, first]
    for i in range(first + step, stop, step):
        torch.addcmul(u[:, i], a[:, i], h[:, i - step], out=h[:, i])
        torch.mul(a[:, i], p[:, i - step], out=p[:, i])
    return h, p


class _LinearScan(torch.autograd.Function):
    """`h = linear_scan(exp(log_a), u)` with its gradient: `g_u` is the scan of the output's gradient
    backwards in time (`g_u_t = g_h_t + a_{t+1} g_u_{t+1}`), and `g_log_a_t = g_u_t * a_t * h_{t-1}`."""

    @staticmethod
    def forward(ctx, log_a: torch.Tensor, u: torch.Tensor, chunk: int) -> torch.Tensor:
        a = torch.exp(log_a)
        h = linear_scan(a, u, chunk)
        ctx.save_for_backward(a, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        a, h = ctx.saved_tensors
        a_next = torch.empty_like(a)
        a_next[:-1], a_next[-1] = a[1:], 0.0
        grad_u = linear_scan(a_next, grad_h.contiguous(), ctx.chunk, reverse=True)
        grad_log_a = torch.empty_like(a)
        grad_log_a[0] = 0.0
        torch.mul(grad_u[1:], a[1:], out=grad_log_a[1:])
        grad_log_a[1:].mul_(h[:-1])
        return grad_log_a, grad_u, None


def _scan_terms(x: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor,
                dt_bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, log decay `delta A`, input `delta B x`) of the recurrence, at least in float32; the last two
    `(..., E, N)`."""
    x = _wide(x)
    delta = F.softplus(dt.to(x.dtype) + dt_bias.to(x.dtype))
    log_a = delta.unsqueeze(-1) * -torch.exp(A_log.to(x.dtype))
    return x, log_a, (delta * x).unsqueeze(-1) * B.to(x.dtype).unsqueeze(-2)


def _scan_output(h: torch.Tensor, x: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """`y = C . h + D x`."""
    return (h * C.to(x.dtype).unsqueeze(-2)).sum(-1) + D.to(x.dtype) * x


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is (bf16/fp16 inputs, e.g. under autocast, scan in float32)."""
    return x if x.dtype == torch.float64 else x.float()


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor, chunk: int = 8,
) -> torch.Tensor:
    """Mamba's selective scan along dim 0 of `x` `(T, batch, K, E)`, K directions at once: `dt`
    `(T, batch, K, E)` before its bias and softplus, `B` and `C` `(T, batch, K, N)`, `A_log` `(K, E, N)`,
    `D` and `dt_bias` `(K, E)`. Returns `y` `(T, batch, K, E)` in x's dtype, computed in float32 (float64
    for float64 inputs). In TorchScript, inference only (it cannot hold the scan's autograd function)."""
    xf, log_a, u = _scan_terms(x, dt, A_log, B, dt_bias)
    if torch.jit.is_scripting():
        if log_a.requires_grad or u.requires_grad:
            raise RuntimeError("a TorchScript scan mixer has no gradient: run it under torch.no_grad() (inference), "
                               "or train the eager model")
        h = linear_scan(torch.exp(log_a), u, chunk)
    else:
        h = _eager_scan(log_a, u, chunk)
    return _scan_output(h, xf, C, D).to(x.dtype)


torch.fx.wrap("selective_scan")  # a leaf for torch.fx: its loops depend on the sequence length


@torch.jit.unused
def _eager_scan(log_a: torch.Tensor, u: torch.Tensor, chunk: int) -> torch.Tensor:
    if u.is_meta:  # shapes only (cost counting): no values to scan
        return torch.empty_like(u)
    if (log_a.requires_grad or u.requires_grad) and not torch.jit.is_tracing():
        return _LinearScan.apply(log_a, u, chunk)
    # no gradient wanted, or a trace (an export for inference), which cannot hold the autograd function: detached,
    # the traced graph runs with or without grad mode
    return linear_scan(torch.exp(log_a.detach()), u.detach(), chunk)


def cross_scan(x: torch.Tensor, directions: int) -> torch.Tensor:
    """`(B, H, W, E)` -> `(H*W, B, K, E)` sequences: rows (row-major), [columns (column-major)], rows
    reversed, [columns reversed] (VMamba's order; K = 2 leaves out the columns)."""
    rows = x.flatten(1, 2).transpose(0, 1)
    if directions == 2:
        return torch.stack([rows, rows.flip(0)], dim=2)
    cols = x.transpose(1, 2).flatten(1, 2).transpose(0, 1)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)], dim=2)


def cross_merge(y: torch.Tensor, directions: int, height: int, width: int) -> torch.Tensor:
    """`(H*W, B, K, E)` scans (K = `directions`, in `cross_scan`'s order) -> their sum `(B, H, W, E)`,
    each put back in row-major order."""
    ys = y.unbind(2)  # (one gradient for all directions, not a zero-filled one per direction)
    out = (ys[0] + ys[directions // 2].flip(0)).transpose(0, 1).unflatten(1, (height, width))
    if directions == 4:
        out = out + (ys[1] + ys[3].flip(0)).transpose(0, 1).unflatten(1, (width, height)).transpose(1, 2)
    return out


@register_mixer("scan")
class SelectiveScan2D(nn.Module):
    """VMamba's SS2D: a selective scan over the grid in `directions` orders (4, or 2: rows both ways)."""

    def __init__(self, dim: int, d_state: int = 1, expand: float = 1.0, dt_rank: int = 0, directions: int = 4,
                 chunk: int = 8, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        if directions not in (2, 4):
            raise ValueError(f"the scan runs in 2 or 4 directions, not {directions}")
        inner = self.inner = int(expand * dim)
        rank = self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.d_state, self.directions, self.chunk = d_state, directions, chunk
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.x_proj_weight = nn.Parameter(torch.empty(directions, rank + 2 * d_state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(directions, inner, rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(directions, inner))
        self.A_log = nn.Parameter(torch.empty(directions, inner, d_state))
        self.D = nn.Parameter(torch.empty(directions, inner))
        self.out_norm = LayerNorm(inner, eps=LN_EPS)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        for p in (self.dt_proj_bias, self.A_log, self.D):
            p._no_weight_decay = True  # as in Mamba
        self.reset_ssm_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's init: x_proj as nn.Linear, dt_proj uniform(+-R^-0.5), its bias the softplus-inverse
        of steps log-uniform in [dt_min, dt_max], A_log = log(1..N) (S4D-real), D = 1."""
        nn.init.uniform_(self.x_proj_weight, -self.inner**-0.5, self.inner**-0.5)
        nn.init.uniform_(self.dt_proj_weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        height, width = x.shape[1], x.shape[2]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        xs = cross_scan(x, self.directions)                                     # (T, B, K, E)
        dt, B, C = torch.einsum("tbke,kpe->tbkp", xs, self.x_proj_weight).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = torch.einsum("tbkr,ker->tbke", dt, self.dt_proj_weight)
        ys = selective_scan(xs, dt, self.A_log, B, C, self.D, self.dt_proj_bias, self.chunk)
        y = cross_merge(ys, self.directions, height, width)
        return self.out_proj(self.out_norm(y) * F.silu(z))

    def uncounted_macs(self, x: torch.Tensor) -> int:
        """The scan's multiply-accumulates, which torch's counter does not see: 9EN + E per token and
        direction (Mamba's count of the recurrence, and D x)."""
        tokens = x.shape[0] * x.shape[1] * x.shape[2]
        return tokens * self.directions * self.inner * (9 * self.d_state + 1)

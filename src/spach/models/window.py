"""Window attention (Swin: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021, arXiv 2103.14030) as a spatial mixer: `window` (M = 7) or `window<M>`.

The grid is cut into non-overlapping M x M windows; inside each, multi-head attention with a learned
relative position bias `B` (a table of (2M-1)^2 x heads entries, indexed by the offset of the two tokens):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V,    qkv = Linear(C, 3C), proj = Linear(C, C)

Every second block of a run of window blocks (`MixerContext.block_index` odd) rolls the grid by
(-M/2, -M/2) with `torch.roll` before the windows are cut and back afterwards, and adds -100 (Swin's
value) to the scores of token pairs that the roll brought together from opposite edges of the grid.

As in Swin (and timm's `SwinTransformerBlock`), a grid side no longer than M is one window and is
not shifted: the 7x7 grid of a 224-pixel model's last stage is global attention. A window that does
not tile a longer grid side is refused (no padding): name a window size dividing it (`window4` on
the battle's 8x8 grids). Window and shift are fixed when the model is built, from the grid at its
`img_size`; at other sizes the window must tile the grid. MACs per token: 4C^2 + 2 M^2 C.
"""
import torch
import torch.nn as nn

from spach.errors import SpachError
from spach.models.mixers import register_mixer



def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """(L, L) index into the (2wh-1)(2ww-1)-row bias table of each token pair's offset (L = wh*ww)."""
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :] + wh - 1) * (2 * ww - 1) + cols[:, None] - cols[None, :] + ww - 1


def check_windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """`x` `(B, H, W, C)` unchanged if `wh x ww` windows tile its grid; else one line with the fix."""
    if x.shape[1] % wh or x.shape[2] % ww:
        raise SpachError(
            f"window attention: {wh}x{ww} windows do not tile a {x.shape[1]}x{x.shape[2]} token grid; "
            "run the model at an img_size whose grids its window divides, or build it at this size"
        )
    return x


def shifted_window_mask(height: int, width: int, wh: int, ww: int, sh: int, sw: int, device: torch.device) -> torch.Tensor:
    """(windows, L, L) additive mask for the grid rolled by (-sh, -sw): 0 for pairs from the same
    region (of the 3 x 3 the roll cuts the grid into), -100 otherwise (Swin's value)."""
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    region_h = (rows >= height - wh).long() + (rows >= height - sh).long() if sh else torch.zeros_like(rows)
    region_w = (cols >= width - ww).long() + (cols >= width - sw).long() if sw else torch.zeros_like(cols)
    region = (3 * region_h[:, None] + region_w[None, :]).view(height // wh, wh, width // ww, ww)
    region = region.transpose(1, 2).reshape(-1, wh * ww)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0


torch.fx.wrap("check_windows")
torch.fx.wrap("shifted_window_mask")


@register_mixer("window", param="window_size")
class WindowAttention(nn.Module):
    """Multi-head attention inside M x M windows with a relative position bias; odd blocks shifted."""

    def __init__(
        self, dim: int, grid_size: tuple[int, int], num_heads: int, block_index: int = 0, window_size: int = 7,
        qkv_bias: bool = True, attn_drop: float = 0.0, drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise SpachError(
                f"window attention width {dim} is not divisible by num_heads={num_heads}; pick num_heads dividing it"
            )
        if window_size < 1:
            raise SpachError(f"window{window_size}: the window size must be at least 1; name one such as window7")
        H, W = grid_size
        for side in (H, W):
            if side > window_size and side % window_size:
                raise SpachError(
                    f"window{window_size}: {window_size}x{window_size} windows do not tile this stage's {H}x{W} token grid; "
                    f"name a window size dividing {side} (window<M>, e.g. window{_largest_divisor(side, window_size)}), "
                    f"or an img_size whose token grids {window_size} divides"
                )
        self.wh, self.ww = min(window_size, H), min(window_size, W)
        shifted = block_index % 2 == 1
        self.sh = self.wh // 2 if shifted and H > self.wh else 0
        self.sw = self.ww // 2 if shifted and W > self.ww else 0
        self.shifted = bool(self.sh or self.sw)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * self.wh - 1) * (2 * self.ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.relative_position_bias_table._no_weight_decay = True  # as in Swin
        self.register_buffer("relative_position_index", relative_position_index(self.wh, self.ww), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_windows(x, self.wh, self.ww)
        B, H, W, C = x.shape
        wh, ww, L, heads = self.wh, self.ww, self.wh * self.ww, self.num_heads
        if self.shifted:
            x = torch.roll(x, shifts=(-self.sh, -self.sw), dims=(1, 2))
        nh, nw = H // wh, W // ww
        windows = x.reshape(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, L, C)
        q, k, v = self.qkv(windows).reshape(B * nh * nw, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index]  # (heads, L, L)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias
        if self.shifted:
            mask = shifted_window_mask(H, W, wh, ww, self.sh, self.sw, x.device)
            attn = (attn.view(B, nh * nw, heads, L, L) + mask[None, :, None]).view(B * nh * nw, heads, L, L)
        attn = self.attn_drop(attn.softmax(dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, H, W, C)
        y = self.proj_drop(self.proj(y))
        if self.shifted:
            y = torch.roll(y, shifts=(self.sh, self.sw), dims=(1, 2))
        return y


def _largest_divisor(side: int, limit: int) -> int:
    return max(m for m in range(1, limit + 1) if side % m == 0)

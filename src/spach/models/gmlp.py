"""gMLP's spatial gating as a spatial mixer: `gmlp` (Liu et al., "Pay Attention to MLPs", NeurIPS 2021,
arXiv 2105.08050).

gMLP's block is `Z = GELU(X U)`, `s(Z) = Z1 * (W LN(Z2) + b)` (the spatial gating unit: the channels
split in halves [Z1, Z2], `W` an N x N map over the tokens initialised near 0 and `b = 1`, so the unit
starts as the identity gate on Z1), then `Y = s(Z) V`. In the mixer slot (the skeleton adds LN1 before,
the residual, the CPE and the channel MLP after) it maps C -> C with an expansion of 2, as timm's
`GatedMlp` with its `SpatialGatingUnit`:

    Z = GELU(Linear(C, 2C)(x)),  [u, v] = split(Z),  S(x) = Linear(C, C)(u * (W LN(v) + b))

Its weights depend on the token count N, so a gMLP model is tied to its input size, like `mlp`.
MACs per token: 3C^2 + N C (attention: 4C^2 + 2N C).
"""
import torch
import torch.nn as nn

from spach.models.blocks import LN_EPS, LayerNorm
from spach.models.checks import check_grid
from spach.models.mixers import register_mixer

torch.fx.wrap("check_grid")


@register_mixer("gmlp")
class SpatialGatingMixer(nn.Module):
    """Linear(C, 2C) -> GELU -> spatial gating unit (N x N token map on half the channels) -> Linear(C, C)."""

    fixed_input_size = True

    def __init__(self, dim: int, grid_size: tuple[int, int], drop: float = 0.0):
        super().__init__()
        self.grid_size = tuple(grid_size)
        num_tokens = grid_size[0] * grid_size[1]
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.norm = LayerNorm(dim, eps=LN_EPS)
        self.token_proj = nn.Linear(num_tokens, num_tokens)  # W and b, applied along the token axis
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(drop)

    def init_weights(self) -> None:
        """W near 0 and b = 1: the gate starts as the identity (gMLP's init, timm's `init_weights`)."""
        nn.init.normal_(self.token_proj.weight, std=1e-6)
        nn.init.ones_(self.token_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_grid(x, self.grid_size[0], self.grid_size[1], 1, "the gMLP gating mixer's token grid")
        B, H, W, C = x.shape
        u, v = self.drop(self.act(self.fc1(x.reshape(B, H * W, C)))).chunk(2, dim=-1)
        v = self.norm(v)  # (B, N, C): the token map from the left, one batched matmul with b added
        gate = torch.baddbmm(self.token_proj.bias[:, None], self.token_proj.weight.expand(B, -1, -1), v)
        return self.drop(self.fc2(u * gate)).reshape(B, H, W, C)

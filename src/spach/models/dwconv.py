"""Large-kernel depthwise convolution as a spatial mixer: `dwconv<k>` (ConvNeXt: Liu et al., "A ConvNet
for the 2020s", CVPR 2022, arXiv 2201.03545, k = 7; RepLKNet: Ding et al., "Scaling Up Your Kernels to
31x31", CVPR 2022, arXiv 2203.06717, k up to 31).

    S(x) = DWConv_k(x):  y[c, i, j] = b[c] + sum_{u,v < k} w[c, u, v] x[c, i + u - k//2, j + v - k//2]

(zero padding k//2, stride 1, one k x k filter and a bias per channel). In the skeleton it reads LN1(x)
and sits beside the block's 3x3 CPE. k is odd (a centred kernel). MACs per token: k^2 C.
"""
import torch
import torch.nn as nn

from spach.errors import SpachError
from spach.models.blocks import to_nchw, to_nhwc
from spach.models.mixers import register_mixer


@register_mixer("dwconv", param="kernel_size")
class DepthwiseConv(nn.Module):
    """k x k depthwise convolution with bias, on channels-last tokens (no layout copy)."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise SpachError(
                f"dwconv{kernel_size}: the kernel size must be odd (a centred k x k kernel); "
                "use e.g. dwconv7 (ConvNeXt) or dwconv31 (RepLKNet)"
            )
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.conv(to_nchw(x)))

"""Cost of a model: parameters and multiply-accumulates (counted by torch.utils.flop_counter)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop, sdpa_flop

# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention runs here: count it the same way (two batched matmuls forward).
_aten = torch.ops.aten
if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)
if _aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
    register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)(sdpa_backward_flop)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a shared spatial mixer counts once)."""
    return sum(p.numel() for p in model.parameters())


def input_shape(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
    cfg = getattr(model, "config", None)
    chans = cfg.in_chans if cfg is not None else model.pretrained_cfg["input_size"][0]
    if img_size is None:
        size = cfg.img_size if cfg is not None else tuple(model.pretrained_cfg["input_size"][1:])
    else:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return (chans, *size)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs counted by torch / 2)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape(model, img_size), device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2

"""What a model costs on paper: parameters and multiply-accumulates (torch.utils.flop_counter / 2)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop,
    sdpa_flop,
)

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
    """(channels, H, W) a model takes: a spach model's config, else (timm models) the input
    channels of its first convolution and the size its pretrained config names."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        chans = cfg.in_chans
    else:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        chans = first_conv.in_channels if first_conv is not None else model.pretrained_cfg["input_size"][0]
    if img_size is None:
        size = cfg.img_size if cfg is not None else tuple(model.pretrained_cfg["input_size"][1:])
    else:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return (chans, *size)


def count_module_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of `module(*inputs)`: torch's FLOP counter / 2, plus what modules that
    run ops the counter does not know report through an `uncounted_macs(*inputs) -> int` method
    (called with each call's inputs, so a shared module counts once per use)."""
    extra: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: extra.append(int(mod.uncounted_macs(*args))))
        for m in module.modules() if callable(getattr(m, "uncounted_macs", None))
    ]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return counter.get_total_flops() // 2 + sum(extra)


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs counted by torch / 2)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape(model, img_size), device=param.device, dtype=param.dtype)
    try:
        return count_module_macs(model, x)
    finally:
        model.train(was_training)



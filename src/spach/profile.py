"""Cost of a model: parameters, multiply-accumulates (counted by torch.utils.flop_counter) and time."""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
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


# --- time ------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(step: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 5) -> list[float]:
    """Seconds taken by each of `repeats` calls of `step` after `warmup` untimed calls.

    On CUDA the time comes from CUDA events around each call (the device is synchronised first), so
    it measures the kernels rather than the Python launch time; on CPU it is wall-clock time.
    """
    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` (bf16/fp16) on `device`, or nothing for fp32/None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_step(
    model: nn.Module, x: torch.Tensor, mode: str = "infer", dtype: torch.dtype | None = None
) -> Callable[[], object]:
    """One timed unit of work on batch `x`: an inference forward (`infer`) or forward + backward +
    AdamW step (`train`, on the model as given: its weights change)."""
    device = x.device
    if mode == "infer":
        def step() -> object:
            with torch.inference_mode(), autocast(device, dtype):
                return model(x)
        return step
    if mode != "train":
        raise ValueError(f"mode must be 'infer' or 'train', not {mode!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)

    def train_step() -> object:
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return train_step


def throughput(
    model: nn.Module,
    batch_size: int = 32,
    img_size: int | tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "infer",
    warmup: int = 3,
    repeats: int = 5,
) -> float:
    """Median images/s of `model` on a random batch (inference by default; `mode='train'` times
    forward + backward + AdamW step on a copy, leaving `model` untouched)."""
    device = torch.device(device)
    if mode == "train":
        model = copy.deepcopy(model).train()
    else:
        model = model.eval()
    model.to(device)
    x = torch.randn(batch_size, *input_shape(model, img_size), device=device)
    times = time_runs(make_step(model, x, mode, dtype), device, warmup, repeats)
    return batch_size / statistics.median(times)

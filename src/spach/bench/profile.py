"""What a model costs in time: `time_runs`, `make_step`, `throughput` (median images/s).

Parameter and MAC counting live in `spach.models.flops` (re-exported here for convenience)."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from spach.device import autocast, synchronize
from spach.models.flops import count_macs, count_module_macs, count_params, input_shape

__all__ = ["count_macs", "count_module_macs", "count_params", "input_shape", "make_step", "synchronize", "throughput",
           "time_runs"]


# --- time ------------------------------------------------------------------------------------
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

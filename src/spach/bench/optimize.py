"""The fastest inference setup for a device, in one call: `spach.optimize(model, ...)`.

    model = spach.optimize(spach.create_model(name, pretrained=path), device="cuda", dtype="bf16", compile=True)
    logits = model(images)            # eval mode, no autograd, mixed precision, compiled

What it does, and why:
- eval mode, weights moved to the device, conv weights in channels-last memory format (the stem and
  downsample convolutions then read the channels-last tokens without a layout change);
- `dtype` bf16/fp16: by default (`precision="auto"`) the first batch is run both ways below, on a copy
  for the second, and the faster is kept (once per model config, device and batch shape per process);
  `precision="autocast"` runs the model under autocast (weights stay fp32; accuracy as in training with
  AMP); `precision="weights"` converts the weights to bf16/fp16 once, so activations stay in the low
  precision end to end (no fp32->bf16 cast in front of every Linear, half the memory traffic of every
  elementwise op); LayerNorm keeps fp32 weights and computes its statistics in fp32 (the CPU/GPU
  kernels accumulate in fp32 for a bf16 input); the residual stream is then bf16 too, and the logits
  come back as fp32;
- `compile=True` wraps it in `torch.compile(fullgraph=True)`; on CPU with Inductor's "freezing"
  (weights become constants: pre-packed oneDNN matmuls with fused bias/GELU), on GPU with
  `mode="max-autotune-no-cudagraphs"` unless a mode is given;
- on CPU (glibc), `tune_cpu_allocator()`: large freed blocks stay in the heap instead of being
  unmapped, so activations do not pay fresh page faults on every forward (3-4x faster elementwise ops
  on the 2-core benchmark machine).
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
import torch.nn as nn

from spach.device import parse_device, parse_dtype, time_once, tune_cpu_allocator
from spach.errors import SpachError

PRECISIONS = ("auto", "autocast", "weights")


class InferenceModel(nn.Module):
    """`model` (or its compiled form) run without autograd, under autocast when `dtype` is not fp32
    (`precision="autocast"`), or on weights already in `dtype` (`precision="weights"`: the input is
    cast once); the logits come back as fp32 either way. With `precision="auto"` the first batch decides
    (`choose_precision`). `.model` is the plain module that runs (for its config, state dict, ...)."""

    def __init__(
        self, model: nn.Module, device: torch.device, dtype: torch.dtype, compiler: Callable[[nn.Module], nn.Module] | None = None,
        precision: str = "autocast",
    ):
        super().__init__()
        self.model = model
        self.device = device
        self.dtype = dtype
        self.precision = precision if dtype != torch.float32 else "autocast"
        self._compiler = compiler
        self._run = model if self.precision == "auto" or compiler is None else compiler(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "auto":
            self._settle(x)
        return _infer(self._run, x, self.device, self.dtype, self.precision)

    def _settle(self, x: torch.Tensor) -> None:
        """Keep the faster of autocast and bf16/fp16 weights for this model, device and batch shape."""
        self.precision, low = choose_precision(self.model, x, self.device, self.dtype)
        if low is not None:
            self.model = low
        self._run = self.model if self._compiler is None else self._compiler(self.model)


def _infer(run: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype, precision: str) -> torch.Tensor:
    low = dtype != torch.float32
    if low and precision == "weights":
        x = x.to(device, dtype, non_blocking=True)
        with torch.inference_mode():
            return run(x).float()
    x = x.to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=low):
        return run(x).float()


_precision_choices: dict[tuple, str] = {}


def choose_precision(
    model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype, rounds: int = 2,
) -> tuple[str, nn.Module | None]:
    """'autocast' or 'weights', whichever ran batch `x` faster (alternating, best of `rounds`) and
    agreed with the other within 5e-2 of the logits' scale; decided once per (model config, device,
    dtype, batch shape) in this process. Returns the choice and, for 'weights', a bf16/fp16 copy of
    `model` (the model itself is never converted)."""
    key = (type(model).__qualname__, repr(getattr(model, "config", None) or model), str(device), dtype, tuple(x.shape))
    choice = _precision_choices.get(key)
    if choice == "autocast":
        return choice, None
    low = cast_weights(copy.deepcopy(model), dtype)
    if choice is None:
        runs = {"autocast": model, "weights": low}
        outs = {p: _infer(m, x, device, dtype, p) for p, m in runs.items()}  # also the warm-up
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for p, m in runs.items():
                best[p] = min(best[p], time_once(functools.partial(_infer, m, x, device, dtype, p), device))
        a, w = outs["autocast"].float(), outs["weights"].float()
        agree = bool(((a - w).abs().max() <= 5e-2 * a.abs().max().clamp_min(1e-6)).item())
        choice = _precision_choices[key] = "weights" if agree and best["weights"] < best["autocast"] else "autocast"
    return choice, (low if choice == "weights" else None)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """All parameters and buffers to `dtype`, except LayerNorm's (kept fp32: a bf16 input with fp32
    affine runs the mixed-type kernel, which normalises in fp32 and returns `dtype`)."""
    keep = {id(t) for m in model.modules() if isinstance(m, nn.LayerNorm) for t in (*m.parameters(False), *m.buffers(False))}
    with torch.no_grad():
        for m in model.modules():
            for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if id(t) not in keep and t.is_floating_point():
                    t.data = t.data.to(dtype)
    return model


def optimize(
    model: nn.Module,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "fp32",
    compile: bool = False,
    channels_last: bool = True,
    compile_mode: str | None = None,
    precision: str = "auto",
) -> InferenceModel:
    """The fastest inference setup of `model` for `device` (default: CUDA if available, else CPU).

    `dtype`: 'fp32', 'bf16' or 'fp16'. `compile`: torch.compile with fullgraph=True (first call takes
    seconds to minutes). The returned module takes images on any device and returns logits.
    `precision`, for bf16/fp16: 'auto' (default: the first batch times autocast against weights
    converted to `dtype`, on a copy, and keeps the faster; `choose_precision`), 'autocast' (weights
    stay fp32, the model is left as it was) or 'weights' (the model's weights are converted to `dtype`
    in place, LayerNorm's excepted).
    Training is not affected: call this on the model you evaluate, not the one you train.
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    if precision not in PRECISIONS:
        raise SpachError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    model = model.eval().to(device)
    if precision == "weights" and dtype != torch.float32:
        cast_weights(model, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        tune_cpu_allocator()
    compiler = functools.partial(_compile, device=device, mode=compile_mode) if compile else None
    return InferenceModel(model, device, dtype, compiler, precision)


def _compile(model: nn.Module, device: torch.device, mode: str | None) -> nn.Module:
    if device.type == "cpu":
        return torch.compile(model, fullgraph=True, mode=mode, options=None if mode else {"freezing": True})
    return torch.compile(model, fullgraph=True, mode=mode or "max-autotune-no-cudagraphs")

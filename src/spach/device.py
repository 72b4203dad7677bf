"""Devices and number formats, parsed once for every command: `parse_device`, `parse_dtype`, the
training `--amp` choice (`amp_dtype`) and the matching `autocast` context; timing (`time_once`) and the
CPU allocator setting training and inference share (`tune_cpu_allocator`)."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable

import torch

from spach.errors import SpachError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or the torch dtype itself; None is fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SpachError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise SpachError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device that exists here ('auto' or None: CUDA if available, else the CPU)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SpachError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpachError(f"device {device} was asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SpachError(f"device {device} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX on x86; oneDNN's own check)."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(mkldnn is not None and mkldnn.is_available() and check is not None and check())
    except RuntimeError:
        return False


def amp_dtype(amp: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype of an `--amp` choice. 'auto' is bf16 (or fp16 where bf16 is missing) on a GPU;
    on a CPU it is bf16 for training where the CPU multiplies bf16 natively (a measured speed-up at equal
    accuracy, docs/benchmarks.md) and off otherwise (evaluation stays fp32-exact)."""
    if amp not in AMP_CHOICES:
        raise SpachError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if training and device.type == "cpu" and cpu_has_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` (bf16/fp16) on `device`, or nothing for fp32/None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `fn`, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed blocks in glibc's heap (no mmap/munmap per large tensor). Process-wide; returns
    whether it applied (False off glibc). Memory freed by PyTorch is reused rather than returned to
    the OS, so the process's resident size stays at its high-water mark."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False

"""`spach bench`: params, MACs, throughput, latency, memory and distance to the matmul peak.

    records = spach.bench.run(["spach_ms_s_patch4_224_conv"], dtype="bf16", mode="both")

Method. Each timing is `warmup` untimed passes then `repeats` timed passes of one batch (CUDA events
on GPU, wall clock on CPU); we report the median and the min-max spread. `protocol="swin"` is the
paper's (Swin) protocol: 50 warm-up passes, 30 timed, throughput = 30 * batch / total time.
Inference runs through `spach.optimize` (eval, no autograd, autocast for bf16/fp16, optional
compile). Training is forward + backward + AdamW step, autocast when `dtype` is not fp32.

Distance to the limit: the machine's matrix-multiply peak for the dtype is measured in the same run
(`matmul_peak`), and each model's achieved FLOP/s (2 x MACs per image forward, 3x that for a training
step) is reported as a fraction of it.

Peak memory (weights, activations, and for training gradients and optimizer state) is the peak
during the timed passes minus the memory in use before the model was built: on GPU from the
allocator (`max_memory_allocated`); on CPU from the resident-set high-water mark (Linux
`/proc/self/status` VmHWM, reset before each measurement through `/proc/self/clear_refs`). Where the
reset is not possible it falls back to `getrusage` (the process-lifetime peak, without subtracting
anything; the record says `mem_method: "ru_maxrss"`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from spach.bench.optimize import optimize
from spach.bench.profile import (
    count_macs,
    count_params,
    input_shape,
    make_step,
    synchronize,
    time_runs,
)
from spach.device import parse_device, parse_dtype
from spach.errors import SpachError
from spach.models.zoo import OFFICIAL_TOP1, create_model

MODES = ("infer", "train", "both")


@dataclass
class Protocol:
    warmup: int = 3
    repeats: int = 5
    swin: bool = False  # throughput from the total time of all repeats (mean), as Swin/SPACH did

    @classmethod
    def named(cls, name: str, quick: bool = False) -> "Protocol":
        if name == "swin":
            return cls(50, 30, swin=True)
        if name != "default":
            raise SpachError(f"unknown protocol {name!r}; use 'default' or 'swin'")
        return cls(1, 3) if quick else cls()

    def rate(self, items: int, times: list[float]) -> tuple[float, float, float]:
        """(central, low, high) items/s: median (or Swin's mean) and the spread over repeats."""
        central = items * len(times) / sum(times) if self.swin else items / statistics.median(times)
        return central, items / max(times), items / min(times)


@dataclass
class BenchSettings:
    """One benchmark setting, shared by every model of a `spach bench` call (the CLI flags map 1:1)."""

    device: str = "cpu"
    dtype: str = "fp32"  # fp32, or bf16/fp16 under autocast (or weights, see `precision`)
    compile: bool = False
    channels_last: bool = False
    batch_size: int = 32
    img_size: int | None = None  # None: the model's own
    mode: str = "infer"  # infer, train (fwd + bwd + AdamW) or both
    protocol: str = "default"  # default (3 + 5 passes, median) or swin (50 + 30, mean)
    quick: bool = False
    latency: bool = True  # also batch-1 latency
    precision: str = "autocast"  # bf16/fp16 inference: autocast, weights converted once, or auto (faster of both)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpachError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.batch_size < 1:
            raise SpachError(f"batch size must be >= 1, got {self.batch_size}")
        if self.img_size is not None and self.img_size < 1:
            raise SpachError(f"image size must be >= 1, got {self.img_size}")
        parse_dtype(self.dtype)
        Protocol.named(self.protocol)


@dataclass
class BenchRecord:
    model: str
    family: str
    device: str
    device_name: str
    dtype: str
    compiled: bool
    channels_last: bool
    batch_size: int
    img_size: int
    params: int
    macs: int
    matmul_peak_gflops: float
    infer_img_s: float | None = None
    infer_img_s_low: float | None = None
    infer_img_s_high: float | None = None
    infer_gflops: float | None = None
    infer_peak_frac: float | None = None
    latency_ms: float | None = None
    latency_ms_low: float | None = None
    latency_ms_high: float | None = None
    infer_mem_mb: float | None = None
    train_img_s: float | None = None
    train_img_s_low: float | None = None
    train_img_s_high: float | None = None
    train_gflops: float | None = None
    train_peak_frac: float | None = None
    train_mem_mb: float | None = None
    compile_s: float | None = None
    mem_method: str = ""
    top1: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the machine's limit ---------------------------------------------------------------------
def matmul_peak(device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32", quick: bool = False) -> float:
    """Best median GFLOP/s of square matmuls in `dtype` (sizes 1024..4096; up to 2048 when `quick`)."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    best = 0.0
    for n in (1024, 2048) if quick else (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        times = time_runs(lambda: torch.mm(a, b), device, warmup=2, repeats=3 if quick else 5)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


# --- memory ------------------------------------------------------------------------------------
def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: allocated tensors on GPU, resident set (after returning free heap) on CPU."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    _malloc_trim()
    return _proc_status_kb("VmRSS") * 1024


class PeakMemory:
    """`with PeakMemory(device, base) as m:` sets `m.mb`, the peak memory inside minus `base` bytes."""

    def __init__(self, device: torch.device, base: int):
        self.device, self.base = device, base
        self.mb = 0.0
        self.method = "cuda_max_allocated" if device.type == "cuda" else "vmhwm"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        memory_in_use(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.method == "vmhwm":
            self.mb = (_proc_status_kb("VmHWM") * 1024 - self.base) / 2**20
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- one model ---------------------------------------------------------------------------------
def _build(model: str | Callable[[], nn.Module], img_size: int | None) -> tuple[str, nn.Module]:
    if callable(model):
        m = model()
        return getattr(m, "pretrained_cfg", {}).get("architecture", type(m).__name__), m
    return model, create_model(model, **({"img_size": img_size} if img_size else {}))


def bench_model(
    model: str | Callable[[], nn.Module],
    settings: BenchSettings | None = None,
    peak_gflops: float | None = None,
) -> BenchRecord:
    """Measure one model (a zoo name, or a function building the module) in one setting."""
    st = settings or BenchSettings()
    device, dtype, compile, channels_last = st.device, st.dtype, st.compile, st.channels_last
    batch_size, img_size, mode, precision = st.batch_size, st.img_size, st.mode, st.precision
    device, torch_dtype = parse_device(device), parse_dtype(dtype)
    protocol = Protocol.named(st.protocol, st.quick)
    peak = peak_gflops or matmul_peak(device, torch_dtype, quick=True)
    if compile:
        torch._dynamo.reset()  # all SpachNets share forward's code: start each model's cache afresh
    base = memory_in_use(device)
    name, net = _build(model, img_size)
    net = net.to(device)
    shape = input_shape(net, img_size)
    macs = count_macs(net, shape[1:])
    rec = BenchRecord(
        model=name, family=getattr(net, "family", ""), device=device.type, device_name=device_name(device),
        dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."), compiled=compile,
        channels_last=channels_last, batch_size=batch_size, img_size=shape[1], params=count_params(net), macs=macs,
        matmul_peak_gflops=round(peak, 1), top1=OFFICIAL_TOP1.get(name) if shape[1:] == (224, 224) else None,
    )
    if torch_dtype != torch.float32:
        rec.extra["precision"] = precision
    rec.extra["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a busy machine skews times
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, *shape, device=device).contiguous(memory_format=memory_format)
    gflop = 2 * macs / 1e9

    if mode in ("infer", "both"):
        if precision == "weights" and torch_dtype != torch.float32 and mode == "both":
            raise SpachError("precision 'weights' converts the model's weights: benchmark it with mode 'infer'")
        fast = optimize(net, device, torch_dtype, compile=compile, channels_last=channels_last, precision=precision)
        if compile:
            t0 = time.perf_counter()
            fast(x)
            synchronize(device)
            rec.compile_s = round(time.perf_counter() - t0, 1)
        with PeakMemory(device, base) as mem:
            times = time_runs(lambda: fast(x), device, protocol.warmup, protocol.repeats)
        rec.infer_img_s, rec.infer_img_s_low, rec.infer_img_s_high = protocol.rate(batch_size, times)
        rec.infer_mem_mb, rec.mem_method = round(mem.mb, 1), mem.method
        rec.infer_gflops = rec.infer_img_s * gflop
        rec.infer_peak_frac = rec.infer_gflops / peak
        if st.latency:
            one = x[:1].contiguous(memory_format=memory_format)
            lat = time_runs(lambda: fast(one), device, protocol.warmup, protocol.repeats)
            rec.latency_ms, rec.latency_ms_low, rec.latency_ms_high = (
                1e3 * statistics.median(lat), 1e3 * min(lat), 1e3 * max(lat))
        if torch_dtype != torch.float32:
            rec.extra["precision"] = fast.precision  # what "auto" settled on
        if precision != "auto":  # "auto" ran a converted copy, if any: train the model as built
            net = fast.model
        del fast
    if mode in ("train", "both"):
        rec.train_img_s, rec.train_mem_mb = _bench_train(net, x, device, torch_dtype, compile, protocol, rec, base)
        rec.train_gflops = rec.train_img_s * 3 * gflop
        rec.train_peak_frac = rec.train_gflops / peak
    return rec


def _bench_train(
    net: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype, compile: bool, protocol: Protocol,
    rec: BenchRecord, base: int,
) -> tuple[float, float]:
    net = net.train()
    if compile:
        torch._dynamo.reset()
    model = torch.compile(net, fullgraph=True) if compile else net
    with PeakMemory(device, base) as mem:
        step = make_step(model, x, "train", dtype)
        times = time_runs(step, device, max(protocol.warmup, 2), protocol.repeats)
    rate, rec.train_img_s_low, rec.train_img_s_high = protocol.rate(x.shape[0], times)
    rec.mem_method = mem.method
    return rate, round(mem.mb, 1)



"""The process a run lives in: device and distributed set-up (torchrun's environment), random
generators (seeded per epoch, saved and restored for exact resumption), stop signals and memory."""
from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from spach.device import parse_device, tune_cpu_allocator
from spach.signals import handling


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def close(self) -> None:
        """Leave no process group behind (one process may train many runs, as the battle does)."""
        if self.owns_group:
            dist.destroy_process_group()


def setup(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then join the group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    dev = parse_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:  # freed activations stay in glibc's heap: no fresh page faults every step (docs/benchmarks.md)
        tune_cpu_allocator()
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, dev, owns)


def default_workers(most: int = 4) -> int:
    """Data-loader workers per process: at most `most`, and no more than the CPUs this process may use
    shared by the processes torchrun starts on this machine (more makes torch warn that loading may
    run slow or freeze, and it would)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(most, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


# ------------------------------------------------------------------------------------ randomness
def seed_all(seed: int, epoch: int, rank: int, data: torch.Generator | None = None) -> None:
    """Seed every generator for one epoch of one rank. `data` (the augmentation's own stream) gets a
    seed of its own that depends on nothing else, so it draws the same for every model."""
    s, d = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(s))
    np.random.seed(int(s))
    random.seed(int(s))
    if data is not None:
        data.manual_seed(int(d))


def rng_state(data: torch.Generator | None = None) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data is not None:
        state["data"] = data.get_state()
    return state


def set_rng_state(state: dict[str, Any], data: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if data is not None and "data" in state:
        data.set_state(state["data"])


# ------------------------------------------------------------------------------------ signals
class StopFlag:
    """SIGINT/SIGTERM set `.set` (the loop saves at the next step boundary); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.set = False
        self.signum = 0

    def __call__(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    with handling(flag):
        yield flag
    if flag.set:  # arrived after the last training step (e.g. during the final evaluation): the run is saved
        raise KeyboardInterrupt


def max_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process, KiB on Linux

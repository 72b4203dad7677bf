"""Where the time of one battle run goes: torch.profiler over one run of a default-battle contestant,
with its own recipe (batch, precision, evaluation each epoch), on a training subset so that it takes
a minute. Prints the share of data loading, forward, backward, optimizer and evaluation, then the
operators that take the most time, with the load average.

    PYTHONPATH=src python benchmarks/profile_run.py [--contestant attn-ms] [--images 12800] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from spach.battle.study import load_study
from spach.train import engine
from spach.train.engine import train

OPTIMIZER = "Optimizer.step#"
BACKWARD = "autograd::engine::evaluate_function:"


def _marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


class _MarkedBatches:
    """The training loader, each batch (slicing, augmentation) inside a `data` profiler range."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        it = iter(self.loader)
        while True:
            with record_function("data"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch


def _marked_data(build: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        data = build(*args, **kwargs)
        make = data.train_loader
        data.train_loader = lambda sampler: _MarkedBatches(make(sampler))
        return data
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contestant", default="attn-ms", help="a contestant of the default preset")
    ap.add_argument("--images", type=int, default=12800, help="training images (one epoch)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the battle runs one per job)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    study = load_study()
    contestant = next(c for c in study.contestants if c.name == args.contestant)
    engine.evaluate = _marked("evaluate", engine.evaluate)  # the engine's per-epoch evaluation passes
    engine.build_data = _marked_data(engine.build_data)
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(study.config(contestant, seed=0, output=out, log="none"), train_subset=args.images, epochs=1)
        load = os.getloadavg()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(cfg)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 for e in events}
    self_time = sum(e.self_cpu_time_total for e in events) / 1e6
    phases = {
        "evaluation (test set + training subset)": total.get("evaluate", 0.0),
        "optimizer (AdamW step)": sum(t for k, t in total.items() if k.startswith(OPTIMIZER)),
        "training batches (slicing, augmentation)": total.get("data", 0.0),
        "backward": sum(t for k, t in total.items() if k.startswith(BACKWARD)),
    }
    steps = args.images // cfg.batch_size
    print(f"{args.contestant}: {args.images} images, batch {cfg.batch_size}, amp {cfg.amp}, {args.threads} thread(s); "
          f"{steps} steps, wall {wall:.1f} s under the profiler; load average {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    rest = self_time - sum(phases.values())
    for name, t in [*phases.items(), ("forward, loss and the rest of the loop", rest)]:
        print(f"  {name:42s} {t:7.2f} s  {100 * t / self_time:5.1f}%")
    print("top operators by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / 1e6:7.2f} s  {100 * e.self_cpu_time_total / 1e6 / self_time:5.1f}%"
              f"  x{e.count}")


if __name__ == "__main__":
    main()

"""What keeping freed memory in glibc's heap (`spach.bench.optimize.tune_cpu_allocator`, which training on
CPU now calls) is worth to one battle run: one epoch of a default-battle contestant on a training subset,
its own recipe, one thread, each in a fresh process (the setting is process-wide), the allocator as
glibc leaves it and tuned, alternating. Prints each pair, the median ratio and the load average; the
final test top-1 of both must be equal (the setting changes no result).

    PYTHONPATH=src python benchmarks/allocator.py [--contestants attn-ms,conv-ms] [--images 12800] [--pairs 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(contestant: str, tuned: bool, images: int) -> None:
    import torch

    from spach.battle.study import load_study
    from spach.train import runtime
    from spach.train.engine import train

    torch.set_num_threads(1)
    if not tuned:
        runtime.tune_cpu_allocator = lambda: False
    study = load_study()
    c = next(c for c in study.contestants if c.name == contestant)
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(study.config(c, seed=0, output=out, log="none", progress="none"),
                                  train_subset=images, epochs=1)
        start = time.perf_counter()
        summary = train(cfg)
        print(f"{time.perf_counter() - start:.3f} {summary['final_top1']}")


def run(contestant: str, tuned: bool, images: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--child", contestant, str(int(tuned)), str(images)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contestants", default="attn-ms,conv-ms,mlp-ms")
    ap.add_argument("--images", type=int, default=12800)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    print(f"one epoch of {args.images} images, 1 thread, load average {os.getloadavg()[0]:.2f} at the start")
    for name in args.contestants.split(","):
        ratios = []
        for _ in range(args.pairs):
            (plain, top1_plain), (tuned, top1_tuned) = run(name, False, args.images), run(name, True, args.images)
            assert top1_plain == top1_tuned, "the allocator setting changed a result"
            ratios.append(plain / tuned)
            print(f"  {name:14s} glibc default {plain:6.2f} s  tuned {tuned:6.2f} s  x{plain / tuned:.3f}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        print(f"{name}: tuned is x{statistics.median(ratios):.3f} faster (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()

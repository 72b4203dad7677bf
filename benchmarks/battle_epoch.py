"""One epoch of a default-battle contestant, timed in the real training engine under two settings, each
run in a fresh process (both settings are process-wide), alternating; prints each pair, the median
ratio and the load average.

- `--compare allocator`: glibc's allocator as it is vs `tune_cpu_allocator()` (freed memory stays in the
  heap; training on CPU calls it since issue 10). The final top-1 of both must be equal: the setting
  changes no result.
- `--compare amp`: fp32 (`amp = "off"`) vs bf16 autocast (what `amp = "auto"` gives the battle presets
  on CPUs with native bf16). Evaluation is cut to 1,000 test images and no training subset, so the
  time is mostly training.

Each run: the contestant's own recipe (batch, learning rate) on a training subset, one thread, as one
job of the battle runs.

    PYTHONPATH=src python benchmarks/battle_epoch.py --compare amp [--contestants attn-ms,conv-ms] [--images 12800] [--pairs 2]
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

SETTINGS = {"allocator": ("glibc default", "tuned"), "amp": ("fp32", "bf16")}


def child(compare: str, contestant: str, second: bool, images: int) -> None:
    import torch

    from spach.battle.study import load_study
    from spach.train import runtime
    from spach.train.engine import train

    torch.set_num_threads(1)
    extra = {}
    if compare == "allocator" and not second:
        runtime.tune_cpu_allocator = lambda: False
    if compare == "amp":
        extra = dict(amp="bf16" if second else "off", val_subset=1000, eval_train_subset=0)
    study = load_study()
    c = next(c for c in study.contestants if c.name == contestant)
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(study.config(c, seed=0, output=out, log="none", progress="none"),
                                  train_subset=images, epochs=1, **extra)
        start = time.perf_counter()
        summary = train(cfg)
        print(f"{time.perf_counter() - start:.3f} {summary['final_top1']}")


def run(compare: str, contestant: str, second: bool, images: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--child", compare, contestant, str(int(second)), str(images)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=SETTINGS, required=True)
    ap.add_argument("--contestants", default="attn-ms,conv-ms,mlp-ms")
    ap.add_argument("--images", type=int, default=12800)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    first, second = SETTINGS[args.compare]
    print(f"one epoch of {args.images} images, 1 thread: {first} vs {second}; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    for name in args.contestants.split(","):
        ratios = []
        for _ in range(args.pairs):
            (a, top1_a), (b, top1_b) = run(args.compare, name, False, args.images), run(args.compare, name, True, args.images)
            if args.compare == "allocator":
                assert top1_a == top1_b, "the allocator setting changed a result"
            ratios.append(a / b)
            print(f"  {name:14s} {first} {a:6.2f} s  {second} {b:6.2f} s  x{a / b:.3f}  load {os.getloadavg()[0]:.2f}",
                  flush=True)
        print(f"{name}: {second} is x{statistics.median(ratios):.3f} the speed of {first} (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()

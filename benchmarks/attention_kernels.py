"""Time every attention implementation (spach.models.attention) on the attention shapes of the zoo
and battle models, per dtype, inference and training (forward + backward), and show which one the
automatic choice keeps. Times: best of `--rounds` alternating rounds, in ms; the load average is
printed with each row.

    PYTHONPATH=src python benchmarks/attention_kernels.py [--device cuda] [--threads 1] [--dtypes fp32,bf16]
"""
from __future__ import annotations

import argparse
import os

import torch

from spach.bench.optimize import tune_cpu_allocator
from spach.models import attention as A

# (label, batch, heads, head_dim, tokens)
SHAPES = [
    ("Trans-MS-S stage 2", 32, 3, 64, 784),
    ("Trans-MS-S stage 3", 32, 3, 128, 196),
    ("Trans-MS-S stage 4", 32, 3, 256, 49),
    ("Hybrid-MS-S stage 3", 32, 4, 128, 196),
    ("Trans-MS-XXS stage 2", 16, 1, 64, 784),
    ("Trans-MS-XXS stage 3", 16, 1, 128, 196),
    ("Trans-XXS (single)", 16, 6, 32, 196),
    ("battle attn-ss", 64, 2, 24, 64),
    ("battle attn-ms stage 2", 64, 2, 24, 64),
    ("battle attn-ms stage 3", 64, 2, 48, 16),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        tune_cpu_allocator()
        print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    else:
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    names = A.candidates(device)
    print(f"{'shape':24s} {'B h d N':>16s} {'dtype':5s} {'mode':5s} " + " ".join(f"{n:>14s}" for n in names) + "  choice  load")
    for dt in args.dtypes:
        for training in (False, True):
            for label, b, h, d, n in SHAPES:
                qkv = torch.randn(b, n, 3 * h * d, device=device, dtype=DTYPES[dt])
                with torch.inference_mode(not training):
                    times = A.measure(qkv, h, training, rounds=args.rounds)
                best = min(times, key=times.get)
                cells = " ".join(f"{1e3 * times[k]:14.2f}" if k in times else f"{'-':>14s}" for k in names)
                print(f"{label:24s} {f'{b} {h} {d} {n}':>16s} {dt:5s} {'train' if training else 'infer':5s} {cells}  "
                      f"{best:7s} {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

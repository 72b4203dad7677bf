"""Time every form of the token-mixing MLP (spach.models.token_mlp) on the token-MLP shapes of the zoo
and battle models, per dtype, inference and training (forward + backward to tokens and weights), and
show which form the automatic choice keeps. Times: best of `--rounds` alternating rounds, in ms; the
ratio is `left` over the chosen form; the load average is printed with each row.

    PYTHONPATH=src python benchmarks/token_mlp_forms.py [--threads 1] [--dtypes fp32,bf16]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

from spach.bench.optimize import tune_cpu_allocator
from spach.models import token_mlp as T

# (label, batch, tokens, channels): the token MLP's hidden width is tokens // 2
SHAPES = [
    ("MLP-MS-S stage 2", 32, 784, 256),
    ("MLP-MS-S stage 3", 32, 196, 512),
    ("MLP-MS-S stage 4", 32, 49, 1024),
    ("MLP-MS-XXS stage 2", 16, 784, 128),
    ("MLP-MS-XXS stage 3", 16, 196, 256),
    ("MLP-XXS (single)", 16, 196, 384),
    ("battle mlp-ss", 64, 64, 40),
    ("battle mlp-ms stage 2", 64, 64, 48),
    ("battle mlp-ms stage 3", 64, 16, 96),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"the choice keeps {T.TOKEN_MLP.default} below {T.MIN_TOKENS} tokens and within "
          f"{T.TOKEN_MLP.keep_default_within:.0%} of the fastest")
    names = list(T.FORMS)
    print(f"{'shape':22s} {'B N C':>13s} {'dtype':5s} {'mode':5s} " + " ".join(f"{n:>8s}" for n in names)
          + "  choice  left/choice  load")
    for dt in args.dtypes:
        for training in (False, True):
            for label, b, n, c in SHAPES:
                torch.manual_seed(0)
                fc1, fc2 = nn.Linear(n, n // 2), nn.Linear(n // 2, n)
                t = torch.randn(b, n, c)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16"):
                    times = T.measure(t, fc1, fc2, nn.GELU(), training, rounds=args.rounds)
                choice = T.TOKEN_MLP.best(times) if n >= T.MIN_TOKENS else T.TOKEN_MLP.default
                cells = " ".join(f"{1e3 * times[k]:8.2f}" for k in names)
                print(f"{label:22s} {f'{b} {n} {c}':>13s} {dt:5s} {'train' if training else 'infer':5s} {cells}  "
                      f"{choice:7s} {times['left'] / times[choice]:10.2f}x  {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

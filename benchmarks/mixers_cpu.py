"""CPU training and inference throughput of one model per spatial mixer, each at the width whose MACs
match the `conv` model's, against `conv`.

Every mixer `spach.list_mixers()` names (plus `--also` variants: `window4`, since a 7x7 window does
not tile the battle's 8x8 grid) is built in one layout: `battle` (default) is the default study's
single-stage contestants (1x32x32 images, patch 4, an 8x8 token grid, depth 6; conv at width 48 sets
the MACs target), `zoo` a 224-pixel pyramid (conv first stage, depths 2-2-6-2; conv at width 64).
Each mixer gets the width whose MACs are nearest the target (`spach.models.match.match_width`). Then, for
`--rounds` rounds, every model is timed in turn (alternating the contenders, so that other work on
the machine hits them alike): `--steps` inference passes (no autograd, eval) and training steps
(forward + backward + AdamW) after one untimed one; a model's rate is its best round's median.
Ratios are against `conv` in the same run; the load average is printed before and after.

    PYTHONPATH=src python benchmarks/mixers_cpu.py [--layout zoo] [--threads 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
import torch.nn as nn

import spach
from spach.bench.optimize import tune_cpu_allocator
from spach.bench.profile import make_step, time_runs
from spach.errors import SpachError
from spach.models.flops import count_macs, count_params
from spach.models.match import match_width
from spach.models.mixers import canonical_mixer

LAYOUTS = {  # (input: in_chans, img_size, num_classes; model options; conv's width: the MACs target; batch)
    "battle": (dict(in_chans=1, img_size=32, num_classes=10), dict(patch_size=4, num_heads=2), 48, 64),
    "zoo": (dict(in_chans=3, img_size=224, num_classes=1000), dict(patch_size=4, num_heads=2), 64, 8),
}


def spec(layout: str, mixer: str) -> dict:
    """The model options of `mixer`'s model in `layout`, all but its width and input."""
    net_arch = [(mixer, 6)] if layout == "battle" else [[("conv", 2)], [(mixer, 2)], [(mixer, 6)], [(mixer, 2)]]
    return dict(LAYOUTS[layout][1], net_arch=net_arch)


def build(layout: str, mixer: str, width: int) -> nn.Module:
    return spach.create_model("spach", **spec(layout, mixer), hidden_dim=width, **LAYOUTS[layout][0])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="battle")
    p.add_argument("--mixers", type=lambda s: [m for m in s.split(",") if m], default=None,
                   help="default: spach.list_mixers() and --also")
    p.add_argument("--also", type=lambda s: [m for m in s.split(",") if m], default=["window4"])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed passes per model, mode and round")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    options, _, conv_width, batch = LAYOUTS[args.layout]
    batch = args.batch or batch
    named = [canonical_mixer(m) for m in args.mixers or [*spach.list_mixers(), *args.also]]
    mixers = ["conv"] + [m for m in dict.fromkeys(named) if m != "conv"]
    target = count_macs(build(args.layout, "conv", conv_width))
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; layout {args.layout} "
          f"({options['in_chans']}x{options['img_size']}x{options['img_size']}, batch {batch}), MACs target "
          f"{target / 1e6:.1f} M (conv at width {conv_width}); load average {os.getloadavg()[0]:.2f}", flush=True)

    models, rows = {}, {}
    for mixer in mixers:
        try:
            width = conv_width if mixer == "conv" else match_width("spach", spec(args.layout, mixer), target, "macs",
                                                                       tolerance=None, **options).width
            model = build(args.layout, mixer, width)
        except SpachError as e:
            print(f"left out {mixer}: {e}", flush=True)
            continue
        models[mixer] = model
        rows[mixer] = dict(mixer=mixer, width=width, params=count_params(model), macs=count_macs(model), infer=[], train=[])
    shape = (batch, options["in_chans"], options["img_size"], options["img_size"])
    x = torch.randn(shape)
    for r in range(args.rounds):
        for mixer, model in models.items():  # the contenders alternate within every round
            for mode in ("infer", "train"):
                model.train(mode == "train")
                times = time_runs(make_step(model, x, mode), "cpu", warmup=1, repeats=args.steps)
                rows[mixer][mode].append(batch / statistics.median(times))
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)

    base = rows["conv"]
    best = {m: {k: max(row[k]) for k in ("infer", "train")} for m, row in rows.items()}
    print(f"{'mixer':12s} {'width':>5s} {'params M':>8s} {'MACs M':>8s} {'x conv':>6s} {'infer img/s':>11s} "
          f"{'x conv':>6s} {'train img/s':>11s} {'x conv':>6s}")
    out = []
    for mixer, row in rows.items():
        b = best[mixer]
        print(f"{mixer:12s} {row['width']:5d} {row['params'] / 1e6:8.3f} {row['macs'] / 1e6:8.1f} "
              f"{row['macs'] / base['macs']:6.2f} {b['infer']:11.1f} {b['infer'] / best['conv']['infer']:6.2f} "
              f"{b['train']:11.1f} {b['train'] / best['conv']['train']:6.2f}")
        out.append(dict(row, infer=b["infer"], train=b["train"]))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return out


if __name__ == "__main__":
    main()

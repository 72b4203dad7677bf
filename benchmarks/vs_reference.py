"""Our models vs a faithful port of the official SPACH layers (benchmarks/official_layers.py), run
the official way: eager, autocast for bf16. Same weights (the port loads the official-layout state
dict), same input, same threads; the two are timed in alternation (ours, port, ours, ...) so that
a change in machine load hits both alike, and every row records the 1-minute load average.

Columns (each a ratio ours/port of speed, measured in this run: the median over the repeats of
time(port) / time(ours) of neighbouring runs; images/s from the median times):
- fp32 inference: ours through `spach.optimize(model, "cpu", "fp32")`;
- bf16 inference: ours through `spach.optimize(model, "cpu", "bf16")` (its default precision "auto"
  picks autocast or bf16 weights); the port under `torch.autocast("cpu", torch.bfloat16)`;
- fp32 / bf16 training step: forward + backward + AdamW, bf16 under autocast for both.
fp32 rows also give our GFLOP/s as a fraction of the fp32 matmul peak measured in this run.

`--battle`: the default battle's contestants (spach/studies/default.toml; 32x32 single-channel
input, their batch size, one thread), our training step in fp32 against the same step under bf16
autocast.

    PYTHONPATH=src python benchmarks/vs_reference.py                      # MS-S + XXS, all columns
    PYTHONPATH=src python benchmarks/vs_reference.py --columns infer-bf16 spach_ms_s_patch4_224_attn
    PYTHONPATH=src python benchmarks/vs_reference.py --battle
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import spach
from spach.battle.study import load_study
from spach.bench.measure import matmul_peak
from spach.bench.optimize import tune_cpu_allocator
from spach.bench.profile import make_step
from spach.models.flops import count_macs, input_shape

ROOT = Path(__file__).resolve().parents[1]
MS_S = [f"spach_ms_s_patch4_224_{f}" for f in ("conv", "attn", "mlp", "hybrid")]
XXS = [f"spach_ms_xxs_patch4_224_{f}" for f in ("conv", "attn", "mlp")] + [f"spach_xxs_patch16_224_{f}" for f in ("conv", "attn", "mlp")]
COLUMNS = ("infer-fp32", "infer-bf16", "train-fp32", "train-bf16")
# issue 10: minimum ours/port ratio per column, (models with attention, the others)
TARGETS = {"infer-fp32": (0.97, 0.97), "infer-bf16": (1.3, 1.1), "train-fp32": (0.97, 0.97), "train-bf16": (1.2, 1.05)}
BATTLE_TARGET = 1.3


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


official_layers = _load("official_layers", ROOT / "benchmarks" / "official_layers.py")


def load() -> float:
    return os.getloadavg()[0]


def alternate(a: Callable[[], object], b: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of `a` and of `b`, timed in alternation after `warmup` untimed calls of each,
    and the median over the repeats of the paired ratio time(b) / time(a) (neighbours in time: a
    change of load between repeats cancels out)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb))


def contenders(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model (random weights: the zero-initialised head would make every output equal) and the
    official-layer port holding the same weights."""
    torch.manual_seed(0)
    net = spach.create_model(name)
    with torch.no_grad():
        for w in net.parameters():
            if not w.any():
                w.normal_(0, 0.02)
    sd = {k: v.detach().clone() for k, v in spach.spach_to_official(net.state_dict()).items()}
    return net, official_layers.OfficialNet.from_state_dict(sd, net.config.num_heads)


def _infer(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return model(x)
    return run


def compare(name: str, column: str, batch: int, args: argparse.Namespace) -> dict:
    """One cell: ours vs the port for `column` at `batch`."""
    net, port = contenders(name)
    mode, dt = column.split("-")
    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    x = torch.randn(batch, *input_shape(net))
    before = load()
    if mode == "infer":
        ours = spach.optimize(net, "cpu", dtype)
        ref = _infer(port.eval(), x, dtype)
        a, b = ours(x), ref().float()
        err = ((a - b).abs().max() / b.abs().max()).item()
        t_ours, t_ref, ratio = alternate(lambda: ours(x), ref, args.warmup, args.repeats)
        extra = f"{ours.precision}" if dtype != torch.float32 else ""
    else:
        amp = dtype if dtype != torch.float32 else None
        t_ours, t_ref, ratio = alternate(make_step(net.train(), x, "train", amp), make_step(port.train(), x, "train", amp),
                                         max(args.warmup, 2), args.repeats)
        err, extra = float("nan"), ""
    row = dict(model=name, column=column, batch=batch, ours=batch / t_ours, port=batch / t_ref, ratio=ratio, err=err,
               extra=extra, load_before=before, load_after=load(), attn="attn" in name or "hybrid" in name)
    row["target"] = TARGETS[column][0 if row["attn"] else 1]
    if dtype == torch.float32 and args.peak:
        gflop = 2 * count_macs(net) / 1e9 * (3 if mode == "train" else 1)
        row["peak_frac"] = row["ours"] * gflop / args.peak
    return row


def print_row(r: dict) -> None:
    peak = f"{100 * r['peak_frac']:4.0f}%" if "peak_frac" in r else "   - "
    met = "met" if r["ratio"] >= r["target"] else "MISSED"
    err = f"{r['err']:.0e}" if r["err"] == r["err"] else "  -  "
    print(f"{r['model']:29s} {r['column']:10s} {r['batch']:5d} {r['ours']:9.2f} {r['port']:9.2f} {r['ratio']:6.3f}x "
          f"{'>=' + format(r['target'], '.2f'):>7s} {met:6s} {peak:>6s} {err:>6s} {r['extra']:8s} "
          f"{r['load_before']:5.2f}/{r['load_after']:.2f}", flush=True)


def main_models(args: argparse.Namespace) -> list[dict]:
    models = args.models or MS_S + XXS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inference batch {args.infer_batch}, "
          f"training batch {args.train_batch}, {args.repeats} alternating repeats (median), load average {load():.2f}")
    args.peak = matmul_peak("cpu", "fp32") if {"infer-fp32", "train-fp32"} & set(args.columns) else 0.0
    if args.peak:
        print(f"fp32 matmul peak {args.peak:.0f} GFLOP/s (square torch.mm 1024-4096, this run)")
    print(f"{'model':29s} {'column':10s} {'batch':>5s} {'ours im/s':>9s} {'port im/s':>9s} {'ratio':>7s} {'target':>7s} "
          f"{'':6s} {'%peak':>6s} {'relerr':>6s} {'precisn':8s} load before/after")
    rows = []
    for name in models:
        for column in args.columns:
            if column.startswith("train") and not args.train_all and name not in XXS and not args.models:
                continue
            rows.append(compare(name, column, args.infer_batch if column.startswith("infer") else args.train_batch, args))
            print_row(rows[-1])
    print(f"load average after: {load():.2f}")
    return rows


def battle_models(preset: str) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, model, batch size) of each contestant of a battle preset, built as the engine builds it."""
    study = load_study(preset=preset)
    size = study.data.get("img_size", 32)
    out = []
    for c in study.contestants:
        batch = c.recipe.get("batch_size", study.recipe.get("batch_size", 64))
        out.append((c.name, spach.create_model(c.model, num_classes=10, in_chans=1, img_size=size, **c.arch), batch))
    return out


def main_battle(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads or 1)
    print(f"battle preset {args.preset!r}: training step (forward + backward + AdamW) fp32 vs bf16 autocast, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} alternating repeats (median), load average {load():.2f}")
    print(f"{'contestant':16s} {'batch':>5s} {'fp32 im/s':>9s} {'bf16 im/s':>9s} {'ratio':>7s} {'target':>7s} load before/after")
    rows = []
    for name, net, batch in battle_models(args.preset):
        torch.manual_seed(0)
        x = torch.randn(batch, *input_shape(net))
        before = load()
        t16, t32, ratio = alternate(make_step(copy.deepcopy(net).train(), x, "train", torch.bfloat16),
                                    make_step(net.train(), x, "train"), max(args.warmup, 3), args.repeats)
        r = dict(model=name, batch=batch, fp32=batch / t32, bf16=batch / t16, ratio=ratio, load_before=before, load_after=load())
        rows.append(r)
        met = "met" if r["ratio"] >= BATTLE_TARGET else "MISSED"
        print(f"{name:16s} {batch:5d} {r['fp32']:9.0f} {r['bf16']:9.0f} {r['ratio']:6.3f}x {'>=1.30':>7s} {met:6s} "
              f"{before:5.2f}/{r['load_after']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="zoo names (default: the MS-S and XXS models; training columns: XXS only)")
    p.add_argument("--columns", type=lambda s: s.split(","), default=list(COLUMNS), help=f"comma-separated: {','.join(COLUMNS)}")
    p.add_argument("--infer-batch", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-all", action="store_true", help="training columns for the MS-S models too")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--battle", action="store_true", help="the battle-scale mode (see above)")
    p.add_argument("--preset", default="default", help="battle preset for --battle")
    args = p.parse_args(argv)
    if unknown := set(args.columns) - set(COLUMNS):
        p.error(f"unknown columns {sorted(unknown)}; use {','.join(COLUMNS)}")
    tune_cpu_allocator()  # both contenders run in this process: the allocator setting is shared
    if args.battle:
        return main_battle(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return main_models(args)


if __name__ == "__main__":
    main()

"""Our eager modules vs a straightforward transcription of the formulas (tests/official_reference.py).

Same weights (the reference takes the official-layout state dict), same input, same threads, fp32
eager inference (`torch.inference_mode`, eval). Ours runs through `spach.optimize(model)` (no
compile): channels-last tokens, fused attention, left-multiplied token MLP. The two are timed in
alternation (ours, reference, ours, ...) so that a change in machine load hits both alike.

    .venv/bin/python benchmarks/vs_reference.py [--batch-size 8] [--repeats 3] [--threads N] [models...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

import spach
from spach.models.flops import input_shape

ROOT = Path(__file__).resolve().parents[1]
MODELS = [f"spach_ms_s_patch4_224_{f}" for f in ("conv", "attn", "mlp", "hybrid")]


def load_reference():
    spec = importlib.util.spec_from_file_location("official_reference", ROOT / "tests" / "official_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = load_reference()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"fp32 eager inference, load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':30s} {'ours img/s':>11s} {'ref img/s':>10s} {'speedup':>8s}  max rel err")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        net = spach.create_model(name).eval()
        with torch.no_grad():  # zero-initialised weights (head, biases) would make the outputs trivially equal
            for w in net.parameters():
                if not w.any():
                    w.normal_(0, 0.02)
        sd = {k: v.detach() for k, v in spach.spach_to_official(net.state_dict()).items()}
        heads = net.config.num_heads
        ours = spach.optimize(net, "cpu", "fp32")
        x = torch.randn(args.batch_size, *input_shape(net))

        def run_ref():
            with torch.inference_mode():
                return ref.forward(sd, x, heads)

        a, b = ours(x), run_ref()
        err = ((a - b).abs().max() / b.abs().max()).item()
        for _ in range(args.warmup):
            ours(x), run_ref()
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            for fn, ts in ((lambda: ours(x), t_ours), (run_ref, t_ref)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        r = dict(model=name, ours=args.batch_size / statistics.median(t_ours), ref=args.batch_size / statistics.median(t_ref))
        r["speedup"] = r["ours"] / r["ref"]
        rows.append(r)
        print(f"{name:30s} {r['ours']:11.2f} {r['ref']:10.2f} {r['speedup']:7.2f}x  {err:.1e}", flush=True)
        del ours, net, sd
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main()

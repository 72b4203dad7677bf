"""CPU speed of the `scan` mixer: its chunked selective scan against the plain step-by-step recurrence
(a Python loop over tokens, autograd through it), alone and inside a model, and the training throughput
of `scan` and `gatedconv` models against the default battle's `conv` contestant at matched MACs.

Times are forward + backward (the scan alone) or a whole training step (forward, backward, AdamW; batch
`--batch`, 64 by default, 1x32x32 images, 10 classes, patch 4: the default battle's 8x8 tokens), the best of `--rounds`
rounds in which the contenders alternate; ratios are measured in the same run, with the load average.

    PYTHONPATH=src python benchmarks/scan_cpu.py [--threads 1] [--rounds 5] [--batch 64] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

import spach
from spach.models import scan as S
from spach.models.flops import count_macs
from spach.models.match import match_width

CONV = dict(net_arch=[("conv", 6)], hidden_dim=48, patch_size=4, num_heads=2)  # the default battle's conv-ss
SHAPE = dict(img_size=32, in_chans=1, num_classes=10)


def step_by_step(x, dt, A_log, B, C, D, dt_bias, chunk: int = 8):
    """The selective scan as its recurrence, one token at a time (what the chunked scan replaces)."""
    delta = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    h, ys = x.new_zeros(*x.shape[1:], A.shape[-1]), []
    for t in range(x.shape[0]):
        h = torch.exp(delta[t, ..., None] * A) * h + (delta[t] * x[t])[..., None] * B[t, :, :, None, :]
        ys.append((h * C[t, :, :, None, :]).sum(-1) + D * x[t])
    return torch.stack(ys)


def best_of(rounds: int, contenders: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds per call of each contender: the best of `rounds`, the contenders alternating."""
    best = {k: float("inf") for k in contenders}
    for _ in range(rounds):
        for k, f in contenders.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


SHAPES = [("battle: 8x8 tokens, batch 64, E 32", 64, 64, 32), ("14x14 tokens, batch 16, E 64", 196, 16, 64),
          ("28x28 tokens, batch 4, E 64", 784, 4, 64)]  # (label, tokens, batch, inner width), 4 directions, N = 1


def scan_alone(rounds: int, shapes: list[tuple[str, int, int, int]]) -> list[dict]:
    rows = []
    for label, T, b, E in shapes:
        g = torch.Generator().manual_seed(0)
        inputs = dict(x=torch.randn(T, b, 4, E, generator=g), dt=torch.randn(T, b, 4, E, generator=g),
                      A_log=torch.zeros(4, E, 1), B=torch.randn(T, b, 4, 1, generator=g), C=torch.randn(T, b, 4, 1, generator=g),
                      D=torch.ones(4, E), dt_bias=torch.full((4, E), -2.0))
        leaves = {k: v.requires_grad_() for k, v in inputs.items()}

        def run(fn: Callable) -> Callable[[], None]:
            return lambda: fn(**leaves).sum().backward()

        times = best_of(rounds, {"chunked": run(S.selective_scan), "step-by-step": run(step_by_step)})
        rows.append(dict(what=f"scan fwd+bwd, {label}", **{k: 1e3 * v for k, v in times.items()},
                         ratio=times["step-by-step"] / times["chunked"], load=os.getloadavg()[0]))
        print(f"{rows[-1]['what']:54s} chunked {rows[-1]['chunked']:8.1f} ms  step-by-step {rows[-1]['step-by-step']:8.1f} ms"
              f"  step-by-step/chunked {rows[-1]['ratio']:5.2f}x  load {rows[-1]['load']:.2f}", flush=True)
    return rows


def training_step(model: torch.nn.Module, batch: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def models(rounds: int, batch: int) -> list[dict]:
    conv = spach.create_model("spach", **CONV, **SHAPE)
    target = count_macs(conv)
    contenders, macs = {"conv": training_step(conv, batch)}, {"conv": target}
    for mixer in ("scan", "gatedconv"):
        spec = dict(net_arch=[(mixer, 6)], patch_size=4, num_heads=2)
        m = match_width("spach", spec, target, "macs", **SHAPE)
        model = spach.create_model("spach", **spec, hidden_dim=m.width, **SHAPE)
        contenders[f"{mixer} (width {m.width})"], macs[f"{mixer} (width {m.width})"] = training_step(model, batch), m.cost
        if mixer == "scan":
            looped = training_step(model, batch)
            scan_key = f"{mixer} (width {m.width})"

            def with_loop(step: Callable[[], None] = looped) -> None:
                S.selective_scan, real = step_by_step, S.selective_scan
                try:
                    step()
                finally:
                    S.selective_scan = real

            contenders[f"{scan_key}, step-by-step scan"], macs[f"{scan_key}, step-by-step scan"] = with_loop, m.cost
    times = best_of(rounds, contenders)
    rows = []
    for k, t in times.items():
        rows.append(dict(what=k, macs=macs[k], img_s=batch / t, vs_conv=times["conv"] / t, load=os.getloadavg()[0]))
        print(f"train step  {k:38s} {macs[k] / 1e6:6.2f} MMACs  {batch / t:7.1f} img/s  {times['conv'] / t:5.2f}x conv's"
              f"  load {rows[-1]['load']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="training batch (default 64, the battle's)")
    p.add_argument("--quick", action="store_true", help="the scan alone at the battle's shape only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    return scan_alone(args.rounds, SHAPES[:1] if args.quick else SHAPES) + models(args.rounds, args.batch)


if __name__ == "__main__":
    main()

"""`spach battle --dry-run`: the runs, and how long they will take on the machine it runs on.

Each contestant's training step (forward, backward, AdamW; autocast as its recipe says) and evaluation
pass are timed here, at its arm's batch size and image size, with the threads one battle job gets; a
run's time is its epochs x (training images / training rate + scored images / evaluation rate), and
the study's wall time divides the sum over runs by the jobs running at once. A GPU study (ImageNet on
CUDA) on a machine without a GPU cannot be timed: its GPU hours then come from MACs at the training
rate of DeiT-B on V100s."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TextIO

import torch

from spach.battle.costs import measure_costs
from spach.battle.looks import describe
from spach.battle.plan import data_shape, epoch_images
from spach.battle.sequential import parse_budget
from spach.battle.study import Contestant, Study
from spach.bench.command import busy_warning
from spach.bench.profile import throughput
from spach.device import amp_dtype, parse_device
from spach.humanize import hms
from spach.train.datasets import canonical_dataset
from spach.train.factory import build_model

# DeiT-B (17.6 GMACs) trains 300 epochs of ImageNet in 53 h on 8 V100s (DeiT paper): ~26 TFLOP/s per GPU
# at 6 FLOPs (2 x forward + backward) per MAC.
V100_TRAIN_FLOPS = 26e12
STARTUP_S = 10.0  # a job's process start (torch import), the costs and the report, roughly


@dataclass
class RunCost:
    contestant: Contestant
    images: int  # training images per epoch
    scored: int  # images evaluated per epoch (test + training subset)
    epochs: int
    seconds: float  # one run, on this machine (or on one V100 when `gpu_hours`)


def _timed(study: Study, c: Contestant, device: torch.device, threads: int) -> float:
    cfg = study.config(c)
    classes, chans, size = data_shape(study)
    model = build_model(cfg, classes, chans, size)
    img = size or model.pretrained_cfg["input_size"][-1]
    dtype = amp_dtype(cfg.amp, device, training=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train = throughput(model, cfg.batch_size, img, device, dtype, mode="train", warmup=2, repeats=3)
        infer = throughput(model, cfg.eval_batch_size or cfg.batch_size, img, device, dtype, warmup=1, repeats=2)
    finally:
        torch.set_num_threads(old)
    n_train, scored = epoch_images(cfg)
    return cfg.epochs * (n_train / train + scored / infer)


def print_plan(study: Study, stream: TextIO | None = None) -> float:
    """Print the runs and the time they take here; returns the wall time in hours (or GPU hours)."""
    stream = stream or sys.stdout
    cfg = study.config()
    device = parse_device(cfg.device)
    gpu_study = canonical_dataset(cfg.dataset) == "imagefolder" or cfg.device.startswith("cuda")
    guess = gpu_study and device.type != "cuda"  # a GPU study with no GPU here: MAC-based GPU hours
    jobs = study.jobs if device.type == "cpu" else 1
    threads = max(1, (os.cpu_count() or 1) // jobs)
    costs = measure_costs(study, None, "cpu", timed=False)
    runs = len(study.contestants) * len(study.seeds)
    print(f"{study.name}: {len(study.contestants)} contestants x {len(study.seeds)} seeds = {runs} runs on "
          f"{cfg.dataset}" + (f", arms: {', '.join(study.arm_names())}" if study.arms else ""), file=stream)
    if guess:
        print(f"no GPU here to time it: GPU hours from MACs at {V100_TRAIN_FLOPS / 1e12:.0f} TFLOP/s of training per "
              "V100 (the rate of DeiT-B: 300 epochs of ImageNet in 53 h on 8 V100s)", file=stream)
    else:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"this CPU ({threads} thread(s) per job)"
        print(f"timed on {where}: each contestant's training step and evaluation pass, at its recipe's batch size "
              f"and precision; {jobs} job(s) at a time", file=stream)
    print(f"{'contestant':<24} {'arm':<8} {'params':>8} {'MMACs':>8} {'epochs':>6} {'images/epoch':>12} "
          f"{'per run':>9}", file=stream)
    total = 0.0
    for c in study.contestants:
        k = costs[c.name]
        if "error" in k:
            print(f"{c.name:<24} cannot run: {k['error']}", file=stream)
            continue
        ccfg = study.config(c)
        n_train, scored = epoch_images(ccfg)
        if guess:
            secs = ccfg.epochs * (n_train * 6 + scored * 2) * k["macs"] / V100_TRAIN_FLOPS
        else:
            secs = _timed(study, c, device, threads)
        total += secs * len(study.seeds)
        print(f"{c.name:<24} {c.arm:<8} {k['params'] / 1e6:>7.2f}M {k['macs'] / 1e6:>8.1f} {ccfg.epochs:>6} "
              f"{n_train:>12} {hms(secs):>9}", file=stream)
    if guess:
        hours = total / 3600
        print(f"total: {hours:.0f} GPU hours ({hours / 8:.0f} h on 8 GPUs) for {len(study.seeds)} seed(s)", file=stream)
        return hours
    wall = total / jobs + STARTUP_S * (1 + math.ceil(runs / max(jobs, 1)) / 10)
    load = f"(load average now {os.getloadavg()[0]:.1f}: a busy machine runs slower)"
    busy = busy_warning()
    if busy:
        print(f"warning: {busy}", file=stream)
    if study.sequential:
        return _print_looks(study, total, jobs, load, stream)
    print(f"total: {hms(total)} of training, about {hms(wall)} wall with {jobs} job(s) at a time {load}", file=stream)
    return wall / 3600


def _print_looks(study: Study, total: float, jobs: int, load: str, stream: TextIO) -> float:
    """A sequential study's plan: the first wave, every seed, and the budget, in wall time here."""
    per_seed = total / len(study.seeds) / jobs  # all contestants, one seed each
    first = per_seed * study.first_wave + STARTUP_S * (1 + math.ceil(len(study.contestants) * study.first_wave / jobs) / 10)
    budget = parse_budget(study.budget)
    print(describe(study), file=stream)
    print(f"first wave: {study.first_wave} seed(s) x {len(study.contestants)} contestants, about {hms(first)} wall; "
          f"each further seed of every contestant about {hms(per_seed)}; all {len(study.seeds)} seeds (the most the "
          f"looks can ask for) about {hms(first + per_seed * (len(study.seeds) - study.first_wave))} {load}",
          file=stream)
    if budget.kind == "wall":
        pair = total / len(study.seeds) / len(study.contestants) * math.ceil(2 / jobs)  # one more seed of two contestants
        print(f"budget {budget.text}: the first wave takes {first / budget.amount:.0%} of it; the looks spend the rest "
              "on the comparisons still open" + room_warning(first, budget.amount, pair), file=stream)
    return first / 3600


def room_warning(first: float, budget_s: float, pair_s: float) -> str:
    """The dry run's warning for a first wave that leaves the looks too little of a wall-time budget
    (less than three more seeds of a pair of contestants), or that does not fit at all; '' otherwise."""
    if first > budget_s:
        return " - the first wave alone does not fit: give a larger budget or fewer contestants"
    if budget_s - first < 3 * pair_s:
        return (f" - it leaves the looks {hms(budget_s - first)}, less than three more seeds of a pair of contestants "
                f"(~{hms(pair_s)} each here): give a larger budget, or fewer contestants or a smaller first_wave")
    return ""

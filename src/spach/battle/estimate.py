"""`spach battle --dry-run`: the runs, how long they will take on the machine it runs on, and for a
sequential study its plan (the findings the budget can afford, in rank order, each comparison's n_max)
and the decisions it is predicted to reach (`spach.battle.predict`, from the study's [prior] or a pilot
folder given with --pilot).

Each contestant's training step (forward, backward, AdamW; autocast as its recipe says) and evaluation
pass are timed here, at its arm's batch size and image size, with the threads one battle job gets
(`spach.battle.costs`); a run's time is its epochs x training images at that rate, its scored epochs x
scored images at the evaluation rate, and a start-up (`spach.battle.afford.run_seconds`). A GPU study
(ImageNet on CUDA) on a machine without a GPU cannot be timed: its GPU hours then come from MACs at the
training rate of DeiT-B on V100s."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from spach.battle.afford import V100_TRAIN_FLOPS, available_cores, describe_plan, make_plan, run_seconds
from spach.battle.budget import parse_budget
from spach.battle.costs import measure_costs
from spach.battle.looks import describe
from spach.battle.plan import epoch_images
from spach.battle.study import Study
from spach.bench.command import busy_warning
from spach.device import parse_device
from spach.humanize import hms
from spach.train.datasets import canonical_dataset

STARTUP_S = 5.0  # the battle's own start before it measures the costs (python, torch, the data check), roughly


def print_plan(study: Study, stream: TextIO | None = None, pilot: str | Path | None = None) -> float:
    """Print the runs and the time they take here (and a sequential study's plan and predicted decisions);
    returns the wall time in hours (or GPU hours)."""
    stream = stream or sys.stdout
    cfg = study.config()
    device = parse_device(cfg.device)
    gpu_study = canonical_dataset(cfg.dataset) == "imagefolder" or cfg.device.startswith("cuda")
    guess = gpu_study and device.type != "cuda"  # a GPU study with no GPU here: MAC-based GPU hours
    jobs = min(study.jobs, available_cores()) if device.type == "cpu" else 1
    threads = max(1, available_cores() // jobs)
    t_costs = time.time()
    costs = measure_costs(study, None, str(device), timed=not guess, threads=threads)
    costs_s = time.time() - t_costs
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
        secs = run_seconds(study, c.name, costs)
        total += secs * len(study.seeds)
        print(f"{c.name:<24} {c.arm:<8} {k['params'] / 1e6:>7.2f}M {k['macs'] / 1e6:>8.1f} {ccfg.epochs:>6} "
              f"{epoch_images(ccfg)[0]:>12} {hms(secs):>9}", file=stream)
    if guess:
        hours = total / 3600
        print(f"total: {hours:.0f} GPU hours ({hours / 8:.0f} h on 8 GPUs) for {len(study.seeds)} seed(s)", file=stream)
        if study.sequential:
            _print_sequential(study, costs, 1, stream, pilot, 0.0)
        return hours
    busy = busy_warning()
    if busy:
        print(f"warning: {busy}", file=stream)
    if study.sequential:
        return _print_sequential(study, costs, jobs, stream, pilot, STARTUP_S + costs_s) / 3600
    wall = total / jobs + STARTUP_S
    print(f"total: {hms(total)} of training, about {hms(wall)} wall with {jobs} job(s) at a time "
          f"(load average now {_load():.1f}: a busy machine runs slower)", file=stream)
    return wall / 3600


def _load() -> float:
    import os
    return os.getloadavg()[0]


def _print_sequential(study: Study, costs: dict, slots: int, stream: TextIO, pilot: str | Path | None, before: float) -> float:
    """A sequential study's plan on this machine and, given a prior, its predicted decisions; returns the
    first wave's wall seconds."""
    budget = parse_budget(study.budget)
    plan = make_plan(study, budget, costs, slots, used=before if budget.kind == "wall" else 0.0)
    print(describe(study, plan), file=stream)
    print(f"plan for the {budget.text} budget (load average now {_load():.1f}: a busy machine runs slower): the "
          f"first wave takes {budget.show(plan.first_wave_s)}; findings in rank order:", file=stream)
    for line in describe_plan(plan, study):
        print(line, file=stream)
    from spach.battle.predict import predict, prior_from_folder, study_prior, summary  # scipy-heavy simulation
    from spach.battle.results import contestant_entries

    prior = prior_from_folder(Path(pilot), study) if pilot else study_prior(study)
    if prior is None:
        print("no prediction: the study states no [prior] (give a pilot's study folder with --pilot DIR)", file=stream)
        return plan.first_wave_s
    result = predict(study, plan, prior, contestant_entries(study, costs))
    print(f"predicted ({result.sims} simulated battles on {prior.note or 'the study prior'}): {summary(result, plan)}",
          file=stream)
    if pilot:
        print("the pilot's numbers as a study [prior] (fix them in the study file before its final run):", file=stream)
        print(prior.to_toml(), file=stream, end="")
    return plan.first_wave_s if math.isfinite(plan.first_wave_s) else 0.0

"""What each contestant costs: parameters, MACs and measured inference throughput (cached in
`costs.json`), its family/layout facts for the findings, and the dry run's time estimate."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from spach.battle.plan import data_shape
from spach.battle.results import COSTS_FILE, load_costs
from spach.battle.study import Study
from spach.bench.profile import count_macs, count_params, throughput
from spach.errors import SpachError, first_line
from spach.files import atomic_write_text
from spach.train.datasets import DATASETS, canonical_dataset
from spach.train.factory import build_model


def contestant_facts(model: Any) -> dict[str, Any]:
    """Family, layout and local-modeling facts of a built model (timm models are 'outside' baselines)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "family"):
        return {"family": "outside", "layout": "-", "cpe": True, "shared": False, "arch_key": type(model).__name__}
    arch = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("cpe", "pos_embed", "shared_spatial_func", "drop_path_rate", "drop_rate", "attn_drop_rate")}
    return {"family": model.family, "layout": "multi" if len(cfg.net_arch) > 1 else "single", "cpe": bool(cfg.cpe),
            "shared": bool(cfg.shared_spatial_func), "arch_key": json.dumps(arch, sort_keys=True, default=str)}


def measure_costs(study: Study, out: Path | None, device: str = "cpu", timed: bool = True) -> dict[str, dict[str, Any]]:
    """Params, MACs and inference throughput (images/s, batch 64, `device`; NaN when not `timed`) of every
    contestant, cached in `out/costs.json`. A model that cannot be built with the study's data is a user
    error; one that crashes otherwise is recorded (`error`) and its runs fail without training."""
    costs = load_costs(out) if out is not None else {}
    classes, chans, size = data_shape(study)
    for c in study.contestants:
        if c.name in costs and "error" not in costs[c.name]:
            continue
        cfg = study.config(c)
        try:
            model = build_model(cfg, classes, chans, size)
        except SpachError as e:
            raise SpachError(f"contestant {c.name!r}: {e}") from None
        try:
            img = size or model.pretrained_cfg["input_size"][-1]
            costs[c.name] = {"params": count_params(model), "macs": count_macs(model, img),
                             "throughput": throughput(model, 64, img, device) if timed else math.nan,
                             "throughput_device": device, "model": c.model, **contestant_facts(model)}
        except Exception as e:
            costs[c.name] = {"error": f"{type(e).__name__}: {first_line(e)}", "model": c.model}
        if out is not None:
            atomic_write_text(out / COSTS_FILE, json.dumps(costs, indent=1) + "\n")
    return costs


# Training throughput per MAC when no GPU is here to measure: DeiT-B (17.6 GMACs) trains 300 epochs of
# ImageNet in 53 h on 8 V100s (DeiT paper), i.e. ~26 TFLOP/s per GPU at 6 FLOPs (2 x fwd+bwd) per MAC.
V100_TRAIN_FLOPS = 26e12


def print_plan(study: Study, stream: TextIO | None = None) -> float:
    """Print the runs and an estimate of their GPU hours; returns the total hours."""
    stream = stream or sys.stdout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = measure_costs(study, None, device, timed=device == "cuda")
    name = study.data.get("dataset", "imagefolder")
    n_train, n_val = DATASETS[canonical_dataset(name)][3:]
    n_train = study.data.get("train_subset") or n_train
    n_val = study.data.get("val_subset") or n_val
    cfg = study.config()
    print(f"{study.name}: {len(study.contestants)} contestants x {len(study.seeds)} seeds = "
          f"{len(study.contestants) * len(study.seeds)} runs of {cfg.epochs} epochs on {name} "
          f"({n_train} training, {n_val} validation images)", file=stream)
    measured = device == "cuda"
    basis = (f"inference throughput measured on {torch.cuda.get_device_name()} (batch 64, fp32), training at 1/3 of it"
             if measured else f"no GPU here to measure: GPU hours from MACs at {V100_TRAIN_FLOPS / 1e12:.0f} TFLOP/s "
             "of training per V100 (the rate of DeiT-B: 300 epochs of ImageNet in 53 h on 8 V100s)")
    print(f"estimate: {basis}", file=stream)
    print(f"{'contestant':<28} {'params':>8} {'GMACs':>7} {'img/s':>9} {'GPU h/run':>10}", file=stream)
    total = 0.0
    for c in study.contestants:
        k = costs[c.name]
        if "error" in k:
            print(f"{c.name:<28} cannot run: {k['error']}", file=stream)
            continue
        if measured:
            secs = cfg.epochs * (3 * n_train + n_val) / k["throughput"]
        else:
            secs = cfg.epochs * (n_train * 6 + n_val * 2) * k["macs"] / V100_TRAIN_FLOPS
        hours = secs / 3600
        total += hours * len(study.seeds)
        rate = f"{k['throughput']:.0f}" if math.isfinite(k["throughput"]) else "-"
        print(f"{c.name:<28} {k['params'] / 1e6:>7.2f}M {k['macs'] / 1e9:>7.3f} {rate:>9} {hours:>10.2f}", file=stream)
    print(f"total: {total:.0f} GPU hours ({total / 8:.0f} h on 8 GPUs) for {len(study.seeds)} seed(s)", file=stream)
    return total

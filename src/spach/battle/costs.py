"""What each contestant costs: parameters, MACs and measured inference throughput (cached in
`costs.json`) and its family/layout facts for the findings."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from spach.battle.plan import data_shape
from spach.battle.results import COSTS_FILE, load_costs
from spach.battle.study import Study
import torch

from spach.bench.profile import count_macs, count_params, throughput
from spach.device import amp_dtype
from spach.errors import SpachError, first_line
from spach.files import atomic_write_text
from spach.train.factory import build_model


def contestant_facts(model: Any) -> dict[str, Any]:
    """Family, layout and local-modeling facts of a built model (timm models are 'outside' baselines)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "family"):
        return {"family": "outside", "layout": "-", "cpe": True, "shared": False, "arch_key": type(model).__name__}
    arch = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("cpe", "pos_embed", "shared_spatial_func", "drop_path_rate", "drop_rate", "attn_drop_rate")}
    return {"family": model.family, "layout": "multi" if len(cfg.net_arch) > 1 else "single", "cpe": bool(cfg.cpe),
            "shared": bool(cfg.shared_spatial_func), "arch_key": json.dumps(arch, sort_keys=True, default=str),
            "width": cfg.hidden_dim}


def measure_costs(study: Study, out: Path | None, device: str = "cpu", timed: bool = True,
                  threads: int = 1, deadline: float = 0.0, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Params, MACs and, when `timed`, the measured speed of every contestant on `device` with `threads`
    (one battle job's, while `jobs` of them run at once): training images/s (forward, backward and AdamW at its recipe's batch size and
    precision) and evaluation images/s (at its eval batch size; `throughput`, the report's), cached in
    `out/costs.json`. A model that cannot be built with the study's data is a user error; one that crashes
    otherwise is recorded (`error`) and its runs fail without training. Past `deadline` (a battle's budget)
    nothing more is timed: a contestant without its speed cannot be planned for, and is timed next time."""
    costs = load_costs(out) if out is not None else {}
    classes, chans, size = data_shape(study)
    for c in study.contestants:
        if c.name in costs and "error" not in costs[c.name] and (costs[c.name].get("train_img_s") or not timed):
            continue
        cfg = study.config(c)
        where = f"contestant {c.name!r}: recipe.pretrained {cfg.pretrained!r}"
        if cfg.pretrained and not Path(cfg.pretrained).is_file():
            raise SpachError(f"{where} is not a file; give the path of a checkpoint of model {c.model!r}")
        try:
            model = build_model(cfg, classes, chans, size)
        except SpachError as e:
            raise SpachError(f"contestant {c.name!r}: {e}") from None
        except Exception as e:
            if not cfg.pretrained:
                raise
            raise SpachError(f"{where} cannot be loaded into {c.model!r} ({type(e).__name__}: {first_line(e)}); "
                             "give a checkpoint of that model") from None
        try:
            img = size or model.pretrained_cfg["input_size"][-1]
            late = bool(deadline) and time.time() >= deadline
            rates = _rates(model, cfg, img, device, threads, jobs) if timed and not late else \
                {"train_img_s": math.nan, "eval_img_s": math.nan}
            costs[c.name] = {"params": count_params(model), "macs": count_macs(model, img), **rates,
                             "throughput": rates["eval_img_s"], "throughput_device": device, "threads": threads,
                             "model": c.model, **contestant_facts(model)}
        except Exception as e:
            costs[c.name] = {"error": f"{type(e).__name__}: {first_line(e)}", "model": c.model,
                             "traceback": traceback.format_exc()}  # for the runs' error files
        if out is not None:
            atomic_write_text(out / COSTS_FILE, json.dumps(costs, indent=1) + "\n")
    return costs


def _rates(model: Any, cfg: Any, img: int, device: str, threads: int, jobs: int = 1) -> dict[str, float]:
    """Training and evaluation images/s of one run of `cfg` on `model` with `threads`, while `jobs` such runs
    share the machine (each timed in a thread of its own on a copy of the model, all at once: two jobs on a
    2-core machine each train ~35% slower than one alone)."""
    dtype = amp_dtype(cfg.amp, torch.device(device), training=True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train = _together(jobs, lambda: throughput(copy.deepcopy(model), cfg.batch_size, img, device, dtype, mode="train",
                                                   warmup=2, repeats=3))
        infer = _together(jobs, lambda: throughput(copy.deepcopy(model), min(cfg.eval_batch_size or cfg.batch_size, 256),
                                                   img, device, dtype, warmup=1, repeats=2))
    finally:
        torch.set_num_threads(old)
    return {"train_img_s": round(train, 1), "eval_img_s": round(infer, 1)}


def _together(jobs: int, measure: Any) -> float:
    """The mean of `measure()` run in `jobs` threads at once (torch releases the GIL in its kernels)."""
    if jobs <= 1:
        return measure()
    results: list[float] = []
    workers = [threading.Thread(target=lambda: results.append(measure())) for _ in range(jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(results) / len(results) if results else math.nan

"""The price of each spatial mixer: `spach bench --sweep`'s mixer sweep.

A SPACH model's layout with every spatial mixer beyond a pyramid's always-conv first stage replaced by
each registered mixer in turn (one run a stage, so a window run alternates its shifts), at the model's
own width, heads and everything else: parameters, MACs and throughput per mixer, and the throughput
against the same layout with `conv`. A mixer that cannot build there (a window that does not tile a
grid) is left out with a note.

    records = spach.bench.mixers.mixer_sweep(["spach_ms_xxs_patch4_224_attn"], BenchSettings(batch_size=8))
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import torch

from spach.bench.measure import BenchSettings, bench_model
from spach.errors import SpachError
from spach.models.backbone import Arch, SpachConfig, SpachNet
from spach.models.mixers import canonical_mixer, list_mixers
from spach.models.zoo import create_model
from spach.terminal import track


def with_mixer(arch: Arch, mixer: str) -> Arch:
    """`arch` with `mixer` in every stage but a pyramid's first (one run of each stage's depth)."""
    keep = arch[:1] if len(arch) > 1 else []
    return keep + [[(mixer, sum(depth for _, depth in stage))] for stage in arch[len(keep):]]


def mixer_configs(model: str, img_size: int | None = None, mixers: Iterable[str] | None = None) -> dict[str, SpachConfig]:
    """{mixer: config} of `model`'s layout with each of `mixers` (default: every registered one) that
    builds at this size; {} for a model of another family (noted)."""
    with torch.device("meta"):
        net = create_model(model, **({"img_size": img_size} if img_size else {}))
    if not isinstance(net, SpachNet):
        print(f"spach bench: note: the mixer sweep leaves out {model}: not a SPACH model, it has no mixer slot", file=sys.stderr)
        return {}
    base = net.config.to_dict()
    configs = {}
    for mixer in list(dict.fromkeys(canonical_mixer(m) for m in mixers)) if mixers else list_mixers():
        try:
            cfg = SpachConfig(**{**base, "net_arch": with_mixer(net.config.net_arch, mixer)})
            with torch.device("meta"):
                SpachNet(cfg)  # the mixer's own checks (a window must tile the grids)
        except SpachError as e:
            print(f"spach bench: note: the mixer sweep of {model} leaves out {mixer}: {e}", file=sys.stderr)
            continue
        configs[mixer] = cfg
    return configs


def mixer_sweep(models: Iterable[str], settings: BenchSettings, peak: float | None = None,
                mixers: Iterable[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One record per (model, mixer): `extra["sweep"] = "mixer"`, `extra["mixer"]`, and `extra["x_conv"]`
    (inference images/s against the `conv` layout's, when both were measured)."""
    mixers = list(mixers) if mixers else None
    jobs = [(model, mixer, cfg) for model in models
            for mixer, cfg in mixer_configs(model, settings.img_size, mixers).items()]
    records = []
    for model, mixer, cfg in track(jobs, "spach bench mixers", mode="auto" if progress else "none",
                                   name=lambda job: f"{job[0]} with {job[1]}"):
        rec = bench_model(lambda: create_model("spach", **cfg.to_dict()), settings, peak)
        rec.model = model
        rec.extra.update(sweep="mixer", mixer=mixer)
        records.append(rec.as_dict())
    for r in records:
        conv = next((c for c in records if c["model"] == r["model"] and c["extra"]["mixer"] == "conv"), None)
        if conv and conv["infer_img_s"] and r["infer_img_s"]:
            r["extra"]["x_conv"] = r["infer_img_s"] / conv["infer_img_s"]
    return records


def format_mixer_table(records: list[dict[str, Any]]) -> str:
    """Per model: one row per mixer (params, MACs, throughputs, inference against conv)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        r0 = rows[0]
        lines.append(f"mixers in {model}'s layout and width | {r0['device_name']} | {r0['dtype']} | "
                     f"batch {r0['batch_size']}, {r0['img_size']}px")
        head = ["mixer", "params M", "GMACs", "infer img/s", "x conv", "train img/s"]
        table = [[r["extra"]["mixer"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}",
                  "-" if r["infer_img_s"] is None else f"{r['infer_img_s']:.1f}",
                  f"{r['extra']['x_conv']:.2f}" if "x_conv" in r["extra"] else "-",
                  "-" if r["train_img_s"] is None else f"{r['train_img_s']:.2f}"] for r in rows]
        widths = [max(len(x) for x in col) for col in zip(head, *table)]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *table]]
    return "\n".join(lines)

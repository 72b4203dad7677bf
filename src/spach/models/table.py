"""`spach models`: the zoo as a table (name, family, layout, params, GMACs, official top-1, whether the
official weights are published: `pretrained=True` loads them)."""
from __future__ import annotations

import json

import torch

from spach.errors import SpachError
from spach.models.flops import count_macs, count_params
from spach.models.registry import OFFICIAL_TOP1, OFFICIAL_WEIGHTS
from spach.models.zoo import create_model, list_models


def model_rows(pattern: str = "*") -> list[dict]:
    """One record per zoo model; models are built on the meta device, so this is fast and light."""
    names = list_models(pattern)
    if not names:
        raise SpachError(f"no model matches {pattern!r}; try 'spach models' for the full list")
    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        rows.append(dict(
            name=name,
            family=model.family,
            layout="multi-stage" if len({f["reduction"] for f in model.feature_info}) > 1 else "single-stage",
            params=count_params(model),
            macs=count_macs(model),
            top1=OFFICIAL_TOP1.get(name),
            weights=OFFICIAL_WEIGHTS.get(name),
        ))
    return rows


def print_models(pattern: str = "*", as_json: bool = False) -> None:
    rows = model_rows(pattern)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = (f"{'model':36s} {'family':7s} {'layout':12s} {'params (M)':>10s} {'GMACs':>7s} {'IN-1k top-1':>11s} "
              f"{'weights':>7s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
        weights = "yes" if r["weights"] else "-"
        print(f"{r['name']:36s} {r['family']:7s} {r['layout']:12s} {r['params'] / 1e6:10.2f} {r['macs'] / 1e9:7.2f} "
              f"{top1:>11s} {weights:>7s}")

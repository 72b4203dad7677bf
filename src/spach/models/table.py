"""`spach models`: the zoo as a table (name, family, layout, params, GMACs, official top-1, whether the
official weights are published: `pretrained=True` loads them).

The zoo's models are fixed, so their costs are facts: counted once into `spach.models.zoo_costs`
(`python -m spach.models.table --recount` rewrites it) and checked against a real count by the tests;
the table needs no forward pass. A model missing from that file (a variant added since) is counted
on the spot.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spach.errors import SpachError
from spach.files import atomic_write_text
from spach.models.flops import count_macs, count_params
from spach.models.registry import OFFICIAL_TOP1, OFFICIAL_WEIGHTS
from spach.models.zoo import create_model, list_models
from spach.models.zoo_costs import ZOO_COSTS


def count_costs(name: str) -> tuple[str, str, int, int]:
    """(family, layout, params, MACs at batch 1) of zoo model `name`, counted: the model is built on the
    meta device and run once under torch's FLOP counter."""
    with torch.device("meta"):
        model = create_model(name)
    layout = "multi-stage" if len({f["reduction"] for f in model.feature_info}) > 1 else "single-stage"
    return model.family, layout, count_params(model), count_macs(model)


def model_rows(pattern: str = "*") -> list[dict]:
    """One record per zoo model matching `pattern`."""
    names = list_models(pattern)
    if not names:
        raise SpachError(f"no model matches {pattern!r}; try 'spach models' for the full list")
    rows = []
    for name in names:
        family, layout, params, macs = ZOO_COSTS.get(name) or count_costs(name)
        rows.append(dict(name=name, family=family, layout=layout, params=params, macs=macs,
                         top1=OFFICIAL_TOP1.get(name), weights=OFFICIAL_WEIGHTS.get(name)))
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


def _recount() -> None:
    """Count every zoo model and rewrite `zoo_costs.py` (after a zoo model is added or changed)."""
    path = Path(__file__).with_name("zoo_costs.py")
    head = path.read_text().split("ZOO_COSTS = ")[0]
    costs = {name: count_costs(name) for name in list_models()}
    body = "".join(f"    {name!r}: {value!r},\n" for name, value in costs.items())
    atomic_write_text(path, head + "ZOO_COSTS = {\n" + body + "}\n")
    print(f"wrote {path}: {len(costs)} models")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="recount the stored costs of the zoo models")
    parser.add_argument("--recount", action="store_true", required=True, help="count every zoo model and rewrite zoo_costs.py")
    parser.parse_args()
    _recount()

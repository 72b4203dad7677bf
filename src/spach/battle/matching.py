"""Contestants that state a cost instead of a width: `match = { macs = "conv-ss", tolerance = 0.1 }` (the
MACs of another contestant), `match = { macs = 5.2e6 }` or `match = { params = 4e4 }`.

When a study is read, each such contestant gets the `hidden_dim` whose cost at the study's data shape
(classes, channels, image size) is closest to the target (`spach.models.match`); a width outside the
tolerance is refused in one line naming the contestant. The chosen width goes into the contestant's
`arch` (so study.json, the runs' config.json and the report hold the width that trained), and what it
was matched to into its `match` record.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from spach.errors import SpachError
from spach.models.match import match_width, model_cost
from spach.train.datasets import dataset_shape
from spach.train.factory import build_model

# `study` below is a spach.battle.study.Study, whose reading calls this module (hence not imported here).


def resolve_matches(study: Any, fail: Callable[[str, str], Any]) -> None:
    """Give every contestant with a `match` its width (`fail(where, problem)` raises)."""
    pending = [c for c in study.contestants if c.match and "hidden_dim" not in c.arch]
    if not pending:
        return
    shape = dataset_shape(study.data)
    by_name = {c.name: c for c in study.contestants}
    resolving: list[str] = []

    def resolve(c: Any) -> None:
        where = f"contestant {c.name!r}.match"
        if "hidden_dim" in c.arch:
            return
        if c.name in resolving:
            fail(where, f"the targets go round in a circle ({' -> '.join([*resolving, c.name])}); give one of them a "
                        "width or a number")
        resolving.append(c.name)
        by = "macs" if "macs" in c.match else "params"
        target = c.match[by]
        if isinstance(target, str):
            other = by_name.get(target)
            if other is None or other is c:
                fail(f"{where}.{by}", f"{target!r} is not another contestant; name one of "
                     f"{', '.join(n for n in by_name if n != c.name)}, or give a number")
            if other.match:
                resolve(other)
            target = _cost(study, other, by, shape, fail)
        classes, chans, size = shape
        try:
            m = match_width(c.model, c.arch, float(target), by, size, chans, classes, c.match["tolerance"])
        except SpachError as e:
            m, problem = None, str(e)
        if m is None:
            fail(where, problem)
        c.arch = {**c.arch, "hidden_dim": m.width}
        c.match = {**c.match, "target": float(target), by + "_matched": m.cost, "error": round(m.error, 4)}
        resolving.pop()

    for c in pending:
        resolve(c)


def _cost(study: Any, c: Any, by: str, shape: tuple[int, int, int], fail: Callable[[str, str], Any]) -> int:
    """What contestant `c` costs as the battle builds it (its checkpoint is not loaded: shapes only)."""
    classes, chans, size = shape
    cfg = dataclasses.replace(study.config(c), pretrained="")
    try:
        with torch.device("meta"):
            return model_cost(build_model(cfg, classes, chans, size), by, size or None)
    except SpachError as e:
        problem = str(e)
    fail(f"contestant {c.name!r}", problem)
    return 0

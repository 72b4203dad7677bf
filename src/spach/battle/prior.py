"""What a study expects before it runs: each contestant's mean and run-to-run noise per metric, the
numbers `spach battle --dry-run` predicts decisions from (`spach.battle.predict`).

In a study file (written by `spach battle --dry-run --pilot DIR` from a pilot's study folder, or by hand):

    [prior]
    note = "pilot seeds 100-102 on a 2-core AMD EPYC"   # where the numbers come from
    seeds = 3                                            # how many seeds the means rest on
    image_sd = { top1 = 0.21 }                           # test-set noise of a pair's difference (points)
    top1 = { conv-ms = [91.02, 0.21], attn-ms = [90.11, 0.30] }   # [mean, sd of one run] per contestant
    gap = { ... }                 # generalisation gap (points); fit_loss = { ... } (training loss);
    top1_at_loss = { ... }        # test top-1 at the pair's equal training loss (default: top1)

A pilot folder gives the same numbers measured: per contestant the mean over its seeds and the sd of a run
around the additive contestant + seed fit (moderated toward the arm's pooled noise), and per metric the
test-set term of the pairs the findings compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

METRICS = {"final_top1": "top1", "gap": "gap", "fit_loss": "fit_loss", "top1_at_loss": "top1_at_loss"}
PRIOR_KEYS = {"note", "seeds", "image_sd", *METRICS.values()}


@dataclass
class Prior:
    seeds: int = 3
    note: str = ""
    image_sd: dict[str, float] = field(default_factory=dict)  # per metric key
    tables: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # metric key -> contestant -> (mean, sd)

    def get(self, metric: str, contestant: str) -> tuple[float, float] | None:
        """(mean, sd) of `contestant` on a RunResult metric (top1_at_loss falls back to top1)."""
        key = METRICS.get(metric, metric)
        found = self.tables.get(key, {}).get(contestant)
        if found is None and key == "top1_at_loss":
            found = self.tables.get("top1", {}).get(contestant)
        return found

    def image(self, metric: str) -> float:
        key = METRICS.get(metric, metric)
        return self.image_sd.get(key, self.image_sd.get("top1", 0.0) if key in ("gap", "top1_at_loss") else 0.0)

    def to_toml(self) -> str:
        lines = ["[prior]"]
        if self.note:
            lines.append(f"note = {_quote(self.note)}")
        lines.append(f"seeds = {self.seeds}")
        if self.image_sd:
            lines.append("image_sd = { " + ", ".join(f"{k} = {v:.3g}" for k, v in self.image_sd.items()) + " }")
        for key, table in self.tables.items():
            digits = 4 if key == "fit_loss" else 2
            lines.append(f"{key} = {{ " + ", ".join(f"{c} = [{m:.{digits}f}, {s:.{digits + 1}f}]"
                                                    for c, (m, s) in table.items()) + " }")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_prior(raw: Any, contestants: set[str], fail: Callable[[str, str], None]) -> dict[str, Any]:
    """The [prior] table of a study file, checked (`fail(where, problem)` raises); kept as plain data."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        fail("prior", "must be a table ([prior])")
    for key in raw:
        if key not in PRIOR_KEYS:
            fail(f"prior.{key}", f"unknown key; known: {', '.join(sorted(PRIOR_KEYS))}")
    if "note" in raw and not isinstance(raw["note"], str):
        fail("prior.note", "must be text")
    seeds = raw.get("seeds", 3)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= 10_000:
        fail("prior.seeds", f"must be a whole number of seeds from 1 to 10000, got {seeds!r}")
    image = raw.get("image_sd", {})
    if not isinstance(image, dict) or not all(k in METRICS.values() and _number(v) and v >= 0 for k, v in image.items()):
        fail("prior.image_sd", f"must be a table of metric = sd (>= 0; metrics: {', '.join(METRICS.values())}), got {image!r}")
    for key in METRICS.values():
        table = raw.get(key, {})
        if not isinstance(table, dict):
            fail(f"prior.{key}", "must be a table of contestant = [mean, sd]")
        for name, value in table.items():
            if name not in contestants:
                fail(f"prior.{key}.{name}", "is not a contestant of this study")
            if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value) and value[1] >= 0):
                fail(f"prior.{key}.{name}", f"must be [mean, sd] with sd >= 0, got {value!r}")
    return dict(raw)


def prior_from_table(raw: dict[str, Any]) -> Prior | None:
    """The Prior a study states (None when it states none)."""
    tables = {k: {c: (float(v[0]), float(v[1])) for c, v in raw.get(k, {}).items()} for k in METRICS.values() if raw.get(k)}
    if not tables:
        return None
    return Prior(int(raw.get("seeds", 3)), str(raw.get("note", "")), {k: float(v) for k, v in raw.get("image_sd", {}).items()},
                 tables)


def moderated_sd(residuals: np.ndarray, pooled_var: float, prior_df: float = 4.0) -> float:
    """A contestant's run sd from its residuals around the additive fit, moderated toward the pooled noise."""
    r = residuals[np.isfinite(residuals)]
    df = max(len(r) - 1, 0)
    own = float(r @ r / df) if df else 0.0
    return math.sqrt((prior_df * pooled_var + df * own) / (prior_df + df)) if prior_df + df else math.sqrt(pooled_var)

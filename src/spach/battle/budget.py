"""What a sequential battle may spend, and what it has spent: wall seconds of the whole battle ("15m",
"2h", "1h30m"), GPU hours of training ("300 gpu-h"), or run attempts ("120 runs").

A wall-time budget is a wall: every run carries the battle's deadline (`TrainConfig.deadline`) and
stops there, saving a checkpoint, and no run starts that the time left cannot pay for. The time used is
kept in the study folder (`budget.json`, rewritten every few seconds), so a battle interrupted and
resumed goes on counting from what it had used.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spach.errors import SpachError
from spach.files import atomic_write_text, read_json, warn_once
from spach.humanize import hms

BUDGET_FILE = "budget.json"
REPORT_RESERVE_S = 30.0  # wall seconds kept for the last look and the report at the end of a wall-time budget
MAX_WALL_S = 366 * 24 * 3600.0  # a year: a longer wall budget is a typo
MAX_GPU_H = 1e7
MAX_RUNS = 1_000_000
SAVE_EVERY_S = 5.0
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}
_EXAMPLES = "e.g. \"15m\", \"2h\", \"1h30m\" (wall time), \"300 gpu-h\" or \"120 runs\""


@dataclass(frozen=True)
class Budget:
    kind: str  # "wall", "gpu-h" or "runs"
    amount: float
    text: str

    def show(self, value: float) -> str:
        if self.kind == "wall":
            return hms(max(value, 0.0))
        return f"{value:.1f} GPU-h" if self.kind == "gpu-h" else f"{value:.0f} runs"

    def show_at_least(self, value: float) -> str:
        """`show` rounded up to its last shown digit: a budget of what it says covers `value`."""
        step = 0.1 if self.kind == "gpu-h" else 1.0
        return self.show(math.ceil(value / step - 1e-9) * step)


def parse_budget(text: Any, where: str = "study.budget") -> Budget:
    """'15m', '2h', '1h30m', '90s' (wall time), '300 gpu-h' (GPU hours), '120 runs' (whole runs); a
    SpachError naming `where` for anything else, an amount of zero, or one no battle could mean."""
    s = str(text).strip().lower() if isinstance(text, str) else ""
    m = re.fullmatch(r"(\d{1,12}(?:\.\d{1,6})?)\s*(gpu-?h|gpu-?hours?|runs?)", s)
    if m:
        amount, unit = float(m.group(1)), m.group(2)
        if unit.startswith("run"):
            if amount != int(amount) or not 1 <= amount <= MAX_RUNS:
                raise SpachError(f"{where}: {text!r}: a budget of runs is a whole number from 1 to {MAX_RUNS:,}")
            return Budget("runs", amount, str(text))
        if not 0 < amount <= MAX_GPU_H:
            raise SpachError(f"{where}: {text!r}: GPU hours must lie in (0, {MAX_GPU_H:g}]")
        return Budget("gpu-h", amount, str(text))
    parts = re.findall(r"(\d{1,9}(?:\.\d{1,6})?)\s*(h|min|m|s)", s)
    if parts and re.fullmatch(r"(?:\s*\d{1,9}(?:\.\d{1,6})?\s*(?:h|min|m|s))+", s):
        seconds = sum(float(v) * _UNITS[u] for v, u in parts)
        if 0 < seconds <= MAX_WALL_S:
            return Budget("wall", seconds, str(text))
        if seconds > MAX_WALL_S:
            raise SpachError(f"{where}: {text!r} is more than a year of wall time; give a budget a battle can spend ({_EXAMPLES})")
    raise SpachError(f"{where}: {text!r} is not a budget; {_EXAMPLES}")


@dataclass
class Clock:
    """What a study has used of its budget: wall seconds of its battles (this one since `started`, plus
    the earlier ones' as recorded in `budget.json`), GPU hours of its run attempts, or its run attempts."""

    budget: Budget
    folder: Path | None = None
    started: float = field(default_factory=time.time)
    gpus: int = 1
    before: float = 0.0
    _saved: float = 0.0

    def __post_init__(self) -> None:
        if self.folder is not None:
            path = self.folder / BUDGET_FILE
            rec = read_json(path, warn=False)
            used = rec.get("used_s") if isinstance(rec, dict) else None
            if isinstance(used, (int, float)) and not isinstance(used, bool) and math.isfinite(used) and used >= 0:
                self.before = float(used)
            elif path.exists():
                warn_once(path, f"is not the record of used time the battle writes (used_s {used!r}); the time this "
                                "folder's earlier battles used is not counted: give a smaller --budget to make up for it")

    def wall_used(self) -> float:
        return self.before + time.time() - self.started

    def save(self, force: bool = False) -> None:
        """Record the wall time used (at most every few seconds unless `force`)."""
        now = time.time()
        if self.folder is None or (not force and now - self._saved < SAVE_EVERY_S):
            return
        self._saved = now
        atomic_write_text(self.folder / BUDGET_FILE, f'{{"used_s": {self.wall_used():.1f}, "budget": "{self.budget.kind}"}}\n')

    def used(self, ledger: Any) -> float:
        if self.budget.kind == "wall":
            return self.wall_used()
        attempts = [r for r in ledger.records() if r.get("status") in ("done", "failed") and not r.get("reconciled")]
        if self.budget.kind == "runs":
            return float(len(attempts))
        return sum(_number(r.get("attempt_s")) for r in attempts) * self.gpus / 3600

    def left(self, ledger: Any) -> float:
        reserve = REPORT_RESERVE_S if self.budget.kind == "wall" else 0.0
        return self.budget.amount - self.used(ledger) - reserve

    def deadline(self) -> float:
        """The Unix time at which every run stops (wall budgets; 0: none)."""
        if self.budget.kind != "wall":
            return 0.0
        return time.time() + self.budget.amount - REPORT_RESERVE_S - self.wall_used()


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 else 0.0

"""A sequential battle's waves and looks (`[study] budget`): run a wave, analyse, record the look, and
choose the next wave (`spach.battle.sequential.allocate`) until every finding is decided or nothing
open fits the budget left.

`looks.jsonl` in the study folder holds one line per look: the seeds each contestant had, the budget
used and left, every open comparison with why it did or did not get the next seed, the next wave and,
at the last look, why the battle stopped. The verdicts are a replay of these looks (`findings.judge`),
so `spach report` shows what the battle decided. A killed battle replays the recorded looks, finishes
the recorded next wave and goes on as an uninterrupted one would (with a budget of runs, exactly; a
wall-time budget counts the time up to the last look of each earlier session, not the lost part of a
wave that was cut off).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spach.battle import sequential
from spach.battle.findings import Finding, judge
from spach.battle.plan import Run
from spach.battle.results import Ledger, load_results
from spach.battle.study import Study
from spach.files import append_jsonl, read_jsonl
from spach.humanize import hms

LOOKS_FILE = "looks.jsonl"
REPORT_RESERVE_S = 30.0  # wall seconds kept for the report (plots included) at the end of a wall-time budget


def read_looks(out: Path) -> list[dict[str, Any]]:
    """The recorded looks, in order; a look that is not one (edited, or another program's line) ends the
    list there with a one-line warning: the looks after it cannot be replayed without it."""
    looks = []
    for rec in read_jsonl(Path(out) / LOOKS_FILE):
        if not (_counts(rec.get("seeds")) and _counts(rec.get("next", {}), empty=True)
                and isinstance(rec.get("comparisons", []), list) and isinstance(rec.get("stop", ""), str)):
            print(f"spach: {Path(out) / LOOKS_FILE}: look {len(looks) + 1} is not a look the battle wrote; "
                  f"the looks from it on are ignored (rerun the battle to look again)", file=sys.stderr)
            break
        looks.append(rec)
    return looks


def _counts(value: Any, empty: bool = False) -> bool:
    """A {contestant: seeds} table as looks.jsonl holds it."""
    return (isinstance(value, dict) and (empty or bool(value))
            and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()))


@dataclass
class Clock:
    """What a study has used of its budget: wall seconds since the battle started (plus the earlier
    sessions' up to their last look), GPU hours of its run attempts, or its run attempts."""

    budget: sequential.Budget
    before: float = 0.0  # wall seconds recorded by earlier sessions
    started: float = field(default_factory=time.time)
    gpus: int = 1

    def used(self, ledger: Ledger) -> float:
        if self.budget.kind == "wall":
            return self.before + time.time() - self.started
        attempts = [r for r in ledger.records() if r.get("status") in ("done", "failed") and not r.get("reconciled")]
        if self.budget.kind == "runs":
            return float(len(attempts))
        return sum(r.get("attempt_s") or 0.0 for r in attempts) * self.gpus / 3600

    def left(self, ledger: Ledger) -> float:
        reserve = REPORT_RESERVE_S if self.budget.kind == "wall" else 0.0
        return self.budget.amount - self.used(ledger) - reserve

    def run_cost(self, study: Study, ledger: Ledger) -> dict[str, float]:
        """What one more run of each contestant costs in the budget's unit (its measured runs' mean; a
        contestant with none: the mean of its arm's, else of all)."""
        if self.budget.kind == "runs":
            return {c.name: 1.0 for c in study.contestants}
        times: dict[str, list[float]] = {}
        for r in ledger.records():
            if r.get("status") == "done" and r.get("attempt_s"):
                times.setdefault(r["contestant"], []).append(float(r["attempt_s"]))
        scale = 1.0 if self.budget.kind == "wall" else self.gpus / 3600
        mean = {k: sum(v) / len(v) * scale for k, v in times.items()}
        out = {}
        for c in study.contestants:
            arm = [mean[o.name] for o in study.contestants if o.arm == c.arm and o.name in mean]
            out[c.name] = mean.get(c.name) or (sum(arm) / len(arm) if arm else max(mean.values(), default=math.inf))
        return out


def open_comparisons(findings: list[Finding]) -> list[sequential.Open]:
    return [sequential.Open(f"{f.arm}/{f.key}", c.claim, c.a, c.b, c.decision.seeds_needed, c.decision.plan)
            for f in findings if f.comparisons for c in f.comparisons if c.verdict == "inconclusive" and c.decision]


def run_looks(study: Study, runs: list[Run], out: Path, train: Callable[[list[Run]], None], ledger: Ledger,
              clock: Clock, slots: int, say: Callable[[str], None]) -> None:
    """Run the study in waves until a look stops it; `train(runs)` trains a wave (the launcher)."""
    most, names = len(study.seeds), [c.name for c in study.contestants]
    looks = read_looks(out)
    if looks:
        clock.before = float(looks[-1].get("elapsed_s", 0.0))
        if looks[-1].get("stop") and looks[-1].get("budget") == study.budget:
            say(f"the sequential battle stopped at look {len(looks)}: {looks[-1]['stop']}")
            return
        target = {**looks[-1]["seeds"], **looks[-1].get("next", {})}
    else:
        target = {n: study.first_wave for n in names}
    by_key = {(r.contestant.name, r.seed): r for r in runs}
    failed = {id(r) for r in runs if r.finished and not r.is_done()}  # failed in this battle: retried next time
    while True:
        wave = {id(by_key[(n, s)]) for n in names for s in study.seeds[:target.get(n, 0)]}
        for r in runs:
            r.finished = id(r) not in wave or id(r) in failed or r.is_done()
        pending = [r for r in runs if not r.finished]
        t_wave = time.time()
        if pending:
            say(f"look {len(looks) + 1}: {len(pending)} run(s) to go; budget left "
                f"{clock.budget.show(clock.left(ledger))} of {clock.budget.text}")
            train(pending)
            failed |= {id(r) for r in pending if not r.is_done()}
        t_look = time.time()
        seen = dict(target)
        findings = judge(load_results(out, study), study, looks + [{"seeds": seen}])
        opens = open_comparisons(findings)
        left = clock.left(ledger)
        wave_next, records = sequential.allocate(opens, seen, clock.run_cost(study, ledger), left, most, slots)
        decided = [f for f in findings if f.comparisons and f.decided]
        if not opens:
            stop = "every comparison is decided"
        elif not wave_next:
            stop = ("no open comparison can be decided within the budget left "
                    f"({clock.budget.show(max(left, 0))}) and the study's {most} seeds")
        else:
            stop = ""
        look = {"look": len(looks) + 1, "seeds": seen, "elapsed_s": round(clock.before + time.time() - clock.started, 1),
                "used": round(clock.used(ledger), 3), "left": round(left, 3), "budget": study.budget,
                "findings": {f"{f.arm}/{f.key}": f.verdict for f in findings if f.comparisons},
                "comparisons": records, "next": wave_next, "stop": stop,
                "wave_s": round(t_look - t_wave, 1), "analysis_s": round(time.time() - t_look, 2)}
        append_jsonl(out / LOOKS_FILE, look)
        looks.append(look)
        say(f"look {look['look']}: {len(decided)} of {sum(1 for f in findings if f.comparisons)} findings decided, "
            f"{len(opens)} comparison(s) open; " + (f"stop: {stop}" if stop else
                                                    f"next: {', '.join(f'{n} seed {study.seeds[k - 1]}' for n, k in wave_next.items())}"))
        if stop:
            return
        target = {**seen, **wave_next}


def describe(study: Study) -> str:
    """The plan of looks in one line (the dry run and the report)."""
    budget = sequential.parse_budget(study.budget)
    return (f"sequential: a first wave of {study.first_wave} seed(s) per contestant, then a look after every added "
            f"seed, up to {len(study.seeds)} seeds; budget {budget.text}"
            + (f" (wall time of the whole battle, {hms(REPORT_RESERVE_S)} kept for the report)" if budget.kind == "wall" else ""))

"""A sequential battle's waves and looks (`[study] budget`): run a wave, analyse, record the look, and
choose the next wave (`spach.battle.sequential.allocate`) until every admitted finding is decided, nothing
open fits the budget left, or the budget's wall stopped runs.

`looks.jsonl` in the study folder holds one line per look: the seeds each contestant had finished, the
budget used and left, every open comparison with why it did or did not get the next seed, the next wave
and, at the last look, why the battle stopped. The verdicts are a replay of these looks against the
results in the run folders (`findings.judge`): a look is read as data, and one that is malformed, or that
claims seeds the results do not have, ends the replay there with one warning. A killed battle replays
the recorded looks, finishes the recorded next wave and goes on as an uninterrupted one would, counting
the wall time it had used before (`spach.battle.budget.Clock`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from spach.battle import sequential
from spach.battle.afford import Plan, describe_plan, make_plan, predicted_costs, read_plan, write_plan
from spach.battle.budget import REPORT_RESERVE_S, Clock, parse_budget
from spach.battle.findings import Finding, judge
from spach.battle.plan import Run
from spach.battle.predict import record_prediction
from spach.battle.results import ContestantResult, Ledger, load_results
from spach.battle.spending import DEFAULT as DEFAULT_SPENDING
from spach.battle.study import Study
from spach.files import append_jsonl, read_jsonl
from spach.humanize import hms

LOOKS_FILE = "looks.jsonl"
_NUMBERS = ("used", "left", "elapsed_s")


def read_looks(out: Path, entries: list[ContestantResult] | None = None) -> list[dict[str, Any]]:
    """The recorded looks, in order. A look that is not one the battle wrote (a value of the wrong type,
    edited by hand) or, given the results (`entries`), one that claims more finished seeds of a contestant
    than its run folders hold, ends the list there with a one-line warning: the looks after it cannot be
    replayed without it."""
    path = Path(out) / LOOKS_FILE
    done = None if entries is None else {e.name: _done_prefix(e) for e in entries}
    looks: list[dict[str, Any]] = []
    for rec in read_jsonl(path):
        problem = _malformed(rec, len(looks) + 1)
        if not problem and done is not None:
            over = [f"{n} {k} (it has {done.get(n, 0)})" for n, k in rec["seeds"].items() if k > done.get(n, 0)]
            problem = f"it claims finished seeds the run folders do not hold: {', '.join(over)}" if over else ""
        if problem:
            print(f"spach: {path}: look {len(looks) + 1} is not a look the results back ({problem}); the looks from it "
                  "on are ignored (rerun the battle to look again)", file=sys.stderr, flush=True)
            break
        looks.append(rec)
    return looks


def _malformed(rec: dict[str, Any], number: int) -> str:
    if rec.get("look") != number:
        return f"its number is {rec.get('look')!r}, not {number}"
    if not _counts(rec.get("seeds"), empty=True) or not _counts(rec.get("next", {}), empty=True):
        return "its seeds are not a table of contestant names and seed counts"
    if not isinstance(rec.get("comparisons", []), list) or not all(isinstance(c, dict) for c in rec.get("comparisons", [])):
        return "its comparisons are not a list of records"
    if not isinstance(rec.get("stop", ""), str) or not isinstance(rec.get("budget", ""), str):
        return "its stop or budget is not text"
    bad = [k for k in _NUMBERS if k in rec and not _finite(rec[k])]
    return f"{bad[0]} is {rec[bad[0]]!r}, not a number" if bad else ""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _counts(value: Any, empty: bool = False) -> bool:
    """A {contestant: seeds} table as looks.jsonl holds it."""
    return (isinstance(value, dict) and (empty or bool(value))
            and all(isinstance(k, str) and type(v) is int and 0 <= v <= 10**6 for k, v in value.items()))


def _done_prefix(e: ContestantResult) -> int:
    """How many of a contestant's seeds, from the first of the study's list, have finished runs."""
    n = 0
    for r in e.runs:
        if r.status != "done":
            break
        n += 1
    return n


def open_comparisons(findings: list[Finding], plan: Plan | None) -> list[sequential.Open]:
    return [sequential.Open(f"{f.arm}/{f.key}", c.claim, c.a, c.b, c.decision.seeds_needed, c.decision.plan,
                            plan.n_max(c.a, c.b) if plan is not None else 0)
            for f in findings if f.comparisons for c in f.comparisons if c.verdict == "inconclusive" and c.decision]


def measured_times(ledger: Ledger) -> dict[str, list[float]]:
    """Seconds of every finished run attempt per contestant (what the next run of each will cost)."""
    times: dict[str, list[float]] = {}
    for r in ledger.records():
        if r.get("status") == "done" and r.get("attempt_s"):
            times.setdefault(r["contestant"], []).append(float(r["attempt_s"]))
    return times


def run_costs(study: Study, clock: Clock, ledger: Ledger, plan: Plan) -> dict[str, float]:
    """One more run of each contestant, in the budget's unit (`spach.battle.afford.predicted_costs`)."""
    if clock.budget.kind == "runs":
        return {c.name: 1.0 for c in study.contestants}
    scale = 1.0 if clock.budget.kind == "wall" else clock.gpus / 3600
    measured = {k: [t * scale for t in v] for k, v in measured_times(ledger).items()}
    return predicted_costs(plan, measured)


def run_sequential(study: Study, runs: list[Run], out: Path, train: Callable[[list[Run], Callable[[Run], str]], dict[str, Any]],
                   ledger: Ledger, clock: Clock, costs: dict[str, dict[str, Any]], slots: int,
                   say: Callable[[str], None]) -> None:
    """A sequential battle: its plan (made and recorded before the first run, kept on a resume), the
    budget's deadline on every run, and the looks."""
    plan = read_plan(out)
    if plan is None:
        done = {e.name: _done_prefix(e) for e in load_results(out, study)}
        plan = make_plan(study, clock.budget, costs, slots, done, clock.used(ledger))
        write_plan(out, plan)
        record_prediction(study, plan, out, say)
    say(describe(study, plan))
    say(f"plan (measured on {plan.machine}): first wave {clock.budget.show(plan.first_wave_s)} of the "
        f"{clock.budget.text} budget")
    for line in describe_plan(plan, study):
        say(line)
    deadline = clock.deadline()
    if deadline:
        for r in runs:
            r.config = dataclasses.replace(r.config, deadline=deadline)

    def guard(run: Run) -> str:
        """'' when `run` can finish within what is left of the budget, else why it cannot."""
        cost = run_costs(study, clock, ledger, plan).get(run.contestant.name, math.inf)
        left = deadline - time.time() if deadline else clock.left(ledger)
        clock.save()
        if cost > left:
            return (f"it would take ~{clock.budget.show(cost)} here and {clock.budget.show(max(left, 0))} is left of "
                    "the budget")
        return ""

    try:
        run_looks(study, runs, out, lambda wave: train(wave, guard), ledger, clock, plan, say)
    finally:
        clock.save(force=True)


def run_looks(study: Study, runs: list[Run], out: Path, train: Callable[[list[Run]], dict[str, Any]], ledger: Ledger,
              clock: Clock, plan: Plan, say: Callable[[str], None]) -> None:
    """Run the study in waves until a look stops it. `train(runs)` trains a wave (the launcher) and says
    how it ended: {"walled": runs the budget's wall stopped or kept from starting}."""
    names = [n for n in plan.contestants]
    entries = load_results(out, study)
    looks = read_looks(out, entries)
    if looks:
        if looks[-1].get("stop") and looks[-1].get("budget") == study.budget:
            say(f"the sequential battle stopped at look {len(looks)}: {looks[-1]['stop']}")
            return
        target = {**looks[-1]["seeds"], **looks[-1].get("next", {})}
    else:
        target = {n: study.first_wave for n in names}
    by_key = {(r.contestant.name, r.seed): r for r in runs}
    failed = {id(r) for r in runs if r.finished and not r.is_done()}  # failed in this battle: retried next time
    while True:
        wave = [by_key[(n, s)] for n in names for s in study.seeds[:target.get(n, 0)]]
        wave.sort(key=lambda r: (study.seeds.index(r.seed) >= study.first_wave, names.index(r.contestant.name), r.seed))
        chosen = {id(r) for r in wave}
        for r in runs:
            r.finished = id(r) not in chosen or id(r) in failed or r.is_done()
        pending = [r for r in wave if not r.finished]
        t_wave, walled = time.time(), []
        if pending:
            say(f"wave {len(looks) + 1}: {len(pending)} run(s) to go; budget left "
                f"{clock.budget.show(clock.left(ledger))} of {clock.budget.text}")
            walled = train(pending).get("walled", [])
            failed |= {id(r) for r in pending if not r.is_done()}
        t_look = time.time()
        entries = load_results(out, study)
        seen = {e.name: min(_done_prefix(e), target.get(e.name, 0)) for e in entries if target.get(e.name, 0)}
        findings = judge(entries, study, looks + [{"seeds": seen}], plan)
        opens = open_comparisons(findings, plan)
        left = clock.left(ledger)
        wave_next, records = sequential.allocate(opens, seen, run_costs(study, clock, ledger, plan), left, plan.most,
                                                 plan.sharing)
        stop = _stop_reason(opens, wave_next, records, walled, left, clock) if plan.contestants else \
            "the budget could afford no finding on this machine (the plan names what each would take)"
        decided = [f for f in findings if f.comparisons and f.decided]
        look = {"look": len(looks) + 1, "seeds": seen, "elapsed_s": round(clock.wall_used(), 1),
                "used": round(clock.used(ledger), 3), "left": round(max(left, -1e12), 3), "budget": study.budget,
                "findings": {f"{f.arm}/{f.key}": f.verdict for f in findings if f.comparisons},
                "comparisons": records, "next": {} if stop else wave_next, "stop": stop,
                "wave_s": round(t_look - t_wave, 1), "analysis_s": round(time.time() - t_look, 2)}
        append_jsonl(out / LOOKS_FILE, look)
        clock.save(force=True)
        looks.append(look)
        tested = sum(1 for f in findings if f.comparisons)
        say(f"look {look['look']}: {len(decided)} of {tested} findings decided, {len(opens)} comparison(s) open; "
            + (f"stop: {stop}" if stop else
               f"next: {', '.join(f'{n} seed {study.seeds[k - 1]}' for n, k in wave_next.items())}"))
        if stop:
            return
        target = {**seen, **wave_next}


def _stop_reason(opens: list[sequential.Open], wave_next: dict[str, int], records: list[dict[str, Any]],
                 walled: list[str], left: float, clock: Clock) -> str:
    """Why the battle stops after this look ('' when it goes on), naming what blocked the open comparisons."""
    if not opens:
        return "every comparison is decided"
    if walled:
        return (f"the budget's wall: {len(walled)} run(s) could not finish within the budget "
                f"({', '.join(walled[:4])}{', ...' if len(walled) > 4 else ''})")
    if wave_next:
        return ""
    seeds = sum(r.get("blocked") == "seeds" for r in records)
    money = sum(r.get("blocked") == "budget" for r in records)
    parts = []
    if seeds:
        parts.append(f"{seeds} need more seeds than they can reach (their n_max)")
    if money:
        parts.append(f"{money} would cost more than the budget left ({clock.budget.show(max(left, 0))})")
    return "no open comparison can be decided: " + "; ".join(parts) if parts else "no open comparison can be decided"


def describe(study: Study, plan: Plan | None = None) -> str:
    """The plan of looks in one line (the dry run and the report)."""
    budget = parse_budget(study.budget)
    reach = (f"each comparison up to the seeds the budget can buy it (n_max: {_n_max_range(plan)})" if plan else
             f"up to {len(study.seeds)} seeds")
    return (f"sequential: a first wave of {study.first_wave} seed(s) per contestant, then a look after every added "
            f"seed, {reach}; alpha spent by the {study.spending or DEFAULT_SPENDING} function; budget {budget.text}"
            + (f" (wall time of the whole battle, {hms(REPORT_RESERVE_S)} kept for the report)" if budget.kind == "wall" else ""))


def _n_max_range(plan: Plan) -> str:
    values = sorted({plan.n_max(a, b) for a in plan.contestants for b in plan.contestants if a < b})
    if not values:
        return f"{plan.first_wave}"
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"

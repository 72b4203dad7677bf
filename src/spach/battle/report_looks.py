"""The report's sections on a sequential battle: its plan (what the budget could afford on the machine
it ran on, what it was predicted to decide) and its looks (the seeds each saw, the verdicts the replay
gives, the budget, what it chose next, why it stopped, and what each comparison still open would cost).
Every verdict shown here is the replay's (`findings.judge`), never what a file claims."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spach.battle.afford import Plan
from spach.battle.budget import Budget, parse_budget
from spach.battle.findings import Finding, sequential_method
from spach.battle.looks import describe
from spach.battle.render import Block
from spach.battle.results import PREDICTION_FILE
from spach.battle.study import Study
from spach.files import read_json


def read_prediction(out: Path) -> dict[str, Any] | None:
    """The prediction recorded before the first run (None when there is none, or it is not one)."""
    rec = read_json(Path(out) / PREDICTION_FILE)
    if not isinstance(rec, dict) or not isinstance(rec.get("findings"), dict):
        return None
    ok = all(isinstance(v, dict) and isinstance(v.get("p"), (int, float)) and 0 <= v["p"] <= 1
             for v in rec["findings"].values())
    return rec if ok and isinstance(rec.get("expected_decided"), (int, float)) else None


def plan_blocks(study: Study, plan: Plan | None, findings: list[Finding], prediction: dict[str, Any] | None) -> list[Block]:
    """What the budget could afford, and predicted against decided."""
    if plan is None:
        return []
    show = Budget(plan.kind, plan.amount, plan.budget).show
    blocks: list[Block] = [("h2", "Plan: what the budget could afford"),
                           ("p", f"Made before the first run on {plan.machine} ({plan.made}): each contestant's training "
                                 "and evaluation speed measured there, the findings taken whole in the study's rank order "
                                 f"while their first wave fitted the {plan.budget} budget (the first wave: "
                                 f"{show(plan.first_wave_s)}). A finding that did not fit is not tested, and is named "
                                 "with what it would take; epochs, data and contestants are never changed to fit.")]
    decided = {f"{f.arm}/{f.key}": f for f in findings}
    rows = []
    for fp in plan.findings:
        key = f"{fp.arm}/{fp.key}"
        f = decided.get(key)
        predicted = (prediction or {}).get("findings", {}).get(key)
        rows.append([str(fp.number), fp.key, fp.arm, "yes" if fp.admitted else "no: " + fp.why,
                     show(fp.first_wave_s), "-" if predicted is None else f"{predicted['p']:.0%}",
                     "-" if f is None else ("decided: " + f.verdict if f.decided else f.verdict)])
    blocks.append(("table", (["#", "finding", "arm", "afforded", "its first wave alone", "predicted P(decided)",
                              "outcome"], rows)))
    if prediction:
        got = sum(f.decided for f in findings if f.comparisons)
        blocks.append(("p", f"Predicted before the first run ({prediction.get('sims', 0)} simulated battles on "
                            f"{prediction.get('prior') or 'the study prior'}): {prediction['expected_decided']:.2f} "
                            f"findings decided on average; decided: {got}."))
    return blocks


def looks_blocks(study: Study, looks: list[dict[str, Any]], history: list[dict[str, str]], plan: Plan | None) -> list[Block]:
    """A sequential battle: every look (the seeds it saw, the replay's verdicts, the budget, what it chose
    next), why it stopped, and what each comparison still open would cost."""
    if not study.sequential:
        return []
    blocks: list[Block] = [("h2", "Looks"), ("p", describe(study, plan) + ". " + sequential_method(study) + ".")]
    if not looks:
        return blocks + [("p", "No look yet: the first wave is running.")]
    budget = parse_budget(study.budget)
    rows = []
    for look, verdicts in zip(looks, history):
        seeds = sorted(set(look["seeds"].values()))
        seen = (f"{seeds[0]} each" if len(seeds) == 1 else ", ".join(f"{n}: {k}" for n, k in look["seeds"].items()))
        chosen = ", ".join(f"{n} -> {k}" for n, k in look.get("next", {}).items()) or "-"
        decided = sum(v not in ("inconclusive", "untested", "unafforded") for v in verdicts.values())
        rows.append([str(look["look"]), seen, f"{decided} of {len(verdicts)}",
                     f"{budget.show(_num(look.get('used')))} / {budget.show(_num(look.get('left')))}", chosen,
                     look.get("stop") or ""])
    blocks.append(("table", (["look", "seeds per contestant", "findings decided", "budget used / left (after the report "
                              "reserve)", "next seeds (contestant -> seeds)", "stop"], rows)))
    last = looks[-1]
    blocks.append(("p", f"Stopped: {last['stop']}." if last.get("stop") else
                   "The battle has not stopped yet (interrupted, or still running): rerun it to go on."))
    still = [c for c in last.get("comparisons", []) if isinstance(c, dict)]
    if still:
        blocks.append(("p", "Comparisons open at the last look, and what deciding each would take (the observed "
                            "difference taken as the truth, 80% power; cost in the budget's unit):"))
        blocks.append(("table", (["finding", "comparison", "seeds", "would need", "cost", "why"],
                                 [[str(c.get("finding", "")), str(c.get("comparison", "")), str(c.get("seeds", "")),
                                   str(c.get("need") or "-"), "-" if not isinstance(c.get("cost"), (int, float))
                                   else f"{c['cost']:g}", str(c.get("why", ""))] for c in still])))
    return blocks


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else 0.0

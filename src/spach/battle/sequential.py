"""The sequential battle's decision procedure: looks, alpha spending, and where the next seeds go.

A study with a `budget` runs in looks: a first wave of seeds for every contestant, then, after each
look at the results, one more seed for the contestants of the comparisons that are still open and can
still be decided within what is left, until every finding is decided or nothing open fits.

Validity under repeated looks (Lan & DeMets 1983; Jennison & Turnbull 2000, ch. 7). Each comparison
spends its alpha along its own information fraction t = n / n_max (n: seeds in common; n_max: the most
it can reach, fixed from the budget and the run costs before any result is seen, `spach.battle.afford`)
by the study's spending function (`spach.battle.spending`: O'Brien-Fleming, Pocock or Hwang-Shih-DeCani),
and a test at n has the level released since the comparison's previous test, alpha(t_n) - alpha(t_prev);
the test at n_max spends the rest. Seeds in common grow by at most one between two looks, so each
comparison's levels are fixed numbers per n that sum to alpha. Each level is used as the nominal level of
that look's own Student-t test, not solved for the exact correlated boundary: by the union bound the
false-decision rate over all looks is <= alpha whatever decides which comparison gets the next seed, with
estimated noise and few degrees of freedom, where the exact boundary would need the joint distribution
the adaptive allocation makes unknowable; the price is a little power against the exact boundary. TOST
equivalence spends its own alpha the same way (each one-sided test at the released level). Within a
finding the comparisons are Holm-corrected at every look, recycling the share of a comparison once it is
decided in that family (a sequentially rejective Bonferroni procedure: at the first false decision every
true null is still open, so no look's level exceeds its share of alpha / m0). A decided comparison keeps
its verdict. tests/test_sequential.py calibrates the whole procedure, looks and allocation included, on
simulated studies, for every spending function. A study without a budget has one look at its full seed
list: the fixed design's Holm tests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spach.battle import stats
from spach.battle.spending import Spending


FIXED = Spending(stats.ALPHA, 1, 1)


@dataclass
class Track:
    """One comparison's history over the looks: the seeds it was tested at, and its verdict once decided."""

    tested: list[int] = field(default_factory=list)
    decision: stats.Decision | None = None
    claim: str = ""

    @property
    def decided(self) -> bool:
        return self.decision is not None and self.decision.verdict != "inconclusive"


def step(tracks: list[Track], tests: list[stats.PairTest], claims: list[bool], spending: Spending | Sequence[Spending],
         look: int = 1) -> list[stats.Decision]:
    """One look at one finding: test every open comparison at its level (Holm step-down within each of
    the two families, difference and equivalence, recycling the shares of the comparisons it decides),
    freeze what is decided, and plan the rest. `tracks` carry the history and are updated in place;
    `spending` is one for all comparisons or one per comparison (each its own n_max)."""
    m = len(tests)
    spendings = [spending] * m if isinstance(spending, Spending) else list(spending)
    alpha = spendings[0].alpha if spendings else stats.ALPHA
    fresh = []  # tested at this look: each comparison once per number of seeds, when it grows
    for tr, t in zip(tracks, tests):
        grew = not tr.decided and t.seeds and not math.isnan(t.se) and (not tr.tested or t.seeds > tr.tested[-1])
        if grew:
            tr.tested.append(t.seeds)
        fresh.append(bool(grew))
    share_diff = m - sum(tr.decided and tr.decision.verdict in ("supported", "contradicted") for tr in tracks)
    share_eq = m - sum(tr.decided and tr.decision.verdict == "equivalent" for tr in tracks)
    changed = True
    while changed:
        changed = False
        for tr, t, claim, new, spending in zip(tracks, tests, claims, fresh, spendings):
            if tr.decided or not new:
                continue
            level = spending.level(tr.tested)
            if t.p_tost < level / share_eq:
                verdict, share_eq = "equivalent", share_eq - 1
            elif t.p_diff < level / share_diff:
                verdict, share_diff = ("supported" if (t.diff > 0) == claim else "contradicted"), share_diff - 1
            else:
                continue
            tr.decision = stats.Decision(t, claim, _adjusted(t.p_diff, share_diff + (verdict != "equivalent"), level, alpha),
                                         _adjusted(t.p_tost, share_eq + (verdict == "equivalent"), level, alpha), verdict,
                                         _mdd(t, m), level=level, look=look)
            changed = True
    out = []
    for tr, t, claim, new, spending in zip(tracks, tests, claims, fresh, spendings):
        if tr.decided:
            out.append(tr.decision)
            continue
        level = spending.level(tr.tested) if new else math.nan
        at = (lambda k, tr=tr: spending.level_at(tr.tested, k) / share_diff) if spending.first < spending.most else None
        seeds, plan = stats.seeds_needed(t, share_diff, level_at=at)
        if seeds is not None and seeds > spending.most and spending.first < spending.most:
            seeds, plan = None, f"more seeds than the {spending.most} it can reach: {plan}"
        tr.decision = stats.Decision(t, claim, _adjusted(t.p_diff, share_diff, level, alpha),
                                     _adjusted(t.p_tost, share_eq, level, alpha), "inconclusive", _mdd(t, m), seeds, plan,
                                     level=level / share_diff if level == level else level, look=look)
        out.append(tr.decision)
    return out


def _adjusted(p: float, share: int, level: float, alpha: float) -> float:
    """p on alpha's scale: below alpha exactly when p is below this look's level / share."""
    if math.isnan(p) or math.isnan(level) or level <= 0:
        return math.nan if math.isnan(p) else 1.0
    return min(1.0, p * max(share, 1) * alpha / level)


def _mdd(t: stats.PairTest, m: int) -> float:
    return math.nan if math.isnan(t.se) else stats.detectable(t, m)


def aggregate(decisions: list[stats.Decision]) -> stats.FindingDecision:
    """The finding's verdict: decided when every comparison is; then the common verdict, or `mixed`."""
    if not decisions:
        return stats.FindingDecision("untested", False)
    verdicts = {d.verdict for d in decisions}
    if "inconclusive" in verdicts:
        return stats.FindingDecision("inconclusive", False, decisions)
    return stats.FindingDecision(verdicts.pop() if len(verdicts) == 1 else "mixed", True, decisions)


def decide(tests: list[stats.PairTest], higher_is_claimed: list[bool]) -> stats.FindingDecision:
    """A fixed design's verdicts of one finding (one look, all alpha): Holm-corrected difference and
    equivalence tests, at the tests' alpha; each test keeps its own margin. `equivalent` when TOST
    rejects, else `supported` / `contradicted` when the difference test does, in the claimed /
    opposite direction; else `inconclusive`, with the seeds that would decide it."""
    if not tests:
        return stats.FindingDecision("untested", False)
    if len({t.alpha for t in tests}) > 1:
        raise ValueError("the comparisons of one finding must share alpha")
    spending = Spending(tests[0].alpha, 1, 1)
    return aggregate(step([Track() for _ in tests], list(tests), list(higher_is_claimed), spending))


# --- where the next seeds go ----------------------------------------------------------------------------

@dataclass
class Open:
    """An open comparison as the allocation sees it."""

    finding: str
    claim: str
    a: str
    b: str
    need: int | None  # seeds in common that would decide it (80% power, the observed difference as the truth)
    why: str  # the plan in words
    most: int = 0  # the most seeds it can reach (its n_max; 0: the `most` given to `allocate`)


def allocate(items: list[Open], have: dict[str, int], run_cost: dict[str, float], left: float, most: int,
             slots: int = 1) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The next wave: per contestant, the seeds it should have after it (only those that grow), and
    per open comparison why it was or was not chosen.

    A comparison's cost is what bringing both contestants to its `need` would take (run costs divided by
    the runs that go at once). Findings whose open comparisons are all reachable come first, cheapest
    first (the most decided findings per second), then single comparisons of the other findings,
    cheapest first, each while its cost fits what is left. A chosen comparison moves one seed: its
    contestant(s) with the fewest seeds get the next one."""
    def cost(pairs: list[Open]) -> float:
        target: dict[str, int] = {}
        for o in pairs:
            for c in (o.a, o.b):
                target[c] = max(target.get(c, 0), o.need or 0)
        return sum(max(0, n - have.get(c, 0)) * run_cost.get(c, math.inf) for c, n in target.items()) / max(slots, 1)

    reachable = [o for o in items if o.need is not None and o.need <= (o.most or most)]
    by_finding: dict[str, list[Open]] = {}
    for o in items:
        by_finding.setdefault(o.finding, []).append(o)
    whole = sorted(((cost(v), k) for k, v in by_finding.items() if all(o in reachable for o in v)))
    chosen: dict[str, str] = {}
    spent = 0.0
    for c, key in whole:
        if spent + c <= left:
            spent += c
            for o in by_finding[key]:
                chosen[o.claim] = f"chosen: its finding is the cheapest open one to decide (~{c:.3g} for all of it)"
    for c, o in sorted(((cost([o]), o) for o in reachable if o.claim not in chosen), key=lambda x: (x[0], x[1].claim)):
        if spent + c <= left:
            spent += c
            chosen[o.claim] = f"chosen: a comparison of a finding that cannot be decided whole (~{c:.3g})"
    wave: dict[str, int] = {}
    records = []
    for o in items:
        record = {"finding": o.finding, "comparison": o.claim, "seeds": min(have.get(o.a, 0), have.get(o.b, 0)),
                  "need": o.need, "cost": None if o.need is None else round(cost([o]), 3), "plan": o.why}
        if o.claim in chosen:
            n = min(have.get(o.a, 0), have.get(o.b, 0)) + 1
            for c in (o.a, o.b):
                if have.get(c, 0) < n <= most:
                    wave[c] = max(wave.get(c, 0), n)
            record["why"] = chosen[o.claim]
        elif o.need is None or o.need > (o.most or most):
            record["why"] = (f"out of reach: {o.why}" if o.need is None else
                             f"out of reach: needs {o.need} seeds, it can reach {o.most or most}")
            record["blocked"] = "seeds"
        else:
            record["why"] = f"out of reach: ~{record['cost']:.3g} to decide, more than what is left"
            record["blocked"] = "budget"
        records.append(record)
    return wave, records

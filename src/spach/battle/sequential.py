"""The sequential battle's decision procedure: looks, alpha spending, and where the next seeds go.

A study with a `budget` runs in looks: a first wave of seeds for every contestant, then, after each
look at the results, one more seed for the contestants of the comparisons that are still open and can
still be decided within what is left, until every finding is decided or nothing open fits.

Validity under repeated looks (Lan & DeMets 1983, O'Brien & Fleming 1979; Jennison & Turnbull 2000,
ch. 7). Each comparison spends its alpha along its own information fraction t = n / n_max (n: seeds
in common, n_max: the study's seed list) by the Lan-DeMets O'Brien-Fleming spending function
    alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)),
and a test at n has the level released since the comparison's previous test: alpha(t_n) - alpha(t_prev).
Each level is used as the nominal level of that look's own Student-t test, not solved for the exact
correlated boundary: by the union bound the false-decision rate over all looks is <= alpha whatever
decides which comparison gets the next seed, with estimated noise and few degrees of freedom, where
the exact boundary would need the joint distribution the adaptive allocation makes unknowable. The
price is a little power against the exact boundary; O'Brien-Fleming's shape spends almost nothing at
the first looks, where a t-test on three seeds is least reliable. TOST equivalence spends its own
alpha the same way (each one-sided test at the released level). Within a finding the comparisons are
Holm-corrected at every look, recycling the share of a comparison once it is decided in that family
(a sequentially rejective Bonferroni procedure: at the first false decision every true null is still
open, so no look's level exceeds its share of alpha / m0). A decided comparison keeps its verdict.
tests/test_sequential.py calibrates the whole procedure, looks and allocation included, on simulated
studies. A study without a budget has one look at its full seed list: the fixed design's Holm tests.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from scipy import special

from spach.battle import stats
from spach.errors import SpachError
from spach.humanize import hms


def obf_spent(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming alpha spent by information fraction t (0 at 0, alpha at 1)."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return alpha
    return float(2 * special.ndtr(-special.ndtri(1 - alpha / 2) / math.sqrt(t)))


@dataclass(frozen=True)
class Spending:
    """The alpha a comparison may spend at each number of seeds in common: looks from `first` to `most`
    seeds (a fixed design: first == most, all alpha at its one look)."""

    alpha: float
    first: int
    most: int

    def spent(self, n: int) -> float:
        return obf_spent(min(max(n, self.first), self.most) / self.most, self.alpha) if n > 0 else 0.0

    def level(self, tested: list[int]) -> float:
        """The level of a test at `tested[-1]` seeds, after tests at the earlier entries."""
        return self.spent(tested[-1]) - (self.spent(tested[-2]) if len(tested) > 1 else 0.0)

    def level_at(self, tested: list[int], k: int) -> float:
        """For planning: the level a test at k seeds would have after the tests so far (none at seeds
        already tested: their alpha is spent)."""
        if tested and k <= tested[-1]:
            return 0.0
        return self.spent(k) - (self.spent(tested[-1]) if tested else 0.0)


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


def step(tracks: list[Track], tests: list[stats.PairTest], claims: list[bool], spending: Spending,
         look: int = 1) -> list[stats.Decision]:
    """One look at one finding: test every open comparison at its level (Holm step-down within each of
    the two families, difference and equivalence, recycling the shares of the comparisons it decides),
    freeze what is decided, and plan the rest. `tracks` carry the history and are updated in place."""
    m = len(tests)
    alpha = spending.alpha
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
        for tr, t, claim, new in zip(tracks, tests, claims, fresh):
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
    for tr, t, claim, new in zip(tracks, tests, claims, fresh):
        if tr.decided:
            out.append(tr.decision)
            continue
        level = spending.level(tr.tested) if new else math.nan
        at = (lambda k, tr=tr: spending.level_at(tr.tested, k) / share_diff) if spending.first < spending.most else None
        seeds, plan = stats.seeds_needed(t, share_diff, level_at=at)
        if seeds is not None and seeds > spending.most and spending.first < spending.most:
            seeds, plan = None, f"more seeds than the study's {spending.most}: {plan}"
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


# --- budgets -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """What a study may spend: wall seconds of the whole battle ("15m", "2h", "1h30m"), GPU hours of
    training ("300 gpu-h"), or runs ("120 runs")."""

    kind: str  # "wall", "gpu-h" or "runs"
    amount: float
    text: str

    def show(self, value: float) -> str:
        if self.kind == "wall":
            return hms(max(value, 0.0))
        return f"{value:.1f} GPU-h" if self.kind == "gpu-h" else f"{value:.0f} runs"


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(text: Any, where: str = "study.budget") -> Budget:
    """'15m', '2h', '1h30m', '90s' (wall time), '300 gpu-h' (GPU hours), '120 runs' (runs)."""
    s = str(text).strip().lower() if isinstance(text, str) else ""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gpu-?h|gpu-?hours?|runs?)", s)
    if m:
        amount, unit = float(m.group(1)), m.group(2)
        kind = "runs" if unit.startswith("run") else "gpu-h"
        if amount > 0:
            return Budget(kind, amount, str(text))
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|s)", s)
    if parts and re.fullmatch(r"(?:\s*\d+(?:\.\d+)?\s*(?:h|min|m|s))+", s):
        seconds = sum(float(v) * _UNITS[u] for v, u in parts)
        if seconds > 0:
            return Budget("wall", seconds, str(text))
    raise SpachError(f"{where}: {text!r} is not a budget; e.g. \"15m\", \"2h\", \"1h30m\" (wall time), \"300 gpu-h\" "
                     "or \"120 runs\"")


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

    reachable = [o for o in items if o.need is not None and o.need <= most]
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
        elif o.need is None or o.need > most:
            record["why"] = f"out of reach: {o.why}" if o.need is None else f"out of reach: needs {o.need} seeds, the study has {most}"
        else:
            record["why"] = f"out of reach: ~{record['cost']:.3g} to decide, more than what is left"
        records.append(record)
    return wave, records

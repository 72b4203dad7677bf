"""Judge the paper's five findings (DESIGN.md section 1) on a battle's results.

Each finding is tested by *comparisons*: two contestants that differ in the one thing the finding is
about, compared over seeds with Welch's t-test (two-sided) and its 95% confidence interval for the
difference of means. A comparison *supports* the paper when the difference has the paper's sign and
p < alpha, *contradicts* it when it has the other sign and p < alpha, and is *inconclusive* otherwise
(including when a contestant has fewer than two finished seeds: no variance, no test).

A finding's verdict aggregates its comparisons: supported when enough of them support it and none
contradicts (all of them for claims about "each", a majority otherwise), contradicted when most
contradict and none supports, inconclusive in between. A finding with no comparison is "untested", and
says which contestants the study would need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from scipy import stats

from spach.battle.questions import FINDINGS, NEEDS, QUESTION_KEYS
from spach.battle.results import ContestantResult

ALPHA = 0.05
PURE = ("conv", "attn", "mlp")
COST_MISMATCH = 2.0  # a pair whose MACs differ by more than this factor gets a caveat

@dataclass
class Comparison:
    """One claim "a beats b on metric", tested over seeds."""

    claim: str
    a: str
    b: str
    metric: str  # human name of the metric, with its unit
    a_values: list[float]
    b_values: list[float]
    higher_is_claimed: bool = True  # the claim is a > b (else a < b)
    note: str = ""
    diff: float = math.nan  # mean(a) - mean(b)
    ci: tuple[float, float] = (math.nan, math.nan)  # 95% interval for diff
    p: float = math.nan
    verdict: str = "inconclusive"

    @property
    def mean_a(self) -> float:
        return float(np.mean(self.a_values)) if self.a_values else math.nan

    @property
    def mean_b(self) -> float:
        return float(np.mean(self.b_values)) if self.b_values else math.nan


@dataclass
class Finding:
    number: int
    key: str
    title: str
    verdict: str  # supported / contradicted / inconclusive / untested
    summary: str
    comparisons: list[Comparison] = field(default_factory=list)
    not_tested: list[str] = field(default_factory=list)  # parts of the finding the design cannot test


def welch(a: list[float], b: list[float]) -> tuple[float, tuple[float, float], float]:
    """Difference of means, its 95% Welch interval and the two-sided p-value (NaN without variance)."""
    diff = float(np.mean(a) - np.mean(b)) if a and b else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, (math.nan, math.nan), math.nan
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, (math.nan, math.nan), math.nan
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return diff, (diff - half, diff + half), p


def run_test(c: Comparison, alpha: float = ALPHA) -> Comparison:
    c.diff, c.ci, c.p = welch(c.a_values, c.b_values)
    claimed = c.diff > 0 if c.higher_is_claimed else c.diff < 0
    if math.isnan(c.p) or c.p >= alpha:
        c.verdict = "inconclusive"
    else:
        c.verdict = "supported" if claimed else "contradicted"
    if len(c.a_values) < 2 or len(c.b_values) < 2:
        c.note = _join(c.note, "fewer than 2 finished seeds: no test")
    return c


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _cost_ratio(a: ContestantResult, b: ContestantResult) -> float:
    if not a.macs or not b.macs:
        return 1.0
    return max(a.macs, b.macs) / min(a.macs, b.macs)


def _cost_note(a: ContestantResult, b: ContestantResult) -> str:
    r = _cost_ratio(a, b)
    return f"MACs differ x{r:.1f}" if r > COST_MISMATCH else ""


def _closest(ref: ContestantResult, candidates: Iterable[ContestantResult]) -> ContestantResult | None:
    return min(candidates, key=lambda c: _cost_ratio(ref, c), default=None)


def _pairs(entries: list[ContestantResult], first: Callable[[ContestantResult], bool],
           second: Callable[[ContestantResult, ContestantResult], bool]) -> list[tuple[ContestantResult, ContestantResult]]:
    """Each contestant passing `first`, paired with the closest-cost contestant passing `second`."""
    out = []
    for a in entries:
        if first(a):
            b = _closest(a, (e for e in entries if e is not a and second(a, e)))
            if b is not None:
                out.append((a, b))
    return out


def _compare(claim: str, a: ContestantResult, b: ContestantResult, metric: str, label: str,
             higher: bool = True, note: str = "") -> Comparison:
    return Comparison(claim, a.name, b.name, label, a.values(metric), b.values(metric), higher,
                      _join(note, _cost_note(a, b)))


def _same_kind(a: ContestantResult, b: ContestantResult) -> bool:
    return a.cpe == b.cpe and a.shared == b.shared


def _multi_vs_single(entries: list[ContestantResult]) -> tuple[list[Comparison], list[str]]:
    pairs = _pairs(entries, lambda e: e.layout == "multi" and e.family != "outside",
                   lambda a, e: e.layout == "single" and e.family == a.family and _same_kind(a, e))
    comps = [_compare(f"{m.name} > {s.name}", m, s, "final_top1", "top-1 %") for m, s in pairs]
    return comps, []


def _local_modeling(entries: list[ContestantResult]) -> tuple[list[Comparison], list[str]]:
    pairs = _pairs(entries, lambda e: e.cpe and e.family in ("attn", "mlp", "hybrid"),
                   lambda a, e: not e.cpe and e.arch_key == a.arch_key and e.family == a.family)
    comps = [_compare(f"{a.name} (CPE) > {b.name} (no CPE)", a, b, "final_top1", "top-1 %") for a, b in pairs]
    missing = [] if any(a.family == "attn" for a, _ in pairs) and any(a.family == "mlp" for a, _ in pairs) else [
        "both attention and MLP ablations (the paper tests both): add the missing family with cpe = false"]
    return (comps, missing) if comps else ([], [])


def _mlp_overfit(entries: list[ContestantResult]) -> tuple[list[Comparison], list[str]]:
    gap = "generalisation gap (train-subset top-1 minus test top-1, points)"
    has_gap = [e for e in entries if e.values("gap")]
    mlp = [e for e in has_gap if e.family == "mlp"]
    comps = [_compare(f"gap {a.name} > gap {b.name}", a, b, "gap", gap)
             for fam in ("conv", "attn")
             for a, b in _pairs(has_gap, lambda e: e.family == "mlp",
                                lambda a, e: e.family == fam and e.layout == a.layout and _same_kind(a, e))]
    missing = []
    growth = [(big, small) for big in mlp for small in mlp
              if big.layout == small.layout and _same_kind(big, small) and big.params > 1.5 * small.params]
    comps += [_compare(f"gap {b.name} > gap {s.name} (larger MLP)", b, s, "gap", gap) for b, s in growth]
    if not growth:
        missing.append("over-fitting as MLP grows: two mlp contestants of one layout, one >1.5x the params")
    stages = _pairs(mlp, lambda e: e.layout == "single", lambda a, e: e.layout == "multi" and _same_kind(a, e))
    comps += [_compare(f"gap {s.name} > gap {m.name} (multi-stage relieves)", s, m, "gap", gap) for s, m in stages]
    if not stages:
        missing.append("relief by multi-stage: a single- and a multi-stage mlp contestant")
    sharing = [(a, b) for a in mlp for b in mlp
               if not a.shared and b.shared and a.layout == b.layout and a.arch_key == b.arch_key]
    comps += [_compare(f"gap {a.name} > gap {b.name} (sharing relieves)", a, b, "gap", gap) for a, b in sharing]
    if not sharing:
        missing.append("relief by weight sharing: an mlp contestant and its twin with shared_spatial_func = true")
    return comps, missing


def accuracy_at_loss(curve: list[tuple[float, float]], level: float) -> float:
    """Test top-1 where the training loss first falls to `level`, linearly interpolated between epochs."""
    for (l0, a0), (l1, a1) in zip(curve, curve[1:]):
        if l0 >= level >= l1:
            return a0 if l0 == l1 else a0 + (a1 - a0) * (l0 - level) / (l0 - l1)
    return next((a for l, a in curve if l == level), math.nan)


def _equal_loss(conv: ContestantResult, attn: ContestantResult) -> Comparison | None:
    """conv vs attn on test top-1 at the lowest training loss that every run of both reaches."""
    curves = {id(r): r.curve() for r in conv.done + attn.done}
    if not all(curves.values()) or not curves:
        return None
    level = max(min(l for l, _ in c) for c in curves.values())
    overlap = level <= min(max(l for l, _ in c) for c in curves.values())

    def at(e: ContestantResult) -> list[float]:
        vals = [accuracy_at_loss(curves[id(r)], level) for r in e.done] if overlap else []
        return [v for v in vals if not math.isnan(v)]

    note = _join("" if overlap else "their training-loss ranges do not overlap", _cost_note(conv, attn))
    return Comparison(f"{conv.name} > {attn.name} at equal training loss", conv.name, attn.name,
                      f"test top-1 % at training loss {level:.3f}", at(conv), at(attn), True, note)


def _conv_vs_attn(entries: list[ContestantResult]) -> tuple[list[Comparison], list[str]]:
    comps = []
    for conv, attn in _pairs(entries, lambda e: e.family == "conv",
                             lambda a, e: e.family == "attn" and e.layout == a.layout and _same_kind(a, e)):
        equal = _equal_loss(conv, attn)
        comps += [equal] if equal else []
        comps.append(_compare(f"{attn.name} fits lower than {conv.name}", attn, conv, "fit_loss",
                              "final training loss", higher=False))
    missing = ["attention winning at larger sizes: conv and attn contestants at two sizes"] if comps else []
    return comps, missing


def _hybrid(entries: list[ContestantResult]) -> tuple[list[Comparison], list[str]]:
    comps, missing = [], []
    for h in (e for e in entries if e.family == "hybrid"):
        for fam in PURE:
            rival = _closest(h, (e for e in entries if e.family == fam and e.layout == h.layout and _same_kind(h, e)))
            if rival is None:
                missing.append(f"a {fam} contestant with the layout of {h.name}")
            else:
                comps.append(_compare(f"{h.name} > {rival.name}", h, rival, "final_top1", "top-1 %"))
    return comps, missing


TESTS = {1: (_multi_vs_single, False), 2: (_local_modeling, True), 3: (_mlp_overfit, False),
         4: (_conv_vs_attn, True), 5: (_hybrid, True)}  # number -> (comparisons, needs all to support)


def aggregate(comps: list[Comparison], need_all: bool) -> str:
    if not comps:
        return "untested"
    n, sup = len(comps), sum(c.verdict == "supported" for c in comps)
    con = sum(c.verdict == "contradicted" for c in comps)
    if con == 0 and sup >= (n if need_all else math.ceil(n / 2)):
        return "supported"
    if sup == 0 and con >= math.ceil(n / 2):
        return "contradicted"
    return "inconclusive"


def _summary(verdict: str, comps: list[Comparison], number: int, alpha: float) -> str:
    if verdict == "untested":
        return f"Not testable with these contestants; needs {NEEDS[number]}."
    counts = {v: sum(c.verdict == v for c in comps) for v in ("supported", "contradicted", "inconclusive")}
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    return f"{len(comps)} comparison{'s' * (len(comps) > 1)}: " + ", ".join(parts) + f" (Welch's t-test, alpha {alpha})."


def judge(entries: list[ContestantResult], questions: list[str] | None = None,
          alpha: float = ALPHA) -> list[Finding]:
    """The findings asked for (`questions`: keys of `FINDINGS`, default all), judged on `entries`."""
    wanted = [QUESTION_KEYS[q] for q in questions] if questions else list(FINDINGS)
    out = []
    for number in sorted(wanted):
        key, title = FINDINGS[number]
        test, need_all = TESTS[number]
        comps, missing = test(entries)
        comps = [run_test(c, alpha) for c in comps]
        verdict = aggregate(comps, need_all)
        out.append(Finding(number, key, title, verdict, _summary(verdict, comps, number, alpha), comps, missing))
    return out

"""Judge the paper's findings on a battle's results.

Each finding is tested by comparisons (`spach.battle.pairs`: two contestants of one arm that differ in
the one thing the finding is about) and judged with `spach.battle.stats`:
- paired by seed: every contestant of a seed saw the same data in the same order with the same
  augmentation draws (common random numbers), so seed effects cancel in a pair's differences;
- each pair's own seed noise is moderated toward the noise pooled over the arm's contestants (a two-way
  contestant x seed fit; top-1 at equal training loss: every contestant of the arm is scored at the
  pair's loss level), which gives 3-seed studies power without trusting that every pair is equally noisy;
- the test set's own noise comes from the per-image predictions every run stores (the test images are
  the same for every seed, so seed-to-seed spread cannot see it);
- the comparisons of one finding are Holm-corrected together; a comparison is `equivalent` when its
  whole interval lies within the study's margin (TOST), `supported` / `contradicted` when it differs
  in the paper's / the other direction, `inconclusive` otherwise, with the difference it could have
  detected and the seeds that would decide it.
A finding is decided when every comparison is; its verdict is then the common one, or `mixed`.
A sequential battle is judged look by look (`spach.battle.sequential`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spach.battle import sequential, stats
from spach.battle.pairs import TESTS, Pair, accuracy_at_level, equal_loss_level
from spach.battle.questions import FINDINGS, NEEDS, QUESTION_KEYS
from spach.battle.results import ContestantResult, RunResult
from spach.battle.spending import DEFAULT as DEFAULT_SPENDING
from spach.battle.study import MAIN, Study

def method(study: Study) -> str:
    """How every comparison is tested, with this study's moderation."""
    return ("paired by seed (common random numbers: each seed's contestants see the same data, order and "
            "augmentation); each pair's own seed noise moderated toward the noise pooled over its arm's contestants "
            f"(empirical Bayes, the pooled noise worth {study.prior_df:g} degrees of freedom: Smyth 2004) plus the test "
            "set's noise from per-image predictions (seeds x images crossed), the difference judged against the seed "
            "noise's chi-squared spread plus the test-set noise (a generalized p-value; Student t without test-set "
            "noise); equivalence by TOST within the study's margin; Holm's correction within each finding")


SPENDING_NAMES = {"obf": "O'Brien-Fleming", "pocock": "Pocock"}


def sequential_method(study: Study) -> str:
    """How a sequential battle looked and spent its alpha, with this study's spending function."""
    name = study.spending or DEFAULT_SPENDING
    shape = SPENDING_NAMES.get(name, f"Hwang-Shih-DeCani {name[3:]}" if name.startswith("hsd") else name)
    return ("Looks: the battle analysed after its first wave and after every added seed, and gave the next seeds only "
            "to contestants of open comparisons it could still decide within the budget, cheapest finding first. Each "
            "comparison spends alpha along its seeds in common, t = n / n_max, where n_max, the most seeds the budget "
            "could buy it at the run costs measured before the first run, was fixed before any result was seen; the "
            f"Lan-DeMets {shape} spending function (Lan & DeMets 1983) releases alpha look by look and the look at n_max "
            "spends the rest, each look's released alpha the nominal level of that look's t-test (a union bound over "
            "the looks: valid whatever the allocation, with estimated noise and few degrees of freedom, at some cost in "
            "power against the exact group-sequential boundary); a decided comparison keeps its verdict")


@dataclass
class Comparison:
    """One claim "a beats b" on a metric, with its per-seed values and, once judged, its test and verdict."""

    claim: str
    a: str
    b: str
    metric: str  # human name, with its unit
    a_values: list[float]  # per seed, NaN for a missing run
    b_values: list[float]
    higher_is_claimed: bool = True
    margin: float = 0.0
    note: str = ""
    decision: stats.Decision | None = None

    @property
    def verdict(self) -> str:
        return self.decision.verdict if self.decision else "inconclusive"

    @property
    def test(self) -> stats.PairTest | None:
        return self.decision.test if self.decision else None

    @property
    def diff(self) -> float:
        return self.test.diff if self.test else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return self.test.ci95 if self.test else (math.nan, math.nan)

    @property
    def p(self) -> float:
        """Holm-adjusted p of the difference test."""
        return self.decision.p_diff_holm if self.decision else math.nan

    @property
    def mean_a(self) -> float:
        return _nanmean(self.a_values)

    @property
    def mean_b(self) -> float:
        return _nanmean(self.b_values)


@dataclass
class Finding:
    number: int
    key: str
    title: str
    verdict: str  # supported / contradicted / equivalent / mixed / inconclusive / untested / elsewhere / unafforded
    summary: str
    comparisons: list[Comparison] = field(default_factory=list)
    not_tested: list[str] = field(default_factory=list)  # parts of the finding the design cannot test
    arm: str = MAIN
    decided: bool = False


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _per_seed(e: ContestantResult, metric: str) -> list[float]:
    return [float(getattr(r, metric)) if r.status == "done" else math.nan for r in e.runs]


def _correct(e: ContestantResult) -> list[np.ndarray | None]:
    return [r.correct() for r in e.runs]


class _Arm:
    """One arm's contestants and their per-seed tables per metric (computed once, on demand): the
    pooled noise every pair of the arm is moderated toward."""

    def __init__(self, entries: list[ContestantResult]):
        self.entries = entries
        self._tables: dict[str, list[list[float]]] = {}

    def table(self, metric: str) -> list[list[float]]:
        if metric not in self._tables:
            self._tables[metric] = [_per_seed(e, metric) for e in self.entries]
        return self._tables[metric]


def _comparison(p: Pair, arm: _Arm, margin: float, alpha: float, prior_df: float) -> tuple[Comparison, stats.PairTest]:
    margin = margin if p.equivalence else 0.0
    if p.metric == "top1_at_loss":
        # every contestant of the arm scored at the pair's level for the pooled noise; the test-set term
        # comes from the final epoch's predictions (the same images)
        level, where = equal_loss_level(p.a, p.b)
        table = [accuracy_at_level(e, level) for e in arm.entries]
        a, b = accuracy_at_level(p.a, level), accuracy_at_level(p.b, level)
        correct_a, correct_b = _correct(p.a), _correct(p.b)
        note = "; ".join(x for x in (where, p.note, "test-set term from the final predictions") if x)
    else:
        a, b = _per_seed(p.a, p.metric), _per_seed(p.b, p.metric)
        table = arm.table(p.metric)
        with_images = p.metric in ("final_top1", "gap")  # the test-set part of both is the same images
        correct_a, correct_b = (_correct(p.a), _correct(p.b)) if with_images else (None, None)
        note = p.note
    test = stats.pair_test(table, a, b, correct_a, correct_b, margin=margin, alpha=alpha, prior_df=prior_df)
    return Comparison(p.claim, p.a.name, p.b.name, p.label, a, b, p.higher_is_claimed, margin, note), test


def _summary(f: Finding, alpha: float) -> str:
    if f.verdict == "untested":
        return f"Not testable with these contestants; needs {NEEDS[f.number]}."
    counts: dict[str, list[str]] = {}
    for c in f.comparisons:
        counts.setdefault(c.verdict, []).append(c.claim)
    parts = [f"{len(v)} {k}" for k, v in counts.items()]
    text = (f"{len(f.comparisons)} comparison{'s' * (len(f.comparisons) > 1)}: " + ", ".join(parts)
            + f" (Holm-corrected together, alpha {alpha}).")
    if f.verdict == "mixed":
        text += " " + "; ".join(f"{k}: {', '.join(v)}" for k, v in counts.items()) + "."
    return text


def judge(entries: list[ContestantResult], study: Study, looks: list[dict] | None = None, plan: Any = None,
          history: list[dict[str, str]] | None = None) -> list[Finding]:
    """The study's questions, each judged on its arm; a question named in `tested_elsewhere` is listed
    with the preset that tests it, one the budget could not afford (`plan`, `spach.battle.afford`) with why.

    A sequential battle's verdicts come from replaying its `looks` (`looks.jsonl`: the seeds each
    contestant had at each look): every look judges the runs it saw, at the levels the spending
    releases (each comparison along its own n_max, from `plan`), and a comparison decided at a look keeps
    its verdict. Without looks (a fixed design, or a report while the first wave runs) there is one look
    at every finished run. `history`, when given, receives each look's verdict per finding ("arm/key")."""
    tracks: dict[tuple[str, str], list[sequential.Track]] = {}
    views = [look.get("seeds") for look in looks] if looks else [None]
    out: list[Finding] = []
    for number, view in enumerate(views, 1):
        out = _judge_look(_as_seen(entries, view), study, plan, tracks, number)
        if history is not None:
            history.append({f"{f.arm}/{f.key}": f.verdict for f in out if f.comparisons})
    for key, preset in study.tested_elsewhere.items():
        number = QUESTION_KEYS[key]
        out.append(Finding(number, key, FINDINGS[number][1], "elsewhere",
                           f"Tested in the {preset} preset: see docs/battles/{preset}/report.md in the spach repository "
                           f"(`spach battle --preset {preset}`); this study cannot afford the contestants it needs."))
    return sorted(out, key=lambda f: f.number)


def _as_seen(entries: list[ContestantResult], view: dict[str, int] | None) -> list[ContestantResult]:
    """The results as a look saw them: each contestant's first `view[name]` seeds (runs beyond are pending)."""
    if view is None:
        return entries
    return [dataclasses.replace(e, runs=[r if i < view.get(e.name, 0) else RunResult(e.name, r.seed, "pending")
                                         for i, r in enumerate(e.runs)]) for e in entries]


def _judge_look(entries: list[ContestantResult], study: Study, plan: Any,
                tracks: dict[tuple[str, str], list[sequential.Track]], look: int) -> list[Finding]:
    out = []
    skipped = {(f.arm, f.key): f.why for f in plan.findings if not f.admitted} if plan is not None else {}
    for arm_name in study.arm_names():
        arm = _Arm([e for e in entries if e.arm == arm_name])
        for key in study.questions_of(arm_name):
            number = QUESTION_KEYS[key]
            if (arm_name, key) in skipped:
                out.append(Finding(number, key, FINDINGS[number][1], "unafforded",
                                   f"Not tested: the budget could not afford it on this machine: {skipped[arm_name, key]}.",
                                   arm=arm_name))
                continue
            pairs, missing = TESTS[number](arm.entries)
            judged = [_comparison(p, arm, study.margin, study.alpha, study.prior_df) for p in pairs]
            comps = [c for c, _ in judged]
            track = tracks.setdefault((arm_name, key), [])
            if [c.claim for c in comps] != [getattr(t, "claim", None) for t in track]:
                track[:] = [sequential.Track(claim=c.claim) for c in comps]  # the pairs are fixed by the contestants' facts
            spendings = [study.spending_of(plan.n_max(c.a, c.b) if plan is not None else None) for c in comps]
            decision = sequential.aggregate(sequential.step(track, [t for _, t in judged],
                                                            [c.higher_is_claimed for c in comps], spendings, look))
            for c, d in zip(comps, decision.comparisons):
                c.decision = d
            f = Finding(number, key, FINDINGS[number][1], decision.verdict, "", comps, missing, arm_name,
                        decision.decided)
            f.summary = _summary(f, study.alpha)
            out.append(f)
    return out

"""Predicted decisions: how likely each finding is to be decided within the budget on this machine,
by simulating the whole sequential procedure (first wave, looks, Holm, spending, allocation, the
budget) many times on effects and noise from a prior (`spach.battle.prior`: a pilot folder, or the
study's [prior] table).

One simulated study, per comparison a - b of an admitted finding:
- the true difference is drawn around the prior's (mean_a - mean_b, with the uncertainty of a mean over
  the prior's seeds), so a prior from a few pilot seeds is not taken as the truth;
- each seed's paired difference is that plus noise of variance sd_a^2 + sd_b^2 (the seed effect cancels);
- each look tests it as the battle does: its own paired noise moderated toward the arm's pooled noise
  (drawn with the pooled estimate's degrees of freedom), the test-set term of the prior's image_sd,
  Holm within the finding, the study's spending along the comparison's n_max (from the plan);
- the next wave is `sequential.allocate`'s, paid at the plan's run costs, until nothing open fits.
Comparisons are simulated independently (their shared contestants' correlation is left out), and the
run costs are the plan's: the prediction is of the design, on this machine's measured speed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spach.battle import sequential, stats
from spach.battle.afford import Plan
from spach.battle.budget import REPORT_RESERVE_S
from spach.battle.pairs import TESTS, accuracy_at_level, equal_loss_level
from spach.battle.prior import METRICS, Prior, moderated_sd, prior_from_table
from spach.battle.questions import QUESTION_KEYS
from spach.battle.results import (
    PREDICTION_FILE,
    ContestantResult,
    contestant_entries,
    load_costs,
    load_results,
    load_study_folder,
)
from spach.battle.study import Study
from spach.files import atomic_write_text
from spach.humanize import hms

SIMS = 200
IMAGES = 10_000  # the test-set size a prior's image_sd refers to when the study's is unknown


@dataclass
class Sim:
    """One comparison as the simulation sees it."""

    finding: str  # arm/key
    claim: str
    a: str
    b: str
    diff: float  # the prior's expected a - b
    var: float  # variance of one run (the pair's: (sd_a^2 + sd_b^2) / 2)
    pooled: float  # the arm's pooled run variance
    arm_size: int  # contestants of the arm (the pooled estimate's degrees of freedom)
    image: float  # the test-set term sigma_image^2 / N
    images: int
    margin: float
    claim_higher: bool
    most: int  # n_max


def comparisons(study: Study, plan: Plan, prior: Prior, entries: list[ContestantResult]) -> tuple[list[Sim], list[str]]:
    """The admitted findings' comparisons with the prior's numbers; and the findings the prior cannot
    predict (a contestant it says nothing about)."""
    sims, missing = [], []
    admitted = {(f.arm, f.key) for f in plan.findings if f.admitted}
    for arm in study.arm_names():
        members = [e for e in entries if e.arm == arm]
        sizes = [e.name for e in members]
        for key in study.questions_of(arm):
            if (arm, key) not in admitted:
                continue
            pairs, _ = TESTS[QUESTION_KEYS[key]](members)
            found = []
            for p in pairs:
                a, b = prior.get(p.metric, p.a.name), prior.get(p.metric, p.b.name)
                if a is None or b is None:
                    break
                arm_sds = [s for n in sizes if (s := prior.get(p.metric, n)) is not None]
                pooled = float(np.mean([sd ** 2 for _, sd in arm_sds]))
                image_sd = prior.image(p.metric)
                found.append(Sim(f"{arm}/{key}", p.claim, p.a.name, p.b.name, a[0] - b[0], (a[1] ** 2 + b[1] ** 2) / 2,
                                 pooled, len(arm_sds), image_sd ** 2, IMAGES if image_sd else 0,
                                 study.margin if p.equivalence else 0.0, p.higher_is_claimed, plan.n_max(p.a.name, p.b.name)))
            if len(found) == len(pairs) and pairs:
                sims += found
            else:
                missing.append(f"{arm}/{key}")
    return sims, missing


def _test(c: Sim, x: np.ndarray, n: int, rng: np.random.Generator, alpha: float, prior_df: float) -> stats.PairTest:
    seeds = x[:n]
    own = stats.SeedNoise(float(np.var(seeds, ddof=1)) / 2 if n > 1 else math.nan, n - 1, 2)
    df = max(c.arm_size - 1, 1) * (n - 1)
    pooled = stats.SeedNoise(c.pooled * rng.chisquare(df) / df if df else math.nan, df, c.arm_size)
    noise = stats.moderated(own, pooled, prior_df)
    return stats.compare(seeds, np.zeros(n), noise, margin=c.margin, alpha=alpha, image=(c.image, c.images))


def simulate_once(study: Study, plan: Plan, sims: list[Sim], prior: Prior, rng: np.random.Generator) -> tuple[dict[str, str], float]:
    """One simulated battle: each finding's verdict ('inconclusive' when undecided) and the budget used."""
    truth = [rng.normal(c.diff, math.sqrt(2 * c.var / prior.seeds)) for c in sims]
    data = [rng.normal(d, math.sqrt(2 * c.var), plan.most) for c, d in zip(sims, truth)]
    have = {n: plan.first_wave for n in plan.contestants}
    used = plan.first_wave_s
    room = plan.amount - (REPORT_RESERVE_S if plan.kind == "wall" else 0.0)
    findings = list(dict.fromkeys(c.finding for c in sims))
    tracks = {i: sequential.Track(claim=c.claim) for i, c in enumerate(sims)}
    verdicts: dict[str, str] = {}
    look = 0
    while True:
        look += 1
        opens = []
        for f in findings:
            idx = [i for i, c in enumerate(sims) if c.finding == f]
            tests = [_test(sims[i], data[i], min(have[sims[i].a], have[sims[i].b]), rng, study.alpha, study.prior_df)
                     for i in idx]
            spend = [study.spending_of(sims[i].most) for i in idx]
            decisions = sequential.step([tracks[i] for i in idx], tests, [sims[i].claim_higher for i in idx], spend, look)
            verdicts[f] = sequential.aggregate(decisions).verdict
            opens += [sequential.Open(f, sims[i].claim, sims[i].a, sims[i].b, d.seeds_needed, d.plan, sims[i].most)
                      for i, d in zip(idx, decisions) if d.verdict == "inconclusive"]
        if not opens:
            break
        wave, _ = sequential.allocate(opens, have, plan.run_s, room - used, plan.most, plan.sharing)
        if not wave:
            break
        used += sum((n - have[c]) * plan.run_s[c] for c, n in wave.items()) / plan.sharing
        have.update(wave)
    return verdicts, used


@dataclass
class Prediction:
    findings: dict[str, dict[str, Any]]  # arm/key -> {"p": P(decided), "verdicts": {verdict: share}}
    expected: float  # decided findings, expected
    used: float  # mean budget used, in its unit
    sims: int
    missing: list[str]
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"made": time.strftime("%Y-%m-%d %H:%M"), "prior": self.note, "sims": self.sims, "expected_decided":
                round(self.expected, 3), "mean_used": round(self.used, 1), "not_predicted": self.missing,
                "findings": self.findings}


def predict(study: Study, plan: Plan, prior: Prior, entries: list[ContestantResult], sims: int = SIMS,
            seed: int = 0) -> Prediction:
    """Simulate the battle `sims` times (reproducibly: `seed`) and count what it decides."""
    comps, missing = comparisons(study, plan, prior, entries)
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    total_used, decided = 0.0, 0
    for _ in range(sims if comps else 0):
        verdicts, used = simulate_once(study, plan, comps, prior, rng)
        total_used += used
        for f, v in verdicts.items():
            counts.setdefault(f, {})
            counts[f][v] = counts[f].get(v, 0) + 1
            decided += v != "inconclusive"
    n = max(sims, 1) if comps else 1
    findings = {f: {"p": round(sum(k for v, k in c.items() if v != "inconclusive") / n, 3),
                    "verdicts": {v: round(k / n, 3) for v, k in sorted(c.items())}} for f, c in counts.items()}
    return Prediction(findings, decided / n, total_used / n, sims if comps else 0, missing, prior.note)


def study_prior(study: Study) -> Prior | None:
    return prior_from_table(study.prior) if study.prior else None


def record_prediction(study: Study, plan: Plan, out: Path, say: Callable[[str], None]) -> Prediction | None:
    """Predict from the study's [prior] and record it in the study folder, before the first run."""
    prior = study_prior(study)
    if prior is None:
        return None
    t0 = time.time()
    result = predict(study, plan, prior, contestant_entries(study, load_costs(out)))
    atomic_write_text(out / PREDICTION_FILE, json.dumps(result.to_json(), indent=1) + "\n")
    say(f"predicted from the study's prior ({result.sims} simulated battles, {time.time() - t0:.1f} s): "
        + summary(result, plan))
    return result


def summary(result: Prediction, plan: Plan) -> str:
    missing = f"; not predicted (the prior lacks a contestant): {', '.join(result.missing)}" if result.missing else ""
    if not result.sims:
        return "no finding decided: " + ("none the budget affords has a prior" if result.missing
                                         else "the budget affords no finding's first wave") + missing
    parts = [f"{f} {v['p']:.0%}" for f, v in result.findings.items()]
    used = hms(result.used) if plan.kind == "wall" else f"{result.used:.1f} {plan.kind}"
    return (f"{result.expected:.2f} findings decided on average ({', '.join(parts)}); budget used {used} on average"
            + missing)


# --- a prior from a pilot's study folder ----------------------------------------------------------------
def prior_from_folder(folder: Path, study: Study) -> Prior:
    """Per contestant of `study` that the pilot folder also ran (by name): mean and run sd per metric, and
    the test-set noise of the pairs the study's findings compare."""
    pilot = load_study_folder(folder)
    entries = [e for e in load_results(folder, pilot) if e.done]
    wanted = {c.name for c in study.contestants}
    tables: dict[str, dict[str, tuple[float, float]]] = {}
    seeds = 0
    for arm in pilot.arm_names():
        members = [e for e in entries if e.arm == arm]
        for metric, key in METRICS.items():
            if metric == "top1_at_loss":
                continue
            rows = [e for e in members if e.name in wanted and any(math.isfinite(v) for v in _values(e, metric))]
            if len(rows) < 2:
                continue
            table = np.array([_values(e, metric) for e in rows])
            complete = np.isfinite(table).all(axis=0)
            table = table[:, complete]
            if table.shape[1] < 2:
                continue
            seeds = max(seeds, table.shape[1])
            resid = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
            c, s = table.shape
            pooled = float((resid ** 2).sum() / ((c - 1) * (s - 1)))
            scale = math.sqrt(c / (c - 1))  # a row's residuals understate its own run noise by (C-1)/C
            for e, row, r in zip(rows, table, resid):
                tables.setdefault(key, {})[e.name] = (float(row.mean()), moderated_sd(r * scale, pooled))
        _at_loss(members, wanted, tables)
    images = _image_sd(pilot, entries, study)
    note = f"pilot folder {folder} ({pilot.name}, seeds {', '.join(map(str, pilot.seeds))})"
    return Prior(seeds or 1, note, {"top1": images} if images else {}, tables)


def _values(e: ContestantResult, metric: str) -> list[float]:
    return [float(getattr(r, metric)) if r.status == "done" else math.nan for r in e.runs]


def _at_loss(members: list[ContestantResult], wanted: set[str], tables: dict) -> None:
    """Test top-1 at the equal training loss of each conv/attention pair (finding 4)."""
    pairs, _ = TESTS[4](members)
    for p in pairs:
        if p.metric != "top1_at_loss" or p.a.name not in wanted or p.b.name not in wanted:
            continue
        level, _ = equal_loss_level(p.a, p.b)
        a, b = np.array(accuracy_at_level(p.a, level)), np.array(accuracy_at_level(p.b, level))
        both = np.isfinite(a) & np.isfinite(b)
        if both.sum() < 2:
            continue
        sd = float(np.std(a[both] - b[both], ddof=1) / math.sqrt(2))
        for e, v in ((p.a, a), (p.b, b)):
            tables.setdefault("top1_at_loss", {})[e.name] = (float(v[both].mean()), sd)


def _image_sd(pilot: Study, entries: list[ContestantResult], study: Study) -> float:
    """The RMS test-set sd over the top-1 pairs of the study's findings, from the pilot's predictions."""
    terms = []
    for arm in pilot.arm_names():
        members = [e for e in entries if e.arm == arm]
        for key in study.questions_of(arm) if arm in study.arm_names() else []:
            for p in TESTS[QUESTION_KEYS[key]](members)[0]:
                if p.metric != "final_top1":
                    continue
                ca, cb = [r.correct() for r in p.a.runs], [r.correct() for r in p.b.runs]
                keep = [i for i in range(min(len(ca), len(cb))) if ca[i] is not None and cb[i] is not None]
                if keep:
                    terms.append(stats.image_variance([ca[i] for i in keep], [cb[i] for i in keep]) * len(ca[keep[0]]) / IMAGES)
    return math.sqrt(float(np.mean(terms))) if terms else 0.0

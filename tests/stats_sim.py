"""Simulated battle studies with per-image correctness, for calibrating `spach.battle.stats`.

The test set has N images: an easy share every run gets right, a hard share every run gets wrong, and
a contested share (default 12%) where run r of contestant c is right on image i with probability
    sigmoid(beta_i + kappa z_ci + delta_c + b_s + g_cs)
beta_i: the image's difficulty (fresh test set per study); z_ci: the contestant's own strengths and
weaknesses (different architectures err on different images, fixed across seeds); delta_c: its true
effect; b_s: the seed's shared effect (common random numbers); g_cs: the run's own luck. Each run then
adds Bernoulli churn on the contested images. `seed_sd` is the sd of a run's top-1 around its
contestant and seed effects (churn and g together, the noise that does not cancel in a pair);
(one per contestant, or one for all); `effects` are true differences in population top-1 (points). Identical contestants (effects 0) have
equal population accuracy but differ on each finite test set: the test-set noise.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import optimize, special

NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(40)
WEIGHTS = WEIGHTS / WEIGHTS.sum()


def _mean_sigmoid(shift: float, sd: float) -> float:
    return float(WEIGHTS @ special.expit(shift + sd * NODES))


def simulate(rng: np.random.Generator, n_studies: int, effects: list[float], seeds: int, seed_sd: float | list[float],
             block_sd: float = 0.3, images: int = 10_000, contested: float = 0.12, accuracy: float = 0.90,
             kappa: float = 1.5, difficulty: float = 1.5) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`n_studies` studies: (acc[contestant, seed] in points, correct[contestant, seed, image] int8)."""
    sd = float(np.hypot(difficulty, kappa))
    k = round(contested * images)
    ppq = float(WEIGHTS @ (special.expit(sd * NODES) * special.expit(-sd * NODES)))  # E p(1-p) on contested
    slope = 100.0 * k / images * ppq  # points of top-1 per unit of logit shift
    churn = 1e4 * k * ppq / images**2  # a run's Bernoulli variance, points^2
    var = np.broadcast_to(np.asarray(seed_sd, dtype=float) ** 2, (len(effects),))
    if (var < churn).any():
        raise ValueError(f"seed_sd {seed_sd} is below the churn floor {churn ** 0.5:.3f} of this test set")
    run_sd, block = (var - churn) ** 0.5 / slope, block_sd / slope
    base = _mean_sigmoid(0.0, sd)
    delta = np.array([optimize.brentq(lambda x, e=e: 100 * k / images * (_mean_sigmoid(x, sd) - base) - e, -5, 5)
                      if e else 0.0 for e in effects])
    easy = round(images * accuracy - k * base)
    c, f32 = len(effects), np.float32
    for _ in range(n_studies):
        logit = (rng.normal(0.0, difficulty, k).astype(f32) + kappa * rng.standard_normal((c, 1, k), f32)
                 + (delta[:, None] + rng.normal(0.0, block, (1, seeds)) + rng.normal(size=(c, seeds)) * run_sd[:, None]
                    ).astype(f32)[..., None])
        correct = np.zeros((c, seeds, images), dtype=np.int8)
        correct[..., :easy] = 1
        contested = rng.random((c, seeds, k), f32) < special.expit(logit)
        correct[..., easy:easy + k] = contested
        yield (easy + contested.sum(axis=-1)) * (100.0 / images), correct


def run_sequential(acc: np.ndarray, correct: np.ndarray, findings: list[list[tuple[int, int]]], first: int, budget: float,
                   margin: float = 0.5, alpha: float = 0.05, prior_df: float | None = None,
                   spending=None) -> tuple[dict[tuple[int, int], str], int]:
    """The battle's whole sequential procedure on one simulated study (acc: contestants x the study's
    seeds): a first wave of `first` seeds, then looks (`sequential.step` per finding) and waves
    (`sequential.allocate`, every run costing 1 of `budget`) until a look stops it, as
    `spach.battle.looks.run_looks` does on real runs. Returns the verdict of every (finding, comparison)
    and the runs used. `first == acc.shape[1]`: the fixed design's one look."""
    from spach.battle import stats
    from spach.battle.sequential import Open, Spending, Track, allocate, step  # noqa: F401

    c_n, most = acc.shape
    spending = spending or Spending(alpha, first, most)
    kw = {"prior_df": spending.prior_df if prior_df is None else prior_df}
    have = {c: first for c in range(c_n)}
    tracks = {(i, j): Track() for i, f in enumerate(findings) for j in range(len(f))}
    used, look = c_n * first, 0
    while True:
        look += 1
        view = acc.copy()
        for c in range(c_n):
            view[c, have[c]:] = np.nan
        opens, verdicts = [], {}
        for i, f in enumerate(findings):
            tests = [stats.pair_test(view, view[a], view[b], list(correct[a]), list(correct[b]), margin, alpha, **kw)
                     for a, b in f]
            for j, ((a, b), d) in enumerate(zip(f, step([tracks[i, j] for j in range(len(f))], tests, [True] * len(f),
                                                         spending, look))):
                verdicts[i, j] = d.verdict
                if d.verdict == "inconclusive":
                    opens.append(Open(str(i), f"{i}:{j}", str(a), str(b), d.seeds_needed, d.plan))
        if not opens or first >= most:
            return verdicts, used
        wave, _ = allocate(opens, {str(c): n for c, n in have.items()}, {str(c): 1.0 for c in range(c_n)}, budget - used, most)
        if not wave:
            return verdicts, used
        for c, n in wave.items():
            used += n - have[int(c)]
            have[int(c)] = n

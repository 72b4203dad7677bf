"""Paired statistics for the battle: seed noise pooled over a study, test-set noise from per-image
predictions, difference and equivalence tests, Holm's correction and the verdicts they lead to.

The data of one study is a table `acc[contestant, seed]` (one metric, e.g. test top-1 in points; NaN
for a missing run) where every contestant of a given seed saw the same training subset, sample order
and augmentation draws (common random numbers: the seed is a block), and optionally, per run, the 0/1
correctness of each image of the shared test set (same images, same order in every run).

Model. A run's score is  mu + contestant + seed + e  with e independent (the two-way layout without
interaction). The seed effect is shared by all contestants of the seed, so it cancels in a pair's
per-seed differences (paired design). Pooling sigma^2 over every contestant of the study gives a pair
(C-1)(S-1) degrees of freedom instead of the S-1 of its own paired t-test, at the price of assuming
that runs of every contestant are about equally noisy: at 3 seeds a pair whose runs are 1.5x (2x)
noisier in sd than the study's others was wrongly decided ~10% (~20%) of the time instead of 5%
(benchmarks/stats_calibration.py). So a pair is judged by its own paired noise moderated toward the
pooled one (`moderated`, `pair_test`: the pooled variance counts as PRIOR_DF degrees of freedom, as
limma's empirical-Bayes prior does): little seeds lean on the pool, and as the pair's own seeds
accumulate they take over; tests/test_sequential.py calibrates it with a 2x noisier pair.

The test set is a sample of images shared by every run, so the seed-to-seed spread cannot see its
noise: two contestants equally good on the image population still differ on these 10k images. With
per-image correctness the test is a crossed random-effects (seeds x images) model of the pair's
per-image differences x[s, i] = 100 (correct_a - correct_b): the variance of the mean difference is
    sigma_seed^2 / S  +  sigma_image^2 / N  +  sigma_interaction^2 / (S N).
The pooled seed term 2 sigma^2 / S estimates the first and the third (each run's accuracy includes its
own image-level churn); `image_variance` adds the second. Adding the plain var_i(mean_s x[s, i]) / N
would count the interaction twice; with 0/1 correctness at ~90% accuracy the churn between seeds is
most of the per-image spread, so we subtract the two-way ANOVA's interaction mean square:
    sigma_image^2 = var_i(d_i) - MS_interaction / S,    d_i = mean_s x[s, i]
(the standard unbiased estimator of the crossed model; with a single seed it cannot be separated and
the plain, conservative var(d) is used). In simulated studies the plain term is 2-3x the true one.
The reference distribution (`Spread`): the seed term is estimated with few df, the test-set term from
thousands of images is taken as known, and the difference is judged against
    D = Z sqrt(seed_term df / W + image_term),    Z ~ N(0, 1),  W ~ chi^2_df
(the generalized p-value of the Behrens-Fisher kind, Tsui & Weerahandi 1989): Student's t with df when
there is no test-set term, the normal when there is no seed term. Welch-Satterthwaite df over the two
terms was used before and ran liberal at few seed df, because its df grows exactly when the seed term
is estimated small: 7.5-8% of identical pairs decided at 5% with 3 seeds, 2% at 0.2% (this one:
3.2-4.9% and 0.03-0.33%, tests/test_stats.py). It is a moment approximation (normal errors, additive
effects); the calibration tests (tests/test_stats.py, tests/test_sequential.py) measure the
false-decision rates it gives on simulated studies with 0/1 correctness.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from spach.errors import SpachError

ALPHA = 0.05
MARGIN = 0.5  # equivalence margin, in the metric's unit (points of top-1)
POWER = 0.8
PRIOR_DF = 4.0  # the arm's pooled noise, as df of a pair's moderated noise (`moderated`; calibrated in tests/test_sequential.py)
MAX_SEEDS = 100  # planning looks no further
VERDICTS = ("supported", "contradicted", "equivalent", "inconclusive")


def _tq(df: float, q: float) -> float:
    return float(special.stdtrit(df, q))  # quantile of Student's t (a ufunc: no scipy.stats overhead)


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(64)
_Z_TOP = 12.0  # the normal's mass beyond is below 1e-32


@dataclass(frozen=True)
class Spread:
    """The distribution a pair's mean difference is judged against (module docstring):
    D = Z sqrt(seed_term df / W + image_term), Z standard normal, W chi^2 with `df` degrees of freedom."""

    seed_term: float  # 2 sigma^2 / S, estimated with `df` degrees of freedom
    df: float
    image_term: float = 0.0  # sigma_image^2 / N, taken as known

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_term + self.image_term)

    def upper(self, x: float) -> float:
        """P(D > x). Given Z = z, |D| > |x| iff W < df seed_term z^2 / (x^2 - image_term z^2) (always once
        image_term z^2 >= x^2), so the tail is one smooth integral over z, by Gauss-Legendre."""
        if x <= 0:
            return 1.0 - self.upper(-x) if x < 0 else 0.5
        s, i, df = self.seed_term, self.image_term, self.df
        if s == 0 or math.isinf(df):
            return float(special.ndtr(-x / self.se)) if s + i > 0 else 0.0
        if i == 0:
            return float(special.stdtr(df, -x / math.sqrt(s)))
        zstar = x / math.sqrt(i)
        top = min(zstar, _Z_TOP)
        z = (_NODES + 1.0) * (top / 2)
        inner = special.chdtr(df, df * s * z * z / (x * x - i * z * z)) * np.exp(-z * z / 2)
        return float(_WEIGHTS @ inner) * top / 2 / math.sqrt(2 * math.pi) + float(special.ndtr(-zstar))

    def t_approx(self) -> tuple[float, float]:
        """(se, df) of the Student t matching the spread's variance moments (Welch-Satterthwaite with the
        test-set term known; exact without either term). For planning (`seeds_needed`, `detectable`), where
        the terms are taken as the truth and 20x the speed of the exact quantiles matters; never for a test:
        its df grows when the seed term is estimated small, which made tests with it liberal."""
        total = self.seed_term + self.image_term
        return self.se, (total * total * self.df / self.seed_term**2 if self.seed_term > 0 else math.inf)

    def quantile(self, q: float) -> float:
        """x with P(D <= x) = q. Bracketed below by image_term's normal alone and above by twice the t
        tail at se (P(|D| > x) <= P(|T_df| > x / se) + P(|Z| > x / se))."""
        if q < 0.5:
            return -self.quantile(1.0 - q)
        s, i, df = self.seed_term, self.image_term, self.df
        if s == 0 or math.isinf(df):
            return float(special.ndtri(q)) * self.se
        if i == 0:
            return _tq(df, q) * math.sqrt(s)
        lo, hi = float(special.ndtri(q)) * math.sqrt(i), _tq(df, 1.0 - (1.0 - q) / 2) * self.se
        excess = lambda x: self.upper(x) - (1.0 - q)  # noqa: E731 (decreasing in x)
        if excess(lo) <= 0:  # a bound is the answer to rounding (one term negligible)
            return lo
        if excess(hi) >= 0:
            return hi
        return float(optimize.brentq(excess, lo, hi, xtol=1e-12 * hi))


@dataclass(frozen=True)
class SeedNoise:
    """The study's pooled seed noise: variance of one run around the additive fit, and its df."""

    var: float  # sigma^2, metric units squared
    df: float
    contestants: int  # contestants with at least one finished run
    prior_df: float | None = None  # set when moderated (`moderated`): the pooled noise counted as this many df


def seed_noise(acc: ArrayLike) -> SeedNoise:
    """Residual variance of the two-way layout acc[contestant, seed] = mu + c + s + e (no interaction).

    Missing runs (NaN) are handled by fitting the additive model by least squares on the observed
    cells (the proper unbalanced fit, not complete blocks only): df = observed runs - rank of the
    design, (C-1)(S-1) when the table is complete. A contestant with a single run adds nothing (its own
    effect absorbs it); a pair's contrast is then estimated on the seeds both have (see `compare`).
    With two contestants this is exactly the paired t-test's variance (var of differences / 2).
    """
    x = np.asarray(acc, dtype=float)
    rows, cols = np.nonzero(np.isfinite(x))
    design = np.zeros((len(rows), x.shape[0] + x.shape[1]))
    design[np.arange(len(rows)), rows] = 1.0
    design[np.arange(len(rows)), x.shape[0] + cols] = 1.0
    y = x[rows, cols]
    df = len(y) - (np.linalg.matrix_rank(design) if len(y) else 0)
    if df <= 0:
        return SeedNoise(math.nan, 0, len(set(rows)))
    resid = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    return SeedNoise(float(resid @ resid / df), int(df), len(set(rows)))


def moderated(own: SeedNoise, pooled: SeedNoise, prior_df: float = PRIOR_DF) -> SeedNoise:
    """A pair's own seed noise (`seed_noise` of its two rows: the paired t-test's) moderated toward the
    arm's pooled noise, which counts as `prior_df` degrees of freedom (capped as below): the
    empirical-Bayes posterior variance of limma's moderated t (Smyth 2004, with the prior df fixed in
    the design rather than estimated from a handful of contestants). Few seeds lean on the arm; as the
    pair's own seeds accumulate its own noise takes over, so a pair noisier than its arm is judged by
    its own spread (module docstring: the pooled model alone was wrong ~20% of the time at 2x).
    The pool holds the pair's own residuals, so it lends only the df it has beyond them: an arm of two
    contestants lends none (counting them twice made 7.3% of identical pairs 'decided' at 5% with Pocock:
    tests/test_sequential.py)."""
    beyond = pooled.df - own.df if own.df else pooled.df
    d0 = min(prior_df, beyond) if beyond > 0 and math.isfinite(pooled.var) else 0.0
    df = d0 + own.df
    if df <= 0 or (own.df and not math.isfinite(own.var)):
        return SeedNoise(math.nan, 0, own.contestants, d0)
    var = ((d0 * pooled.var if d0 else 0.0) + (own.df * own.var if own.df else 0.0)) / df
    return SeedNoise(float(var), df, own.contestants, d0)


def image_variance(correct_a: ArrayLike, correct_b: ArrayLike) -> float:
    """sigma_image^2 / N: the test-set term of the variance of a pair's mean difference (points^2).

    `correct_a`, `correct_b`: (seeds, images) 0/1 arrays, rows paired by seed. x = 100 (a - b) per
    image and seed; d_i its mean over seeds; the term is (var(d) - MS_interaction / S) / N, clipped at
    0 (module docstring: the plain var(d) / N would count the seed x image churn a second time).
    """
    a, b = np.atleast_2d(np.asarray(correct_a, dtype=float)), np.atleast_2d(np.asarray(correct_b, dtype=float))
    if a.shape != b.shape:
        raise SpachError(f"per-image predictions of different shapes ({a.shape} vs {b.shape}): the runs did not score "
                         "the same test set")
    x = 100.0 * (a - b)
    s, n = x.shape
    d = x.mean(axis=0)
    var = d.var(ddof=1)
    if s > 1:  # two-way ANOVA without replication: SS_interaction = SS_total - SS_seeds - SS_images
        ss = ((x - x.mean()) ** 2).sum() - n * x.mean(axis=1).var() * s - s * (n - 1) * var
        var -= ss / ((s - 1) * (n - 1)) / s
    return max(float(var), 0.0) / n


@dataclass(frozen=True)
class PairTest:
    """One comparison a - b on the seeds both have: the estimate, its noise and both tests."""

    diff: float  # mean over common seeds of a - b
    spread: Spread  # what diff is judged against (seed term, its df, test-set term)
    p_diff: float  # two-sided, H0: diff = 0
    p_tost: float  # TOST, H0: |diff| >= margin
    seeds: int  # common seeds
    noise: SeedNoise
    images: int  # N, 0 when the test-set term is not included
    margin: float
    alpha: float

    @property
    def se(self) -> float:
        return self.spread.se

    @property
    def df(self) -> float:
        """The seed term's degrees of freedom."""
        return self.spread.df

    @property
    def image_term(self) -> float:
        """sigma_image^2 / N (0 without per-image predictions)."""
        return self.spread.image_term

    def interval(self, q: float) -> tuple[float, float]:
        """diff -+ the spread's q-quantile: the two-sided interval of level 2 q - 1."""
        if math.isnan(self.se):
            return math.nan, math.nan
        h = self.spread.quantile(q)
        return self.diff - h, self.diff + h

    @property
    def ci95(self) -> tuple[float, float]:
        return self.interval(0.975)

    @property
    def ci_tost(self) -> tuple[float, float]:
        """The (1 - 2 alpha) interval: equivalent iff inside +-margin."""
        return self.interval(1 - self.alpha)

    def spread_at(self, seeds: int) -> Spread:
        """The spread this comparison would have with `seeds` seeds in common, the study's contestants and
        noise as estimated; the test-set term does not shrink with seeds."""
        if self.noise.prior_df is not None:
            df_seed = self.noise.prior_df + seeds - 1
        else:
            df_seed = max(self.noise.contestants - 1, 1) * (seeds - 1)
        return Spread(2 * self.noise.var / seeds, df_seed, self.image_term)


def compare(a: ArrayLike, b: ArrayLike, noise: SeedNoise, correct_a: Sequence[ArrayLike | None] | None = None,
            correct_b: Sequence[ArrayLike | None] | None = None, margin: float = MARGIN,
            alpha: float = ALPHA, image: tuple[float, int] | None = None) -> PairTest:
    """Test a - b (per-seed scores, aligned by seed, NaN where a run is missing) with the study's noise.

    Difference of means over the common seeds; variance 2 sigma^2 / S (seed effects cancel) plus the
    test-set term when per-run correctness vectors are given (lists aligned by seed, None for a run
    without stored predictions; the term is estimated on the common seeds that have both), or as `image`
    = (sigma_image^2 / N, N) when it is known. The `Spread` of seed term (noise.df df) and test-set term
    gives the two-sided p for a difference and TOST's p for equivalence within +-margin (the larger of the
    two one-sided p's), and the (1 - 2 alpha) and 95% intervals (`PairTest.ci_tost`, `.ci95`).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both = np.isfinite(a) & np.isfinite(b)
    s = int(both.sum())
    diff = float(np.mean(a[both] - b[both])) if s else math.nan
    term, images = image if image is not None else (0.0, 0)  # a known test-set term (simulated studies)
    if correct_a is not None and correct_b is not None:
        keep = [i for i in np.flatnonzero(both) if correct_a[i] is not None and correct_b[i] is not None]
        if keep:
            term = image_variance([correct_a[i] for i in keep], [correct_b[i] for i in keep])
            images = len(np.asarray(correct_a[keep[0]]))
    if not s or not noise.df or not (noise.var > 0 or term > 0):
        return PairTest(diff, Spread(math.nan, math.nan, term), math.nan, math.nan, s, noise, images, margin, alpha)
    spread = Spread(2 * noise.var / s, noise.df, term)
    p_diff = 2 * spread.upper(abs(diff))
    p_tost = max(spread.upper(diff + margin), spread.upper(margin - diff))
    return PairTest(diff, spread, p_diff, p_tost, s, noise, images, margin, alpha)


def pair_test(table: ArrayLike, a: ArrayLike, b: ArrayLike, correct_a: Sequence[ArrayLike | None] | None = None,
              correct_b: Sequence[ArrayLike | None] | None = None, margin: float = MARGIN, alpha: float = ALPHA,
              prior_df: float = PRIOR_DF) -> PairTest:
    """`compare` a - b with the pair's own seed noise moderated toward the noise pooled over `table`
    (the arm's contestants x seeds, `a` and `b` among its rows): the battle's test of one comparison."""
    noise = moderated(seed_noise([a, b]), seed_noise(table), prior_df)
    return compare(a, b, noise, correct_a, correct_b, margin=margin, alpha=alpha)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error <= alpha under any dependence).

    Sorted ascending, the k-th smallest (k = 0..m-1) is multiplied by m - k, then made non-decreasing
    and capped at 1. An untestable comparison (NaN) counts as p = 1: it stays in the family.
    """
    p = np.nan_to_num(np.asarray(p, dtype=float), nan=1.0)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def detectable(test: PairTest, n_tests: int = 1, power: float = POWER) -> float:
    """Minimal detectable difference: the true |a - b| the difference test finds with `power` at this
    design, (t_{1 - a'/2} + t_power) se with the spread's t approximation, at a' = alpha / n_tests (Holm's
    strictest step: a difference this large is found whatever the family's other comparisons do)."""
    level = test.alpha / n_tests
    se, df = test.spread.t_approx()
    return (_tq(df, 1 - level / 2) + _tq(df, power)) * se


def _power(test: PairTest, spread: Spread, level: float, equivalence: bool) -> float:
    """Approximate power (the spread's t approximation, shifted by the effect) of the difference test
    (two-sided, `level`) or of TOST (`level`), taking the observed |diff| as the true difference."""
    effect, m = abs(test.diff), test.margin
    se, df = spread.t_approx()
    if se == 0:  # only the test-set term, and it is 0
        return float(effect < m if equivalence else effect > 0)
    if equivalence:
        t = _tq(df, 1 - level)
        return max(float(special.stdtr(df, (m - effect) / se - t) + special.stdtr(df, (m + effect) / se - t)) - 1, 0.0)
    return float(special.stdtr(df, effect / se - _tq(df, 1 - level / 2)))


def seeds_needed(test: PairTest, n_tests: int = 1, power: float = POWER,
                 level_at: Callable[[int], float] | None = None) -> tuple[int | None, str]:
    """How many seeds (in common) would decide this comparison with `power`, taking the observed
    difference as the truth (a planning guess, not a promise) and the noise as estimated.

    Two routes decide: the difference test (level alpha / n_tests, Holm's strictest step) and, when
    |diff| < margin, TOST showing equivalence; the answer is the fewer seeds of the two (a true 0.45
    with margin 0.5 is usually found as a difference long before it is shown equivalent). The
    test-set term does not shrink with seeds, so there may be no such number: then (None, why).
    `level_at(k)`, when given, is the level a test at k seeds would have (a sequential design's
    spending), instead of alpha / n_tests."""
    if math.isnan(test.se):
        return None, "no noise estimate: needs two seeds of the pair and one more run to pool"
    level = test.alpha / n_tests
    at = level_at or (lambda k: level)
    routes = [(False, "detect the difference")] + ([(True, "show equivalence")] if abs(test.diff) < test.margin else [])
    found = []
    for eq, goal in routes:
        n = _fewest(lambda k, eq=eq: _power(test, test.spread_at(k), at(k), eq) >= power)
        found += [(n, goal)] if n is not None else []
    if found:
        n, goal = min(found)
        return n, f"{n} seeds would {goal} with {power:.0%} power"
    floor = math.sqrt(test.image_term)  # the se with infinitely many seeds
    if not any(_power(test, Spread(0.0, math.inf, test.image_term), level, eq) >= power for eq, _ in routes):
        return None, f"no number of seeds: the test-set noise alone (se {floor:.2f}) is too large for this difference"
    return None, f"more than {MAX_SEEDS} seeds"


def _fewest(enough: Callable[[int], bool]) -> int | None:
    """The smallest number of seeds in 2..MAX_SEEDS that is `enough` (monotone: power grows with
    seeds), by bisection; None when even MAX_SEEDS is not."""
    if not enough(MAX_SEEDS):
        return None
    lo, hi = 2, MAX_SEEDS
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


@dataclass(frozen=True)
class Decision:
    """A comparison's verdict within its finding (Holm-adjusted p's) and, when inconclusive, its plan."""

    test: PairTest
    higher_is_claimed: bool
    p_diff_holm: float
    p_tost_holm: float
    verdict: str  # one of VERDICTS
    mdd: float  # minimal detectable difference at 80% power, level alpha / (comparisons in the finding)
    seeds_needed: int | None = None  # inconclusive only
    plan: str = ""
    level: float = math.nan  # a sequential design's level at this look (its Holm share included)
    look: int = 0  # the look that decided it (sequential designs)


@dataclass(frozen=True)
class FindingDecision:
    """The finding's verdict: decided when every comparison is; then the common verdict, or `mixed`."""

    verdict: str  # supported / contradicted / equivalent / mixed / inconclusive / untested
    decided: bool
    comparisons: list[Decision] = field(default_factory=list)

    @property
    def by_verdict(self) -> dict[str, list[int]]:
        """Indices of the comparisons per verdict (which go which way when mixed)."""
        return {v: [i for i, d in enumerate(self.comparisons) if d.verdict == v] for v in VERDICTS
                if any(d.verdict == v for d in self.comparisons)}

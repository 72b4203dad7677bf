"""Alpha spending over a sequential battle's looks: the functions a study may choose and the level a
comparison's test gets at each number of seeds.

A comparison spends its alpha along its information fraction t = n / n_max (n: seeds in common; n_max:
the most seeds it can reach, fixed from the budget and the measured run costs before any result is
seen, `spach.battle.afford`). The Lan-DeMets family (Lan & DeMets 1983; Jennison & Turnbull 2000, ch. 7):
- `obf`: O'Brien-Fleming-like, alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)): almost nothing early;
- `pocock`: Pocock-like, alpha(t) = alpha ln(1 + (e - 1) t): much early;
- `hsd(g)`: Hwang, Shih & DeCani (1990), alpha(t) = alpha (1 - exp(-g t)) / (1 - exp(-g)) (g = 0: alpha t);
  g = -4 is close to O'Brien-Fleming, g = 1 to Pocock.
For reference at t = 1/3 and alpha 0.05: obf 6.9e-4, hsd(-2) 0.0074, pocock 0.0226. The look at n_max
spends whatever is left: all of alpha is spent by the last look the budget can pay for. No alpha is
spent before a comparison has 3 seeds in common, and how many degrees of freedom the arm's pooled noise
lends a pair depends on the function (`Spending.prior_df`): both were set by the calibration with a pair
twice as noisy as its arm.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from scipy import special

from spach.errors import SpachError

DEFAULT = "pocock"  # the most decisions predicted for the default and medium designs (their pilots; docs/battles)
MIN_SEEDS = 3  # the first test of a comparison: at 2 seeds its own noise has 1 degree of freedom
FIXED_PRIOR_DF = 4.0  # a fixed design's moderation (spach.battle.stats.PRIOR_DF, calibrated in tests/test_stats.py)


def _obf(t: float, alpha: float) -> float:
    return float(2 * special.ndtr(-special.ndtri(1 - alpha / 2) / math.sqrt(t)))


def _pocock(t: float, alpha: float) -> float:
    return alpha * math.log(1 + (math.e - 1) * t)


def _hsd(gamma: float) -> Callable[[float, float], float]:
    if gamma == 0:
        return lambda t, alpha: alpha * t
    return lambda t, alpha: alpha * (1 - math.exp(-gamma * t)) / (1 - math.exp(-gamma))


def spending_function(name: str) -> Callable[[float, float], float]:
    """The cumulative alpha spent by information fraction t, `f(t, alpha)` (0 at 0, alpha at 1), for
    "obf", "pocock" or "hsd(G)" with a number G; a SpachError names the choices otherwise."""
    text = str(name).strip().lower()
    if text == "obf":
        return _obf
    if text == "pocock":
        return _pocock
    m = re.fullmatch(r"hsd\(\s*([-+]?\d+(?:\.\d+)?)\s*\)", text)
    if m and abs(float(m.group(1))) <= 20:
        return _hsd(float(m.group(1)))
    raise SpachError(f"{name!r} is not a spending function; choose \"obf\" (O'Brien-Fleming), \"pocock\" or "
                     "\"hsd(G)\" (Hwang-Shih-DeCani with a number G in -20..20, e.g. \"hsd(-2)\")")


@dataclass(frozen=True)
class Spending:
    """The alpha a comparison may spend at each number of seeds in common: looks from `first` to `most`
    seeds (its n_max; a fixed design: first == most, all alpha at its one look), along `function`."""

    alpha: float
    first: int
    most: int
    function: str = DEFAULT

    def spent(self, n: int) -> float:
        """Alpha spent once a test at n seeds is done: none before MIN_SEEDS (a pair's own noise is then
        all but unknown, and the arm's pooled noise would decide alone), all of it from `most` on."""
        if n <= 0 or n < min(MIN_SEEDS, self.most):
            return 0.0
        t = min(max(n, self.first), self.most) / self.most
        return self.alpha if t >= 1 else min(spending_function(self.function)(t, self.alpha), self.alpha)

    @property
    def prior_df(self) -> float:
        """The degrees of freedom the arm's pooled noise lends a pair's moderated noise (`stats.moderated`):
        the more alpha a function spends while a pair's own noise rests on few seeds, the less the pool may
        count, or a pair noisier than its arm is wrongly decided too often (tests/test_sequential.py
        calibrates each function with a pair twice as noisy as its arm: with 3 df for O'Brien-Fleming and
        HSD(-2), 2 for Pocock, 1.8-4.7% wrongly decided there; one df more gave 4.6-6.3% on 1,000 studies)."""
        if self.first >= self.most:  # a fixed design: one look, at all its seeds
            return FIXED_PRIOR_DF
        return 3.0 if spending_function(self.function)(0.5, 1.0) < 0.5 else 2.0

    def level(self, tested: list[int]) -> float:
        """The level of a test at `tested[-1]` seeds, after tests at the earlier entries."""
        return self.spent(tested[-1]) - (self.spent(tested[-2]) if len(tested) > 1 else 0.0)

    def level_at(self, tested: list[int], k: int) -> float:
        """For planning: the level a test at k seeds would have after the tests so far (none at seeds
        already tested: their alpha is spent)."""
        if tested and k <= tested[-1]:
            return 0.0
        return self.spent(k) - (self.spent(tested[-1]) if tested else 0.0)


def obf_spent(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming alpha spent by information fraction t (0 at 0, alpha at 1)."""
    if t <= 0:
        return 0.0
    return alpha if t >= 1 else _obf(t, alpha)

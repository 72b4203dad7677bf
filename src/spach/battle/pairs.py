"""Which contestants each finding compares: pairs of one arm that differ in the one thing the finding is
about, chosen from the contestants' facts (family, layout, CPE, weight sharing, architecture, cost).

Every function takes the contestants of one arm and returns `Pair`s (a claim "a beats b" on one metric)
and the parts of the finding the contestants cannot test. Where several candidates fit, the one of the
closest cost (MACs) is taken; a pair whose MACs differ by more than 2x carries a caveat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from spach.battle.questions import BEYOND, MODERN
from spach.battle.results import ContestantResult

PURE = ("conv", "attn", "mlp")
COST_MISMATCH = 2.0
GROWTH = 1.5  # a "larger" model has at least this many times the parameters
TOP1 = "test top-1 (%)"
GAP = "generalisation gap (train-subset top-1 minus test top-1, points)"
AT_LOSS = "test top-1 (%) at equal training loss"
FIT = "clean training loss (the final model in eval mode, on the scored training subset)"


@dataclass
class Pair:
    """A claim `a` beats `b` on `metric` (a `RunResult` attribute, or "top1_at_loss")."""

    claim: str
    a: ContestantResult
    b: ContestantResult
    metric: str
    label: str
    higher_is_claimed: bool = True
    equivalence: bool = True  # whether the study's margin applies (a loss has no margin in points)
    note: str = ""


def cost_ratio(a: ContestantResult, b: ContestantResult) -> float:
    if not a.macs or not b.macs:
        return 1.0
    return max(a.macs, b.macs) / min(a.macs, b.macs)


def _closest(ref: ContestantResult, candidates: Iterable[ContestantResult]) -> ContestantResult | None:
    return min(candidates, key=lambda c: (cost_ratio(ref, c), c.name), default=None)


def _pair(claim: str, a: ContestantResult, b: ContestantResult, metric: str, label: str, **kw: object) -> Pair:
    r = cost_ratio(a, b)
    note = f"MACs differ x{r:.1f}" if r > COST_MISMATCH else ""
    return Pair(claim, a, b, metric, label, note=note, **kw)  # type: ignore[arg-type]


def _same_kind(a: ContestantResult, b: ContestantResult) -> bool:
    return a.cpe == b.cpe and a.shared == b.shared


def _plain(e: ContestantResult) -> bool:
    return e.cpe and not e.shared


def multi_stage(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Finding 1: each single-stage contestant against the closest-cost multi-stage one of its family."""
    pairs = []
    for s in (e for e in entries if e.layout == "single" and e.family in PURE):
        m = _closest(s, (e for e in entries if e.layout == "multi" and e.family == s.family and _same_kind(s, e)))
        if m is not None:
            pairs.append(_pair(f"{m.name} > {s.name}", m, s, "final_top1", TOP1))
    fams = {p.a.family for p in pairs}
    missing = [f"a single- and a multi-stage {f} contestant" for f in PURE if f not in fams] if pairs else []
    return pairs, missing


def local_modeling(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Finding 2: each contestant without the CPE against its twin with it."""
    pairs = []
    for b in (e for e in entries if not e.cpe and e.family in ("attn", "mlp", "hybrid")):
        a = _closest(b, (e for e in entries if e.cpe and e.arch_key == b.arch_key and e.family == b.family))
        if a is not None:
            pairs.append(_pair(f"{a.name} (CPE) > {b.name} (no CPE)", a, b, "final_top1", TOP1))
    fams = {p.a.family for p in pairs}
    missing = [f"the {f} CPE ablation (the paper tests attention and MLP)" for f in ("attn", "mlp") if f not in fams]
    return pairs, (missing if pairs else [])


def mlp_overfit(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Finding 3, on the generalisation gap: a larger MLP over-fits more; multi-stage and weight sharing
    over-fit less."""
    mlp = [e for e in entries if e.family == "mlp" and e.scores_train]
    pairs, missing = [], []
    groups: dict[tuple, list[ContestantResult]] = {}
    for e in mlp:
        groups.setdefault((e.layout, e.cpe, e.shared), []).append(e)
    for group in groups.values():
        group.sort(key=lambda e: e.params)
        pairs += [_pair(f"gap {big.name} > gap {small.name} (the larger MLP over-fits more)", big, small, "gap", GAP)
                  for small, big in zip(group, group[1:]) if big.params > GROWTH * small.params]
    if not pairs:
        missing.append("over-fitting as the MLP grows: two mlp contestants of one layout, one >1.5x the params")
    n = len(pairs)
    for m in (e for e in mlp if e.layout == "multi" and _plain(e)):
        s = _closest(m, (e for e in mlp if e.layout == "single" and _plain(e)))
        if s is not None:
            pairs.append(_pair(f"gap {s.name} > gap {m.name} (multi-stage relieves)", s, m, "gap", GAP))
    if len(pairs) == n:
        missing.append("relief by multi-stage: a single- and a multi-stage mlp contestant")
    n = len(pairs)
    for b in (e for e in mlp if e.shared):
        a = _closest(b, (e for e in mlp if not e.shared and e.arch_key == b.arch_key and e.cpe == b.cpe))
        if a is not None:
            pairs.append(_pair(f"gap {a.name} > gap {b.name} (sharing relieves)", a, b, "gap", GAP))
    if len(pairs) == n:
        missing.append("relief by weight sharing: an mlp contestant and its twin with shared_spatial_func = true")
    return pairs, missing


def conv_vs_attn(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Finding 4: conv generalises better (higher test top-1 at equal training loss), attention has more
    capacity (it fits the training data further)."""
    pairs = []
    for conv in (e for e in entries if e.family == "conv"):
        attn = _closest(conv, (e for e in entries if e.family == "attn" and e.layout == conv.layout and _same_kind(conv, e)))
        if attn is not None:
            pairs.append(_pair(f"{conv.name} > {attn.name} at equal training loss", conv, attn, "top1_at_loss", AT_LOSS))
            pairs.append(_pair(f"{attn.name} fits lower than {conv.name}", attn, conv, "fit_loss", FIT,
                               higher_is_claimed=False, equivalence=False))
    return pairs, []


def _against_pure_families(entries: list[ContestantResult], families: tuple[str, ...] | list[str],
                           claim: str) -> tuple[list[Pair], list[str]]:
    """Each contestant of `families` against the closest-cost contestant of every pure family in its
    layout; `claim` joins the two names ("a > b", "a vs b")."""
    pairs, missing = [], []
    for m in (e for e in entries if e.family in families):
        for fam in PURE:
            rival = _closest(m, (e for e in entries if e.family == fam and e.layout == m.layout and _same_kind(m, e)))
            if rival is None:
                missing.append(f"a {fam} contestant with the layout of {m.name}")
            else:
                pairs.append(_pair(f"{m.name} {claim} {rival.name}", m, rival, "final_top1", TOP1))
    return pairs, missing


def hybrid(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Finding 5: each hybrid against the closest-cost contestant of every pure family in its layout."""
    return _against_pure_families(entries, ("hybrid",), ">")


def size_crossover(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """The paper's ordering as models grow: MLP best when small, conv in the middle, attention when large.
    Each pure family's plain multi-stage contestants, sorted by size; at each size the expected leader
    against the two other families."""
    sizes = {f: sorted((e for e in entries if e.family == f and e.layout == "multi" and _plain(e)), key=lambda e: e.params)
             for f in PURE}
    k = min(len(v) for v in sizes.values())
    if k < 2 or len({len(v) for v in sizes.values()}) > 1:
        return [], []
    pairs = []
    for i in range(k):
        leader = "mlp" if i == 0 else "attn" if i == k - 1 else "conv"
        for other in (f for f in PURE if f != leader):
            a, b = sizes[leader][i], sizes[other][i]
            pairs.append(_pair(f"size {i + 1}/{k}: {a.name} > {b.name}", a, b, "final_top1", TOP1))
    return pairs, []


def beyond(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Each contestant of a mixer beyond the paper against the closest-cost contestant of every pure
    family in its layout: equivalent = it matches that family, supported = it beats it."""
    return _against_pure_families(entries, BEYOND, "vs")


def base_family(family: str) -> str:
    """A mixer family without its number (`window4` -> `window`, `dwconv7` -> `dwconv`)."""
    return family.rstrip("0123456789") or family


def modern(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """Each contestant of a 2021-2025 mixer against the closest-cost contestant of every pure family in its layout."""
    return _against_pure_families(entries, [e.family for e in entries if base_family(e.family) in MODERN], ">")


def _rivals(entries: list[ContestantResult], claims: list[tuple[str, str]]) -> tuple[list[Pair], list[str]]:
    """For each (family a, family b) by base name: a's contestants against the closest-cost b of their layout."""
    pairs, missing = [], []
    for fa, fb in claims:
        made = 0
        for a in (e for e in entries if base_family(e.family) == fa):
            b = _closest(a, (e for e in entries if base_family(e.family) == fb and e.layout == a.layout and _same_kind(a, e)))
            if b is not None:
                pairs.append(_pair(f"{a.name} > {b.name}", a, b, "final_top1", TOP1))
                made += 1
        if not made:
            missing.append(f"a {fa} and a {fb} contestant of one layout")
    return pairs, missing if pairs else []


def gate(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """MambaOut's claim: the gated CNN beats conv (the gate helps) and matches or beats the selective scan."""
    return _rivals(entries, [("gatedconv", "conv"), ("gatedconv", "scan")])


def large_kernel(entries: list[ContestantResult]) -> tuple[list[Pair], list[str]]:
    """A larger depthwise kernel beats the conv family's 3x3 and attention."""
    return _rivals(entries, [("dwconv", "conv"), ("dwconv", "attn")])


TESTS: dict[int, Callable[[list[ContestantResult]], tuple[list[Pair], list[str]]]] = {
    1: multi_stage, 2: local_modeling, 3: mlp_overfit, 4: conv_vs_attn, 5: hybrid, 6: size_crossover, 7: beyond,
    8: modern, 9: gate, 10: large_kernel,
}


def accuracy_at_loss(curve: list[tuple[float, float]], level: float) -> float:
    """Test top-1 where the training loss first falls to `level`, linearly interpolated between epochs."""
    for (l0, a0), (l1, a1) in zip(curve, curve[1:]):
        if l0 >= level >= l1:
            return a0 if l0 == l1 else a0 + (a1 - a0) * (l0 - level) / (l0 - l1)
    return next((a for l, a in curve if l == level), math.nan)


def equal_loss_level(a: ContestantResult, b: ContestantResult) -> tuple[float, str]:
    """The lowest training loss every finished run of both reaches (NaN when their ranges do not
    overlap), and a note for the report."""
    curves = [r.curve() for r in a.runs + b.runs if r.status == "done"]
    if not curves or not all(curves):
        return math.nan, "no training curves"
    level = max(min(loss for loss, _ in c) for c in curves)
    if level > min(max(loss for loss, _ in c) for c in curves):
        return math.nan, "their training-loss ranges do not overlap"
    return level, f"at training loss {level:.3f}"


def accuracy_at_level(e: ContestantResult, level: float) -> list[float]:
    """Per seed, the test top-1 where the run's training loss falls to `level` (NaN when it never does
    or the run did not finish)."""
    return [accuracy_at_loss(r.curve(), level) if r.status == "done" and not math.isnan(level) else math.nan
            for r in e.runs]

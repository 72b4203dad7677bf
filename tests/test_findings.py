"""The findings logic on synthetic result tables whose verdicts are known."""
import math

import numpy as np
import pytest
from scipy import stats

from spach.battle.findings import accuracy_at_loss, aggregate, judge, welch
from spach.battle.results import ContestantResult, RunResult


def entry(name, family, layout, top1, cpe=True, shared=False, macs=1_000_000, params=100_000, arch_key=None,
          gap=0.0, losses=None):
    """A contestant with one finished run per value of `top1` (one epoch each unless `losses` gives curves)."""
    runs = []
    for seed, t in enumerate(top1):
        curve = losses[seed] if losses else [(1.0, t)]
        g = gap[seed] if isinstance(gap, list) else gap
        epochs = [{"epoch": i + 1, "train_loss": l, "train_eval_loss": l, "top1": a, "train_eval_top1": a + g}
                  for i, (l, a) in enumerate(curve)]
        runs.append(RunResult(name, seed, "done", epochs, {"final_top1": t}))
    return ContestantResult(name, family, layout, cpe=cpe, shared=shared, params=params, macs=macs,
                            arch_key=arch_key or name, runs=runs)


def by_number(findings, n):
    return next(f for f in findings if f.number == n)


HIGH, LOW = [90.1, 90.3, 90.2], [85.0, 85.2, 85.1]
NOISY_A, NOISY_B = [88.0, 84.0, 91.0], [87.0, 90.0, 83.0]


def test_welch_matches_scipy():
    a, b = [1.0, 2.0, 3.5], [0.5, 0.7, 1.9, 1.0]
    diff, (lo, hi), p = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert p == pytest.approx(ref.pvalue)
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert diff == pytest.approx(np.mean(a) - np.mean(b))


def test_welch_without_variance_or_seeds_gives_no_p():
    assert math.isnan(welch([1.0], [0.0, 0.1])[2])
    assert math.isnan(welch([1.0, 1.0], [0.0, 0.0])[2])


def test_multi_stage_supported_contradicted_inconclusive():
    def f1(ms, ss):
        entries = [entry("conv-ms", "conv", "multi", ms), entry("conv-ss", "conv", "single", ss),
                   entry("mlp-ms", "mlp", "multi", ms), entry("mlp-ss", "mlp", "single", ss)]
        return by_number(judge(entries), 1)

    assert f1(HIGH, LOW).verdict == "supported"
    assert f1(LOW, HIGH).verdict == "contradicted"
    assert f1(NOISY_A, NOISY_B).verdict == "inconclusive"
    f = f1(HIGH, LOW)
    assert {c.claim for c in f.comparisons} == {"conv-ms > conv-ss", "mlp-ms > mlp-ss"}
    assert all(c.p < 0.05 and c.diff > 0 and c.ci[0] > 0 for c in f.comparisons)


def test_one_seed_is_inconclusive_and_says_why():
    f = by_number(judge([entry("a-ms", "attn", "multi", [95.0]), entry("a-ss", "attn", "single", [60.0])]), 1)
    assert f.verdict == "inconclusive"
    assert "fewer than 2 finished seeds" in f.comparisons[0].note


def test_mixed_pairs_are_inconclusive():
    entries = [entry("conv-ms", "conv", "multi", HIGH), entry("conv-ss", "conv", "single", LOW),
               entry("attn-ms", "attn", "multi", LOW), entry("attn-ss", "attn", "single", HIGH)]
    assert by_number(judge(entries), 1).verdict == "inconclusive"


def test_local_modeling_pairs_only_the_same_architecture():
    entries = [entry("attn", "attn", "multi", HIGH, arch_key="A"),
               entry("attn-nocpe", "attn", "multi", LOW, cpe=False, arch_key="A"),
               entry("mlp", "mlp", "multi", HIGH, arch_key="B"),
               entry("mlp-other-nocpe", "mlp", "multi", LOW, cpe=False, arch_key="C")]
    f = by_number(judge(entries), 2)
    assert [c.claim for c in f.comparisons] == ["attn (CPE) > attn-nocpe (no CPE)"]
    assert f.verdict == "supported"
    assert any("MLP" in n for n in f.not_tested)


def test_hybrid_must_beat_each_pure_family():
    def f5(mlp_top1):
        entries = [entry("hybrid", "hybrid", "multi", HIGH), entry("conv", "conv", "multi", LOW),
                   entry("attn", "attn", "multi", LOW), entry("mlp", "mlp", "multi", mlp_top1)]
        return by_number(judge(entries), 5)

    assert f5(LOW).verdict == "supported"
    assert f5(NOISY_A).verdict == "inconclusive"  # beats two of three: not "each"
    assert f5([95.0, 95.2, 95.1]).verdict == "inconclusive"  # one contradicts, two support


def test_hybrid_missing_rival_is_listed():
    f = by_number(judge([entry("hybrid", "hybrid", "multi", HIGH), entry("conv", "conv", "multi", LOW)]), 5)
    assert len(f.comparisons) == 1
    assert any("attn" in n for n in f.not_tested) and any("mlp" in n for n in f.not_tested)


def test_mlp_overfit_on_generalisation_gap():
    big_gap, small_gap = [6.0, 6.2, 6.1], [1.0, 1.1, 0.9]
    entries = [entry("mlp-ss", "mlp", "single", HIGH, gap=big_gap), entry("conv-ss", "conv", "single", HIGH, gap=small_gap),
               entry("attn-ss", "attn", "single", HIGH, gap=small_gap), entry("mlp-ms", "mlp", "multi", HIGH, gap=small_gap)]
    f = by_number(judge(entries), 3)
    assert f.verdict == "supported"
    claims = {c.claim for c in f.comparisons}
    assert "gap mlp-ss > gap conv-ss" in claims and "gap mlp-ss > gap mlp-ms (multi-stage relieves)" in claims
    assert any("weight sharing" in n for n in f.not_tested) and any("grows" in n for n in f.not_tested)


def test_mlp_overfit_untested_without_gap():
    entries = [entry("mlp", "mlp", "single", HIGH, gap=math.nan), entry("conv", "conv", "single", LOW, gap=math.nan)]
    f = by_number(judge(entries), 3)
    assert f.verdict == "untested" and "eval_train_subset" in f.summary


def test_accuracy_at_loss_interpolates_the_first_crossing():
    curve = [(2.0, 50.0), (1.0, 70.0), (0.5, 80.0)]
    assert accuracy_at_loss(curve, 1.5) == pytest.approx(60.0)
    assert accuracy_at_loss(curve, 0.5) == pytest.approx(80.0)
    assert math.isnan(accuracy_at_loss(curve, 0.1))


def test_conv_generalises_better_attention_fits_lower():
    # conv: higher test accuracy at every training loss; attention: reaches a lower training loss
    conv_curves = [[(1.0, 80.0 + s), (0.6, 86.0 + s), (0.5, 88.0 + s)] for s in (0.0, 0.2, 0.1)]
    attn_curves = [[(1.0, 75.0 + s), (0.5, 82.0 + s), (0.3 + s / 10, 85.0 + s)] for s in (0.0, 0.2, 0.1)]
    entries = [entry("conv", "conv", "single", [88.0, 88.2, 88.1], losses=conv_curves),
               entry("attn", "attn", "single", [85.0, 85.2, 85.1], losses=attn_curves)]
    f = by_number(judge(entries), 4)
    equal, fit = f.comparisons
    assert "training loss 0.500" in equal.metric
    assert equal.mean_a == pytest.approx(88.1) and equal.mean_b == pytest.approx(82.1)
    assert equal.verdict == "supported" and fit.verdict == "supported"
    assert f.verdict == "supported"


def test_untested_findings_name_the_contestants_needed_and_questions_filter():
    findings = judge([entry("conv", "conv", "single", HIGH)])
    assert [f.verdict for f in findings] == ["untested"] * 5
    assert "single-stage and a multi-stage" in findings[0].summary
    assert [f.number for f in judge([entry("conv", "conv", "single", HIGH)], ["hybrid", "multi-stage"])] == [1, 5]


def test_outside_baselines_are_not_paired():
    entries = [entry("resnet", "outside", "-", HIGH), entry("conv-ss", "conv", "single", LOW)]
    assert all(f.verdict == "untested" for f in judge(entries))


def test_cost_mismatch_is_noted():
    entries = [entry("conv-ms", "conv", "multi", HIGH, macs=10_000_000), entry("conv-ss", "conv", "single", LOW)]
    assert "MACs differ x10.0" in by_number(judge(entries), 1).comparisons[0].note


def test_aggregate_rules():
    class C:
        def __init__(self, v):
            self.verdict = v

    s, c, i = C("supported"), C("contradicted"), C("inconclusive")
    assert aggregate([], False) == "untested"
    assert aggregate([s, i], False) == "supported"
    assert aggregate([s, i], True) == "inconclusive"
    assert aggregate([c, c, i], False) == "contradicted"
    assert aggregate([s, c], False) == "inconclusive"

"""The findings logic on synthetic result tables whose verdicts are known: which contestants each finding
pairs, and the verdicts the statistics give them (the statistics themselves: tests/test_stats.py)."""
import math

import numpy as np
import pytest

from spach.battle.findings import judge
from spach.battle.pairs import accuracy_at_loss
from spach.battle.results import ContestantResult, RunResult
from spach.battle.study import Arm, Contestant, Study


def entry(name, family, layout, top1, cpe=True, shared=False, macs=1_000_000, params=100_000, arch_key=None,
          gap=0.0, losses=None, arm="main"):
    """A contestant with one finished run per value of `top1` (one epoch each unless `losses` gives curves)."""
    runs = []
    for seed, t in enumerate(top1):
        curve = losses[seed] if losses else [(1.0, t)]
        g = gap[seed] if isinstance(gap, list) else gap
        epochs = [{"epoch": i + 1, "train_loss": l, "train_eval_loss": l, "top1": a, "train_eval_top1": a + g}
                  for i, (l, a) in enumerate(curve)]
        epochs[-1]["top1"] = t
        runs.append(RunResult(name, seed, "done", epochs, {"final_top1": t}))
    return ContestantResult(name, family, layout, arm=arm, cpe=cpe, shared=shared, params=params, macs=macs,
                            arch_key=arch_key or name, scores_train=True, runs=runs)


def study(entries, questions=(), arms=None, elsewhere=None, margin=0.5):
    seeds = list(range(max(len(e.runs) for e in entries)))
    return Study("t", seeds, [Contestant(e.name, arm=e.arm) for e in entries], questions=list(questions),
                 arms={k: Arm(k, questions=list(v)) for k, v in (arms or {}).items()}, tested_elsewhere=elsewhere or {},
                 margin=margin)


def judged(entries, number, **kw):
    return next(f for f in judge(entries, study(entries, **kw)) if f.number == number)


HIGH, LOW = [90.1, 90.3, 90.2], [85.0, 85.3, 85.1]
NOISY_A, NOISY_B = [88.0, 84.0, 91.0], [87.0, 90.0, 83.0]


def test_multi_stage_supported_contradicted_inconclusive_equivalent():
    def f1(ms, ss):
        entries = [entry("conv-ms", "conv", "multi", ms), entry("conv-ss", "conv", "single", ss),
                   entry("mlp-ms", "mlp", "multi", ms), entry("mlp-ss", "mlp", "single", ss)]
        return judged(entries, 1)

    assert f1(HIGH, LOW).verdict == "supported" and f1(HIGH, LOW).decided
    assert f1(LOW, HIGH).verdict == "contradicted"
    assert f1(NOISY_A, NOISY_B).verdict == "inconclusive" and not f1(NOISY_A, NOISY_B).decided
    assert f1(HIGH, [90.15, 90.3, 90.2]).verdict == "equivalent"  # a difference far inside the 0.5 margin
    f = f1(HIGH, LOW)
    assert {c.claim for c in f.comparisons} == {"conv-ms > conv-ss", "mlp-ms > mlp-ss"}
    assert all(c.p < 0.05 and c.diff > 0 and c.ci[0] > 0 for c in f.comparisons)
    assert "missing" not in f.summary and any("attn" in n for n in f.not_tested)


def test_one_seed_cannot_decide():
    f = judged([entry("a-ms", "attn", "multi", [95.0]), entry("a-ss", "attn", "single", [60.0])], 1)
    assert f.verdict == "inconclusive" and math.isnan(f.comparisons[0].test.p_diff)
    assert "no noise estimate" in f.comparisons[0].decision.plan


def test_pairs_going_different_ways_are_mixed():
    entries = [entry("conv-ms", "conv", "multi", HIGH), entry("conv-ss", "conv", "single", LOW),
               entry("attn-ms", "attn", "multi", LOW), entry("attn-ss", "attn", "single", HIGH)]
    f = judged(entries, 1)
    assert f.verdict == "mixed" and f.decided
    assert "supported: conv-ms > conv-ss" in f.summary and "contradicted: attn-ms > attn-ss" in f.summary


def test_local_modeling_pairs_only_the_same_architecture():
    entries = [entry("attn", "attn", "multi", HIGH, arch_key="A"),
               entry("attn-nocpe", "attn", "multi", LOW, cpe=False, arch_key="A"),
               entry("mlp", "mlp", "multi", HIGH, arch_key="B"),
               entry("mlp-other-nocpe", "mlp", "multi", LOW, cpe=False, arch_key="C")]
    f = judged(entries, 2)
    assert [c.claim for c in f.comparisons] == ["attn (CPE) > attn-nocpe (no CPE)"]
    assert f.verdict == "supported"
    assert any("mlp" in n for n in f.not_tested)


def test_hybrid_must_beat_each_pure_family():
    def f5(mlp_top1):
        entries = [entry("hybrid", "hybrid", "multi", HIGH), entry("conv", "conv", "multi", LOW),
                   entry("attn", "attn", "multi", LOW), entry("mlp", "mlp", "multi", mlp_top1)]
        return judged(entries, 5)

    assert f5(LOW).verdict == "supported"
    assert f5(NOISY_A).verdict == "inconclusive"  # the noisy rival inflates the pooled noise: nothing is decided
    f = f5([95.0, 95.2, 95.1])
    assert f.verdict == "mixed" and f.comparisons[2].verdict == "contradicted"


def test_hybrid_missing_rival_is_listed():
    f = judged([entry("hybrid", "hybrid", "multi", HIGH), entry("conv", "conv", "multi", LOW)], 5)
    assert len(f.comparisons) == 1
    assert any("attn" in n for n in f.not_tested) and any("mlp" in n for n in f.not_tested)


def test_mlp_overfit_on_generalisation_gap():
    big_gap, small_gap = [6.0, 6.3, 6.1], [1.0, 1.2, 0.9]
    entries = [entry("mlp-ss", "mlp", "single", HIGH, gap=big_gap, arch_key="S"),
               entry("mlp-ss-wide", "mlp", "single", HIGH, gap=[9.0, 9.4, 9.1], params=300_000),
               entry("mlp-ss-shared", "mlp", "single", HIGH, gap=small_gap, shared=True, arch_key="S"),
               entry("mlp-ms", "mlp", "multi", HIGH, gap=small_gap), entry("conv-ss", "conv", "single", HIGH, gap=0.5)]
    f = judged(entries, 3)
    assert [c.claim for c in f.comparisons] == [
        "gap mlp-ss-wide > gap mlp-ss (the larger MLP over-fits more)", "gap mlp-ss > gap mlp-ms (multi-stage relieves)",
        "gap mlp-ss > gap mlp-ss-shared (sharing relieves)"]
    assert f.verdict == "supported" and not f.not_tested


def test_mlp_overfit_untested_without_gap():
    entries = [entry("mlp", "mlp", "single", HIGH, gap=math.nan), entry("conv", "conv", "single", LOW, gap=math.nan)]
    f = judged(entries, 3)
    assert f.verdict == "untested" and "eval_train_subset" in f.summary


def test_accuracy_at_loss_interpolates_the_first_crossing():
    curve = [(2.0, 50.0), (1.0, 70.0), (0.5, 80.0)]
    assert accuracy_at_loss(curve, 1.5) == pytest.approx(60.0)
    assert accuracy_at_loss(curve, 0.5) == pytest.approx(80.0)
    assert math.isnan(accuracy_at_loss(curve, 0.1))


def test_conv_generalises_better_attention_fits_lower():
    # conv: higher test accuracy at every training loss; attention: reaches a lower training loss
    conv_curves = [[(1.0, 80.0 + s), (0.6, 86.0 + s), (0.5, 88.0 + s)] for s in (0.0, 0.2, 0.1)]
    attn_curves = [[(1.0, 75.0 + s), (0.5, 82.0 + 2 * s), (0.3 + s / 10, 85.0 + s)] for s in (0.0, 0.2, 0.1)]
    entries = [entry("conv", "conv", "single", [88.0, 88.2, 88.1], losses=conv_curves),
               entry("attn", "attn", "single", [85.0, 85.2, 85.1], losses=attn_curves)]
    f = judged(entries, 4)
    equal, fit = f.comparisons
    assert "at training loss 0.500" in equal.note
    assert equal.mean_a == pytest.approx(88.1) and equal.mean_b == pytest.approx(82.2)
    assert equal.verdict == "supported" and fit.verdict == "supported" and fit.margin == 0.0
    assert f.verdict == "supported"


def test_arms_keep_comparisons_apart_and_questions_follow_their_arm():
    entries = [entry("conv-ms", "conv", "multi", HIGH), entry("conv-ss", "conv", "single", LOW, arm="scarce"),
               entry("mlp-ms", "mlp", "multi", HIGH, arm="scarce"), entry("mlp-ss", "mlp", "single", LOW, arm="scarce")]
    findings = judge(entries, study(entries, questions=["multi-stage"], arms={"scarce": ["hybrid"]},
                                    elsewhere={"mlp-overfit": "medium"}))
    assert [(f.number, f.arm, f.verdict) for f in findings] == [(1, "main", "untested"), (3, "main", "elsewhere"),
                                                                 (5, "scarce", "untested")]
    assert "docs/battles/medium/report.md" in findings[1].summary
    [f1] = [f for f in judge(entries, study(entries, arms={"scarce": ["multi-stage"]})) if f.number == 1]
    assert [c.claim for c in f1.comparisons] == ["mlp-ms > mlp-ss"]  # conv-ss (scarce) never meets conv-ms (main)


def test_untested_findings_name_the_contestants_needed():
    findings = judge([entry("conv", "conv", "single", HIGH)], study([entry("conv", "conv", "single", HIGH)]))
    assert [f.verdict for f in findings] == ["untested"] * 5
    assert "single-stage and a multi-stage" in findings[0].summary


def test_size_crossover_when_asked():
    entries = [entry(f"{f}-{s}", f, "multi", [v + d for d in (0.0, 0.3, 0.1)], params=p)
               for f, vals in {"mlp": (80, 82, 83), "conv": (78, 85, 86), "attn": (70, 84, 90)}.items()
               for s, v, p in zip("SML", vals, (1e5, 3e5, 9e5))]
    f = judged(entries, 6, questions=["size-crossover"])
    assert [c.claim for c in f.comparisons][:2] == ["size 1/3: mlp-S > conv-S", "size 1/3: mlp-S > attn-S"]
    assert len(f.comparisons) == 6 and f.verdict == "supported"


def test_outside_baselines_are_not_paired():
    entries = [entry("resnet", "outside", "-", HIGH), entry("conv-ss", "conv", "single", LOW)]
    assert all(f.verdict == "untested" for f in judge(entries, study(entries)))


def test_cost_mismatch_is_noted():
    entries = [entry("conv-ms", "conv", "multi", HIGH, macs=10_000_000), entry("conv-ss", "conv", "single", LOW)]
    assert "MACs differ x10.0" in judged(entries, 1).comparisons[0].note


def test_per_image_predictions_add_the_test_set_noise(tmp_path):
    """With stored predictions the same accuracy table gives a wider interval (the shared test set's noise)."""
    rng = np.random.default_rng(0)
    entries = [entry("conv-ms", "conv", "multi", [90.0, 90.1, 90.2]), entry("conv-ss", "conv", "single", [89.4, 89.6, 89.5])]
    before = judged(entries, 1).comparisons[0].test.se
    for e in entries:
        for r in e.runs:
            r.folder = tmp_path / e.name / str(r.seed)
            r.folder.mkdir(parents=True)
            label = np.zeros(2000, np.int16)
            pred = np.where(rng.random(2000) < 0.9, label, 1).astype(np.int16)
            np.savez(r.folder / "predictions.npz", pred=pred, label=label)
    after = judged(entries, 1).comparisons[0].test
    assert after.images == 2000 and after.image_term > 0 and after.se > before

"""False-decision rate and power of the battle's statistics (spach.battle.stats) on simulated studies.

Each design: 8 contestants x S seeds, a shared seed effect (sd 0.3), a run-to-run seed sd, 0/1
correctness on a 10k-image test set at ~90% top-1 (tests/stats_sim.py: contestants err on partly
different images), a finding = three disjoint pairs judged together (Holm), margin 0.5 points. Every
design is judged with the test-set term (per-image predictions) and without it (accuracies only).

    false/comp, false/finding   identical contestants: supported or contradicted, per comparison and
                                per finding (any of its three): should be <= 0.05
    equiv@0                     identical contestants called equivalent (power of TOST)
    power@1, power@0.7          all three pairs differ by 1 (0.7) point: supported
    MDD                         median minimal detectable difference (80% power, level 0.05/3)

The last block breaks pooling's assumption: one pair, judged alone (no Holm), is noisier than the
study's six other contestants (sd 0.3). "pooled" is the pooled noise alone; "own" judges the pair with its own
paired noise (seed_noise of its two rows: the paired t-test, S - 1 df, plus the test-set term); "moderated" is
the battle's test (stats.pair_test: the pair's own noise moderated toward the pooled one). The whole
sequential procedure (looks and allocation) is calibrated in tests/test_sequential.py.

    .venv/bin/python benchmarks/stats_calibration.py [--studies 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from spach.battle.sequential import decide
from spach.battle.stats import compare, pair_test, seed_noise

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(0, 1), (2, 3), (4, 5)]
C = 8


def load_simulator():
    spec = importlib.util.spec_from_file_location("stats_sim", ROOT / "tests" / "stats_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.simulate


def judge(studies, mode: str, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Verdicts and MDDs (n, pairs) of the finding `pairs`; mode: 'images' (test-set term), 'blind'
    (none), 'own' (the pair's own paired noise, with the test-set term)."""
    verdicts, mdd = [], []
    for acc, correct in studies:
        noise = seed_noise(acc)
        if mode == "moderated":  # the battle's test: the pair's own noise moderated toward the pooled one
            tests = [pair_test(acc, acc[a], acc[b], correct[a], correct[b]) for a, b in pairs]
        else:
            tests = [compare(acc[a], acc[b], seed_noise(acc[[a, b]]) if mode == "own" else noise,
                             *((correct[a], correct[b]) if mode != "blind" else ())) for a, b in pairs]
        found = decide(tests, [True] * len(pairs)).comparisons
        verdicts.append([d.verdict for d in found])
        mdd.append([d.mdd for d in found])
    return np.array(verdicts), np.array(mdd)


def rates(simulate, rng, n: int, seeds: int, sd, modes: list[str], pairs=PAIRS) -> dict[str, dict[str, float]]:
    null = list(simulate(rng, n, [0.0] * C, seeds, sd))
    big = list(simulate(rng, n, [1.0, 0, 1.0, 0, 1.0, 0, 0, 0], seeds, sd))
    mid = list(simulate(rng, n, [0.7, 0, 0.7, 0, 0.7, 0, 0, 0], seeds, sd))
    out = {}
    for mode in modes:
        v, mdd = judge(null, mode, pairs)
        wrong = np.isin(v, ("supported", "contradicted"))
        out[mode] = {"false/comp": wrong.mean(), "false/finding": wrong.any(axis=1).mean(),
                     "equiv@0": (v == "equivalent").mean(), "power@1": (judge(big, mode, pairs)[0] == "supported").mean(),
                     "power@0.7": (judge(mid, mode, pairs)[0] == "supported").mean(), "MDD": float(np.nanmedian(mdd))}
    return out


COLUMNS = ["false/comp", "false/finding", "equiv@0", "power@1", "power@0.7", "MDD"]


def row(label: str, values: dict[str, float]) -> str:
    return label + "".join(f"{values[c]:>15.3f}" for c in COLUMNS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=1000, help="simulated studies per design and effect")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    simulate, rng = load_simulator(), np.random.default_rng(args.seed)
    _, correct = next(simulate(rng, 1, [0.0] * C, 2, 0.3))
    print(f"simulated test set: two runs of one contestant disagree on {(correct[0, 0] != correct[0, 1]).mean():.1%} "
          f"of the images, two contestants on {(correct[0, 0] != correct[1, 0]).mean():.1%}; {args.studies} studies "
          "per design and effect\n")
    head = f"{'seeds':>5} {'sd':>5} {'test-set term':>14}" + "".join(f"{c:>15}" for c in COLUMNS)
    print(head)
    for seeds in (2, 3, 4, 5):
        for sd in (0.2, 0.3, 0.45, 0.6):
            found = rates(simulate, rng, args.studies, seeds, sd, ["images", "blind"])
            for mode, label in (("images", "yes"), ("blind", "no")):
                print(row(f"{seeds:>5} {sd:>5} {label:>14}", found[mode]))
    print("\none pair noisier than the rest, judged alone (the six others at sd 0.3; sd: the pair's):")
    print(head.replace("test-set term", "pair's noise"))
    for seeds in (3, 5):
        for sd in (0.3, 0.45, 0.6):
            found = rates(simulate, rng, args.studies, seeds, [sd] * 2 + [0.3] * 6, ["images", "own", "moderated"], [(0, 1)])
            for mode, label in (("images", "pooled"), ("own", "own (paired)"), ("moderated", "moderated")):
                print(row(f"{seeds:>5} {sd:>5} {label:>14}", found[mode]))


if __name__ == "__main__":
    main()

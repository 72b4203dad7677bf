"""Re-judge a committed battle report whose per-image predictions were not kept (docs/battles/*), for its
test top-1 comparisons, with the statistics of the code you run it with.

The test-set term of each pair is not in the report, so it is backed out of the committed 95% interval
with the code that made the report (`--made-by`: the src folder of that commit, e.g. from
`git worktree add /tmp/made 5d4ea24`), and held fixed at every look (an approximation: the real term is
re-estimated at every look). The interval is not monotone in the term, so where two terms give it, the
one whose replay reproduces the committed p is taken. Then the looks (looks.jsonl on the runs of
results.jsonl, the n_max of plan.json) are replayed with both codes: the made-by replay should give the
committed verdicts (printed when it does not), the current one the re-judged verdicts. A comparison the
new test leaves open after the report's code decided it got no more seeds in these runs, so its replay
stops there: what the battle would then have done is not in the folder.

    .venv/bin/python benchmarks/rejudge.py docs/battles/medium --made-by /tmp/made/src
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np


def _load(folder: Path) -> dict:
    study = json.loads((folder / "study.json").read_text())
    vals: dict[str, dict[int, float]] = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("status") == "done":
            vals.setdefault(r["contestant"], {})[r["seed"]] = r["final_top1"]
    looks = [json.loads(x) for x in (folder / "looks.jsonl").read_text().splitlines() if x.strip()]
    findings = [dict(f, comparisons=[c for c in f["comparisons"] if c["metric"] == "test top-1 (%)"])
                for f in json.loads((folder / "findings.json").read_text())]
    return dict(study=study, vals=vals, looks=looks, plan=json.loads((folder / "plan.json").read_text()),
                findings=[f for f in findings if f["comparisons"] and f["verdict"] != "untested"])


def _worker(mode: str, folder: str, terms: dict[str, list[float]], pick: dict[str, int]) -> dict:
    """Runs in a process whose sys.path starts with the src to judge with."""
    from scipy import optimize, special

    from spach.battle import stats
    from spach.battle.afford import Plan
    from spach.battle.sequential import Track, step
    from spach.battle.spending import DEFAULT, Spending

    d = _load(Path(folder))
    study, looks, plan = d["study"], d["looks"], Plan.from_json(d["plan"])
    arm = {c["name"]: c.get("arm") or "main" for c in study["contestants"]}
    function = study.get("spending") or DEFAULT

    def row(c: str, look: int) -> np.ndarray:
        k = looks[look]["seeds"].get(c, 0)
        return np.array([d["vals"].get(c, {}).get(s, math.nan) if i < k else math.nan for i, s in enumerate(study["seeds"])])

    def spend(a: str, b: str) -> Spending:
        return Spending(study["alpha"], plan.first_wave, plan.n_max(a, b), function)

    def noise(a: str, b: str, look: int) -> stats.SeedNoise:
        table = [row(x, look) for x in arm if arm[x] == arm[a] and x in looks[look]["seeds"]]
        return stats.moderated(stats.seed_noise([row(a, look), row(b, look)]), stats.seed_noise(table), spend(a, b).prior_df)

    if mode == "backout":
        out = {}
        for f in d["findings"]:
            for c in f["comparisons"]:
                a, b = c["a"], c["b"]
                n = sum(x is not None and y is not None for x, y in zip(c["a_values"], c["b_values"]))
                look = next(i for i, lk in enumerate(looks) if min(lk["seeds"].get(a, 0), lk["seeds"].get(b, 0)) >= n)
                nz = noise(a, b, look)
                seed_term, half = 2 * nz.var / n, (c["ci"][1] - c["ci"][0]) / 2

                def excess(term: float) -> float:
                    se, df = stats._satterthwaite(seed_term, nz.df, term, 10_000)  # the made-by code's test
                    return float(special.stdtrit(df, 0.975)) * se - half
                grid = np.linspace(0.0, half * half, 4001)
                ex = [excess(x) for x in grid]
                out[f"{a}|{b}"] = [optimize.brentq(excess, grid[i], grid[i + 1]) for i in range(len(grid) - 1)
                                   if ex[i] * ex[i + 1] < 0] or [0.0]
        return out
    image = {k: v[min(pick.get(k, 0), len(v) - 1)] for k, v in terms.items()}
    tracks = {(f["number"], j): Track() for f in d["findings"] for j in range(len(f["comparisons"]))}
    result = {}
    for look in range(len(looks)):
        for f in d["findings"]:
            cs = f["comparisons"]
            tests = [stats.compare(row(c["a"], look), row(c["b"], look), noise(c["a"], c["b"], look), margin=study["margin"],
                                   alpha=study["alpha"], image=(image[f"{c['a']}|{c['b']}"], 10_000)) for c in cs]
            decisions = step([tracks[f["number"], j] for j in range(len(cs))], tests, [True] * len(cs),
                             [spend(c["a"], c["b"]) for c in cs], look + 1)
            for c, dec in zip(cs, decisions):
                result[f"{c['a']}|{c['b']}"] = dict(finding=f["number"], verdict=dec.verdict, look=dec.look, n=dec.test.seeds,
                                                    diff=dec.test.diff, ci=list(dec.test.ci95), p=round(dec.p_diff_holm, 3),
                                                    report=[c["verdict"], round(c["p"], 3)])
    return result


def _run(src: str, mode: str, folder: Path, terms: dict | None = None, pick: dict | None = None) -> dict:
    args = json.dumps([mode, str(folder), terms or {}, pick or {}])
    code = f"import sys, json; sys.path.insert(0, {src!r}); sys.path.insert(1, {str(Path(__file__).parent)!r}); " \
           f"import rejudge; print(json.dumps(rejudge._worker(*json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"rejudge: {mode} with {src} failed on {folder}: {last} (is it a battle folder with study.json, "
              "results.jsonl, looks.jsonl, plan.json and findings.json, and the src of the code that made it?)", file=sys.stderr)
        sys.exit(2)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--made-by", required=True, help="src folder of the commit that made the report")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"), help="src to re-judge with")
    a = ap.parse_args()
    terms = _run(a.made_by, "backout", a.folder)
    first, second = (_run(a.made_by, "replay", a.folder, terms, {k: i for k in terms}) for i in (0, 1))
    pick = {k: int(abs(second[k]["p"] - second[k]["report"][1]) < abs(first[k]["p"] - first[k]["report"][1])) for k in terms}
    old, new = _run(a.made_by, "replay", a.folder, terms, pick), _run(a.src, "replay", a.folder, terms, pick)
    for k in terms:
        o, n = old[k], new[k]
        made = "" if (o["verdict"], o["p"]) == tuple(o["report"]) else f"; made-by replay {o['verdict']} (p {o['p']})"
        print(f"finding {o['finding']} {k.replace('|', ' vs ')}: report {o['report'][0]} (p {o['report'][1]}){made} -> "
              f"{n['verdict']} at look {n['look']}, {n['n']} seeds, {n['diff']:+.2f} [{n['ci'][0]:+.2f}, {n['ci'][1]:+.2f}], "
              f"p {n['p']}")

if __name__ == "__main__":
    main()

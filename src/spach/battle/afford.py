"""What a sequential battle can afford on the machine it runs on, decided before any run trains.

- **Run costs.** Each contestant's training step and evaluation pass are timed here (at its recipe's
  batch size, precision and the threads one job gets); a run's cost is its epochs of training images at
  that rate, its scored epochs' images at the evaluation rate, and a fixed start-up. Once runs of a
  contestant have finished, their measured times replace the prediction, and every prediction is scaled
  by how much slower than predicted the finished runs were (a machine slower than it measured).
- **Findings in rank order.** A study's `rank` (default: its questions as asked, arm by arm) orders its
  findings by importance. The first
  wave (`first_wave` seeds of every contestant a finding compares) is taken for whole findings, in that
  order, while it fits the budget; a finding that does not fit is skipped (a later, cheaper one may), and
  the report names it with what it would take here. Epochs, data and contestants are never changed to fit.
- **n_max.** The most seeds a comparison can reach is fixed here too, from the budget and the run costs
  (costs are not outcomes, so fixing it before the first look keeps the spending valid): the first wave
  plus every further seed of its pair that the budget left after the first wave could pay for, at most
  the study's seed list. Its alpha is spent along t = n / n_max, all of it at n_max
  (`spach.battle.spending`).

The plan is written to `plan.json` before the first run, with the machine it was measured on; a
resumed battle keeps it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spach.battle.budget import REPORT_RESERVE_S, Budget
from spach.battle.plan import epoch_images
from spach.battle.pairs import TESTS
from spach.battle.questions import FINDINGS, QUESTION_KEYS
from spach.battle.results import ContestantResult, contestant_entries
from spach.battle.study import Study
from spach.files import atomic_write_text, read_json, warn_once
from spach.humanize import hms
from spach.train.config import scores_epoch

PLAN_FILE = "plan.json"
# DeiT-B (17.6 GMACs) trains 300 epochs of ImageNet in 53 h on 8 V100s (DeiT paper): ~26 TFLOP/s per GPU
# at 6 FLOPs (2 x forward + backward) per MAC.
V100_TRAIN_FLOPS = 26e12
STARTUP_S = 3.0  # a run's start in a warm worker: data in memory, model built, folder and logs opened
WORKER_START_S = 20.0  # a battle's worker processes start once (torch imported, the data read): measured 20 s on a 2-core AMD EPYC


def available_cores() -> int:
    """CPU cores this process may run on (`taskset` and cgroup CPU sets included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_seconds(study: Study, name: str, costs: dict[str, dict[str, Any]]) -> float:
    """Predicted seconds of one run of contestant `name` on this machine, from its measured rates; without
    them (runs that train elsewhere, e.g. Slurm GPUs) from its MACs at the training rate of a V100."""
    c = next(c for c in study.contestants if c.name == name)
    cfg = study.config(c)
    k = costs.get(name, {})
    train, infer = k.get("train_img_s"), k.get("eval_img_s")
    n_train, scored = epoch_images(cfg)
    scored_epochs = sum(scores_epoch(cfg, e) for e in range(1, cfg.epochs + 1))
    if _rate(train) and _rate(infer):
        return STARTUP_S + cfg.epochs * n_train / train + scored_epochs * scored / infer
    if _rate(k.get("macs")):
        return (cfg.epochs * n_train * 6 + scored_epochs * scored * 2) * k["macs"] / V100_TRAIN_FLOPS
    return math.inf


def _rate(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass
class FindingPlan:
    """One finding as the plan sees it: its contestants, its first wave's cost, and whether it fits."""

    arm: str
    key: str
    number: int
    contestants: list[str]
    first_wave_s: float  # its contestants' first wave alone, wall seconds here
    admitted: bool = False
    why: str = ""


@dataclass
class Plan:
    budget: str
    kind: str  # the budget's kind: "wall", "runs", "gpu-h"
    amount: float  # the budget, in its unit
    run_s: dict[str, float]  # predicted cost of one run of each contestant, in the budget's unit
    slots: int  # runs at once
    first_wave: int
    most: int  # the study's seed list
    findings: list[FindingPlan] = field(default_factory=list)
    contestants: list[str] = field(default_factory=list)  # admitted, in the order their runs go
    first_wave_s: float = 0.0
    before: float = 0.0  # budget already used when the plan was made (start-up, the costs), in its unit
    machine: str = ""
    made: str = ""

    @property
    def sharing(self) -> int:
        """How many runs share one unit of the budget: wall time is shared by the `slots` runs that go at once;
        run attempts and GPU hours are spent by every run whatever runs beside it."""
        return max(self.slots, 1) if self.kind == "wall" else 1

    def pair_cost(self, a: str, b: str) -> float:
        """One more seed of both, in the budget's unit."""
        return (self.run_s.get(a, math.inf) + self.run_s.get(b, math.inf)) / self.sharing

    def n_max(self, a: str, b: str) -> int:
        """The most seeds comparison a vs b can reach: the first wave and what the budget left after it
        could buy of the pair, at most the study's seeds."""
        reserve = REPORT_RESERVE_S if self.kind == "wall" else 0.0
        room = max(0.0, self.amount - reserve - self.before - self.first_wave_s)
        cost = self.pair_cost(a, b)
        extra = int(room // cost) if cost > 0 and math.isfinite(cost) else 0
        return max(min(self.most, self.first_wave + extra), min(self.first_wave, self.most))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "Plan | None":
        """A plan read back (None when it is not one)."""
        try:
            d = dict(d)
            d["findings"] = [FindingPlan(**f) for f in d.get("findings", [])]
            plan = cls(**d)
        except (TypeError, ValueError, AttributeError):
            return None
        ok = (isinstance(plan.run_s, dict) and all(isinstance(v, (int, float)) and v >= 0 for v in plan.run_s.values())
              and isinstance(plan.slots, int) and plan.slots >= 1 and isinstance(plan.most, int) and plan.most >= 1
              and isinstance(plan.first_wave, int) and isinstance(plan.amount, (int, float)) and math.isfinite(plan.amount)
              and isinstance(plan.first_wave_s, (int, float)) and math.isfinite(plan.first_wave_s)
              and all(isinstance(c, str) for c in plan.contestants))
        return plan if ok else None


def finding_contestants(study: Study, entries: list[ContestantResult]) -> list[FindingPlan]:
    """Every finding the study asks, in rank order (the study's questions, arm by arm), with the
    contestants its comparisons use (known from the contestants' facts before any run)."""
    out = []
    for arm in study.arm_names():
        members = [e for e in entries if e.arm == arm]
        for key in study.questions_of(arm):
            number = QUESTION_KEYS[key]
            pairs, _ = TESTS[number](members)
            names = list(dict.fromkeys(n for p in pairs for n in (p.a.name, p.b.name)))
            out.append(FindingPlan(arm, key, number, names, 0.0))
    rank = {k: i for i, k in enumerate(study.rank)}  # the study's order first; the rest as asked, arm by arm
    return sorted(out, key=lambda f: rank.get(f.key, len(rank)))


def make_plan(study: Study, budget: Budget, costs: dict[str, dict[str, Any]], slots: int,
              done: dict[str, int] | None = None, used: float = 0.0) -> Plan:
    """Admit the study's findings in rank order while their first wave fits what is left of the budget
    (`used`: already spent, e.g. on measuring the costs; runs already done count as paid); contestants of
    no finding come last, when they fit too."""
    done = done or {}
    entries = contestant_entries(study, costs)
    if budget.kind == "runs":
        run_s = {c.name: 1.0 for c in study.contestants}
    else:
        scale = 1.0 if budget.kind == "wall" else 1 / 3600
        run_s = {c.name: run_seconds(study, c.name, costs) * scale for c in study.contestants}
    plan = Plan(budget.text, budget.kind, budget.amount, run_s, slots, study.first_wave, len(study.seeds),
                before=used, machine=f"{cpu_name()}, {available_cores()} core(s), load average {os.getloadavg()[0]:.1f}",
                made=time.strftime("%Y-%m-%d %H:%M"))
    reserve = REPORT_RESERVE_S if budget.kind == "wall" else 0.0
    room = budget.amount - reserve - used
    findings = finding_contestants(study, entries)
    taken: list[str] = []

    start = WORKER_START_S if budget.kind == "wall" else 0.0

    def wave_cost(names: list[str]) -> float:
        runs = sum(max(0, study.first_wave - done.get(n, 0)) * run_s[n] for n in names) / plan.sharing
        return runs + start if runs else 0.0

    for f in findings:
        f.first_wave_s = wave_cost(f.contestants)
        grown = taken + [n for n in f.contestants if n not in taken]
        if not f.contestants:
            f.why = "no two contestants of this study make one of its comparisons"
        elif not all(math.isfinite(run_s[n]) for n in f.contestants):
            f.why = "a contestant's run time could not be measured"
        elif wave_cost(grown) <= room:
            f.admitted, taken = True, grown
        else:
            f.why = (f"its first wave ({study.first_wave} seed(s) of {len(f.contestants)} contestants) would take "
                     f"{budget.show(f.first_wave_s)} here, and {budget.show(max(room - wave_cost(taken), 0))} of the budget "
                     f"was left for it: a budget of about {budget.show_at_least(wave_cost(grown) + reserve + used)} would test it")
    extra = [c.name for c in study.contestants if c.name not in taken and not any(c.name in f.contestants for f in findings)]
    for name in extra:  # a contestant no finding compares (a baseline for the tables): last, if it fits
        if math.isfinite(run_s[name]) and wave_cost(taken + [name]) <= room:
            taken.append(name)
    plan.findings, plan.contestants, plan.first_wave_s = findings, taken, wave_cost(taken)
    return plan


def read_plan(out: Path) -> Plan | None:
    """The recorded plan; None when there is none, or (said once on stderr) when the file is not one."""
    path = Path(out) / PLAN_FILE
    raw = read_json(path)
    plan = None if raw is None else Plan.from_json(raw)
    if raw is not None and plan is None:
        warn_once(path, "not a plan a battle wrote (its fields have the wrong types): ignored")
    return plan


def write_plan(out: Path, plan: Plan) -> None:
    atomic_write_text(Path(out) / PLAN_FILE, json.dumps(plan.to_json(), indent=1) + "\n")


def describe_plan(plan: Plan, study: Study) -> list[str]:
    """The plan in lines (the dry run and the battle's start)."""
    show = Budget(plan.kind, plan.amount, plan.budget).show
    lines = []
    for f in plan.findings:
        title = FINDINGS[f.number][1]
        if f.admitted:
            lines.append(f"  {f.key} ({f.arm}): tested: {len(f.contestants)} contestants, first wave {show(f.first_wave_s)} alone")
        else:
            lines.append(f"  {f.key} ({f.arm}): NOT tested: {f.why} ({title})")
    return lines


def predicted_costs(plan: Plan, measured: dict[str, list[float]]) -> dict[str, float]:
    """What one more run of each contestant costs: the mean of its finished runs, else the plan's
    prediction scaled by how much the finished runs of all contestants exceeded theirs (>= 1)."""
    ratios = [sum(v) / len(v) / plan.run_s[k] for k, v in measured.items()
              if v and plan.run_s.get(k) and math.isfinite(plan.run_s[k])]
    slow = max(1.0, sum(ratios) / len(ratios)) if ratios else 1.0
    return {k: (sum(measured[k]) / len(measured[k]) if measured.get(k) else s * slow) for k, s in plan.run_s.items()}


def seconds_text(s: float) -> str:
    return hms(s) if math.isfinite(s) else "unknown"

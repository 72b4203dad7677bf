"""The budget as a wall and the scoring the budget buys: a run stops at its deadline with a checkpoint
that resumes to the uninterrupted run, a run scores only the epochs --eval-every asks for with the same
weights, and a sequential battle with a budget far below its work ends within it."""
import io
import json
import math
import re
import time

import pytest
import torch

from spach.battle.afford import FindingPlan, Plan, make_plan, predicted_costs, read_plan, write_plan
from spach.battle.budget import Budget, Clock
from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.train import engine
from test_engine import records, tiny_cfg, without_timing


def test_eval_every_scores_fewer_epochs_and_trains_the_same_weights(tmp_path):
    full = engine.train(tiny_cfg(tmp_path / "a", epochs=4, eval_train_subset=16))
    some = engine.train(tiny_cfg(tmp_path / "b", epochs=4, eval_train_subset=16, eval_every=0))
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert all("top1" in r for r in a) and ["top1" in r for r in b] == [False, False, False, True]
    assert ["train_eval_loss" in r for r in b] == [False, False, False, True]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # training does not depend on scoring
    assert full["final_top1"] == some["final_top1"] and (tmp_path / "b" / "predictions.npz").is_file()
    assert without_timing(a)[-1] == without_timing(b)[-1]
    two = records(tmp_path / "c") if engine.train(tiny_cfg(tmp_path / "c", epochs=4, eval_every=2)) else None
    assert ["top1" in r for r in two] == [False, True, False, True]


def test_a_run_stops_at_its_deadline_and_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    ref = engine.train(tiny_cfg(tmp_path / "ref", epochs=3))
    clock = {"t": 1000.0}
    steps = {"n": 0}
    real_step = engine.step_loss

    def step(*a, **k):  # the clock advances one second per training step
        steps["n"] += 1
        clock["t"] += 1.0
        return real_step(*a, **k)

    monkeypatch.setattr(engine, "step_loss", step)
    monkeypatch.setattr(engine.time, "time", lambda: clock["t"])
    with pytest.raises(engine.Deadline, match="stopped at its deadline"):
        engine.train(tiny_cfg(tmp_path / "cut", epochs=3, deadline=1000.0 + 5))
    assert steps["n"] == 5 and (tmp_path / "cut" / "checkpoint.pth").is_file()
    with pytest.raises(engine.Deadline, match="not started"):
        engine.train(tiny_cfg(tmp_path / "late", epochs=3, deadline=999.0))
    assert not (tmp_path / "late" / "checkpoint.pth").exists()
    monkeypatch.undo()
    done = engine.train(tiny_cfg(tmp_path / "cut", epochs=3, resume="auto"))
    assert done["final_top1"] == ref["final_top1"]
    assert [r["train_loss"] for r in records(tmp_path / "cut")] == pytest.approx(
        [r["train_loss"] for r in records(tmp_path / "ref")], abs=1e-5)


def _plan(**kw) -> Plan:
    base = dict(budget="10m", kind="wall", amount=600.0, run_s={"a": 60.0, "b": 60.0, "c": 30.0}, slots=2, first_wave=2,
                most=10, contestants=["a", "b", "c"], first_wave_s=150.0)
    return Plan(**{**base, **kw})


def test_n_max_is_what_the_budget_left_after_the_first_wave_buys():
    plan = _plan()
    # room: 600 - 30 (report) - 150 = 420 s; a pair of 60 s runs on 2 slots costs 60 s a seed: 7 more
    assert plan.n_max("a", "b") == 9 and plan.n_max("a", "c") == 10  # capped by the study's seeds
    assert _plan(amount=200.0).n_max("a", "b") == 2  # nothing left: the first wave is its last look
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert Plan.from_json({**plan.to_json(), "slots": "two"}) is None and Plan.from_json([1]) is None
    # runs and GPU hours are spent by every run whatever runs beside it: more slots buy no more seeds
    runs = dict(budget="20 runs", kind="runs", amount=20.0, run_s={"a": 1.0, "b": 1.0, "c": 1.0}, first_wave_s=6.0)
    assert _plan(**runs, slots=1).n_max("a", "b") == _plan(**runs, slots=24).n_max("a", "b") == 9  # 2 + 14 // 2


def test_a_plan_file_that_is_not_one_is_ignored_with_one_line(tmp_path, capsys):
    write_plan(tmp_path, _plan())
    assert read_plan(tmp_path) == _plan() and capsys.readouterr().err == ""
    (tmp_path / "plan.json").write_text(json.dumps({**_plan().to_json(), "run_s": {"a": "fast"}}))
    assert read_plan(tmp_path) is None and read_plan(tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.json: not a plan a battle wrote" in err


def test_a_record_of_used_time_that_lies_is_said_in_one_line(tmp_path, capsys):
    """budget.json is what an interrupted battle used; one that is not a record the battle wrote is named
    once on stderr (it cannot be counted), one that is counts, and none (a new folder) says nothing."""
    wall = Budget("wall", 600.0, "10m")
    assert Clock(wall, tmp_path).before == 0.0 and capsys.readouterr().err == ""
    (tmp_path / "budget.json").write_text('{"used_s": 42.5, "budget": "wall"}')
    assert Clock(wall, tmp_path).before == 42.5 and capsys.readouterr().err == ""
    for i, lie in enumerate(('{"used_s": "lots"}', '{"used_s": -3}', "not json", "[1, 2]")):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "budget.json").write_text(lie)
        assert Clock(wall, tmp_path / str(i)).before == 0.0 and Clock(wall, tmp_path / str(i)).before == 0.0
        err = capsys.readouterr().err  # once per process
        assert err.count("\n") == 1 and "budget.json: is not the record of used time" in err, lie


def test_predicted_costs_follow_the_finished_runs():
    plan = _plan()
    assert predicted_costs(plan, {}) == plan.run_s
    cost = predicted_costs(plan, {"a": [120.0, 120.0]})  # a machine twice as slow as measured
    assert cost["a"] == 120.0 and cost["b"] == 120.0 and cost["c"] == 60.0


STUDY = """
[study]
name = "wall"
seeds = [0, 1, 2, 3]
budget = "{budget}"
first_wave = 2
jobs = 1
questions = ["local-modeling", "multi-stage"]

[data]
dataset = "tiny"
[recipe]
epochs = 2
batch_size = 16
lr = 2e-3
lr_base_size = 0
warmup_epochs = 0
mixup = 0.0
cutmix = 0.0
aa = "none"
reprob = 0.0
repeated_aug = 1
model_ema = false
drop_path = 0.0
eval_every = 0

[[contestant]]
name = "attn"
arch = {{ net_arch = [["attn", 1]], hidden_dim = 16, patch_size = 4, num_heads = 1 }}
[[contestant]]
name = "attn-nocpe"
arch = {{ net_arch = [["attn", 1]], hidden_dim = 16, patch_size = 4, num_heads = 1, cpe = false, pos_embed = true }}
[[contestant]]
name = "attn-ms"
arch = {{ net_arch = [[["conv", 1]], [["attn", 1]]], hidden_dim = 16, patch_size = 4, num_heads = 1 }}
"""


def test_findings_are_taken_in_rank_order_while_their_first_wave_fits():
    study = parse_study(STUDY.format(budget="70s"))
    costs = {n: {"family": "attn", "layout": "single", "cpe": True, "shared": False, "arch_key": "x",
                 "train_img_s": 1000.0, "eval_img_s": 1000.0, "macs": 1e6} for n in ("attn", "attn-nocpe", "attn-ms")}
    costs["attn-nocpe"].update(cpe=False)
    costs["attn-ms"].update(layout="multi", arch_key="y")
    # one run: 3 s start + 2 epochs x 256 images / 1000 img/s + 64 scored / 1000 = ~3.6 s; a first wave of two
    # contestants x 2 seeds ~14 s, of three ~21 s, each plus the workers' 20 s start; the 70 s budget keeps 30 s
    # for the report, so 40 s: two contestants fit (34 s), three (41 s) do not
    plan = make_plan(study, Budget("wall", 70.0, "70s"), costs, 1)
    taken = [(f.key, f.admitted) for f in plan.findings]
    assert taken == [("local-modeling", True), ("multi-stage", False)]
    assert "a budget of about" in plan.findings[1].why and plan.contestants == ["attn", "attn-nocpe"]
    more = make_plan(study, Budget("wall", 120.0, "2m"), costs, 1)
    assert all(f.admitted for f in more.findings) and set(more.contestants) == {"attn", "attn-nocpe", "attn-ms"}
    assert isinstance(more.findings[0], FindingPlan) and math.isfinite(more.first_wave_s)


def test_the_budget_a_finding_is_told_it_would_need_admits_it():
    """'a budget of about M:SS would test it' is rounded up: planned with that budget, the finding is tested
    (rounded to the nearest second it could name a budget a fraction of a second short, even the one it had)."""
    study = parse_study(STUDY.format(budget="70s"))
    costs = {n: {"family": "attn", "layout": "single", "cpe": True, "shared": False, "arch_key": "x",
                 "train_img_s": 1000.0, "eval_img_s": 1000.0, "macs": 1e6} for n in ("attn", "attn-nocpe", "attn-ms")}
    costs["attn-nocpe"].update(cpe=False)
    costs["attn-ms"].update(layout="multi", arch_key="y")
    why = make_plan(study, Budget("wall", 70.0, "70s"), costs, 1).findings[1].why
    m, s = re.search(r"a budget of about (\d+):(\d\d) would test it", why).groups()
    named = 60 * int(m) + int(s)
    assert all(f.admitted for f in make_plan(study, Budget("wall", float(named), f"{named}s"), costs, 1).findings)
    assert Budget("wall", 1.0, "1s").show_at_least(299.2) == "5:00" and Budget("wall", 1.0, "1s").show(300.4) == "5:00"
    assert Budget("wall", 1.0, "1s").show_at_least(300.4) == "5:01"
    assert Budget("gpu-h", 1.0, "1 gpu-h").show_at_least(2.01) == "2.1 GPU-h"


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50s", "80s"])
def test_a_battle_ends_within_a_budget_far_below_its_work(tmp_path, budget):
    """The whole study would take minutes; the battle (costs, runs, looks, report) stays within the budget:
    what the plan cannot afford is not started, and a run in flight stops at the deadline."""
    torch.set_num_threads(1)
    study = parse_study(STUDY.format(budget=budget).replace("epochs = 2", "epochs = 60"))
    log = io.StringIO()
    t0 = time.time()
    run_battle(study, tmp_path / "b", stream=log)
    took = time.time() - t0
    said = log.getvalue()
    assert took <= float(budget[:-1]) + 3, (took, said)
    report = (tmp_path / "b" / "report.md").read_text()
    assert "not afforded by the budget here" in report or "budget's wall" in said, said

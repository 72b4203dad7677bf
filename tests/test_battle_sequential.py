"""The sequential battle on real (tiny) runs: looks recorded and shown in the report, a killed battle
resumed to the same plan, and the batch launchers submitting each wave when a look asks for it."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_group, run_process, spawn
from test_slurm import STUDY as JOB_STUDY  # a fixed two-seed study
from test_slurm import _events, _metrics, fake_slurm_on_path, jobs_env, same_metrics  # noqa: F401 (fixtures)

from spach.battle.launchers import SubmititLauncher, make_launcher
from spach.battle.looks import read_looks
from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.cli import main
from spach.files import read_jsonl

SEQUENTIAL = """
[study]
base = "tiny"
name = "tiny-sequential"
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
budget = "12 runs"
first_wave = 2
spending = "obf"             # little alpha at the first look: the mechanics of several looks are what is tested
margin = 5.0                 # wide enough for the toy set's noise: a look can decide equivalence
questions = ["local-modeling"]

[[contestant]]
name = "attn-nocpe"
arch = { net_arch = [["attn", 1]], hidden_dim = 16, patch_size = 4, num_heads = 1, cpe = false, pos_embed = true }
"""


def _plan(out: Path) -> list[tuple]:
    return [(k["look"], k["seeds"], k["next"], k["stop"]) for k in read_looks(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The sequential study run by the local pool in one thread: its looks and metrics."""
    out = tmp_path_factory.mktemp("seq") / "b"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_battle(parse_study(SEQUENTIAL), out, stream=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_looks_are_recorded_and_reported(uninterrupted, capsys):
    out = uninterrupted
    looks = read_looks(out)
    assert len(looks) >= 2 and looks[0]["seeds"] == {"conv": 2, "attn": 2, "attn-nocpe": 2} and looks[-1]["stop"]
    assert all(not k["stop"] for k in looks[:-1]) and all(k["next"] for k in looks[:-1])
    for before, after in zip(looks, looks[1:]):  # each wave is what the look before asked for
        assert after["seeds"] == {**before["seeds"], **before["next"]}
    ran = {(r["contestant"], r["seed"]) for r in read_jsonl(out / "results.jsonl")}
    assert ran == {(c, s) for c, n in looks[-1]["seeds"].items() for s in range(n)}
    assert len(ran) <= 12 and all("why" in c for k in looks for c in k["comparisons"])
    report = (out / "report.md").read_text()
    assert "## Looks" in report and f"Stopped: {looks[-1]['stop']}." in report and "Lan-DeMets" in report
    main(["report", str(out)])  # the report rebuilt from the folder shows the same looks
    assert "## Looks" in (out / "report.md").read_text()
    main(["battle", "--output", str(out)])  # a finished sequential battle: nothing more runs
    said = capsys.readouterr().out
    assert "the sequential battle stopped at look" in said and len(read_looks(out)) == len(looks)


@pytest.mark.slow
def test_a_killed_sequential_battle_resumes_to_the_same_plan(tmp_path, uninterrupted):
    """SIGKILL once the second wave trains, then rerun: the same looks, runs and metrics as uninterrupted."""
    study = tmp_path / "s.toml"
    study.write_text(SEQUENTIAL)
    out = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spach", "battle", str(study), "--output", str(out), "--jobs", "1"]
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (read_looks(out) and len(read_jsonl(out / "results.jsonl")) > 6):
        time.sleep(0.1)
    kill_group(proc)
    assert len(read_looks(out)) >= 1
    run_process(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    assert _plan(out) == _plan(uninterrupted)
    assert same_metrics(_metrics(out), _metrics(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit-local", "slurm"])
def test_batch_launchers_submit_each_wave(launcher, tmp_path, fake_slurm_on_path, uninterrupted):  # noqa: F811
    if launcher == "slurm":
        fake_slurm_on_path(run=True)
        batch = SubmititLauncher("slurm", tmp_path / "b", {"cpus_per_task": 1}, poll_s=0.3)
    else:
        batch = make_launcher("submitit-local", tmp_path / "b", {"cpus_per_task": 1})
    log = io.StringIO()
    run_battle(parse_study(SEQUENTIAL), tmp_path / "b", stream=log, launcher=batch)
    out = tmp_path / "b"
    assert _plan(out) == _plan(uninterrupted) and same_metrics(_metrics(out), _metrics(uninterrupted))
    assert sorted(_events(out).values()) == [["submitted", "started", "finished"]] * len(read_jsonl(out / "results.jsonl"))
    assert log.getvalue().count("look 2: ") >= 1 and " failed (of " in log.getvalue()
    assert all(" 0 failed" in ln for ln in log.getvalue().splitlines() if ln.startswith("queue:"))


def test_budget_flag_and_study_fields_are_checked(tmp_path, capsys):
    study = tmp_path / "s.toml"
    for text, message in ((SEQUENTIAL.replace('"12 runs"', '"soon"'), "study.budget: 'soon' is not a budget"),
                          (SEQUENTIAL.replace("first_wave = 2", "first_wave = 9"), "study.first_wave: must lie in 2..8"),
                          (JOB_STUDY.replace("seeds = [0, 1]", "seeds = [0, 1]\nfirst_wave = 2"), "needs a budget")):
        study.write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["battle", str(study), "--dry-run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    study.write_text(JOB_STUDY)
    with pytest.raises(SystemExit):
        main(["battle", str(study), "--budget", "5 parsecs", "--dry-run"])
    assert "--budget: '5 parsecs' is not a budget" in capsys.readouterr().err
    main(["battle", str(study), "--budget", "20m", "--dry-run"])
    said = capsys.readouterr().out
    assert "sequential: a first wave of 2 seed(s) per contestant" in said and "the first wave takes" in said
    assert json.loads(json.dumps(parse_study(SEQUENTIAL).to_dict()))["budget"] == "12 runs"


def test_a_look_that_is_not_one_ends_the_replay(tmp_path, capsys):
    """looks.jsonl edited by hand: the looks from the first bad one on are ignored, with one warning line."""
    good = {"look": 1, "seeds": {"conv": 2}, "next": {"conv": 3}, "comparisons": [], "stop": "", "used": 1.0}
    lines = [good, {**good, "look": 2, "seeds": "all"}, {**good, "look": 3}]
    (tmp_path / "looks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_looks(tmp_path) == [good]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "look 2 is not a look the results back" in err
    # (an empty table is a look: a battle whose budget afforded no finding records its stop with no seeds)
    for bad in ({"conv": -1}, {"conv": True}, {"conv": 2.5}, [2]):
        (tmp_path / "looks.jsonl").write_text(json.dumps({**good, "seeds": bad}) + "\n")
        assert read_looks(tmp_path) == []
    for key, bad in (("used", "lots"), ("elapsed_s", [1]), ("left", None), ("look", 7), ("stop", 3)):
        (tmp_path / "looks.jsonl").write_text(json.dumps({**good, key: bad}) + "\n")
        assert read_looks(tmp_path) == [], key


def test_a_look_the_results_do_not_back_ends_the_replay(uninterrupted, tmp_path, capsys):
    """A hand-edited look (claimed decisions, seeds the run folders do not hold) and ledger lines of the
    wrong types: the report replays only what the results back, says so in one line each, and does not
    print the claims; a resume reads the same files without a traceback."""
    import shutil

    out = tmp_path / "b"
    shutil.copytree(uninterrupted, out)
    looks = read_looks(out)
    forged = {**looks[0], "look": len(looks) + 1, "seeds": {n: 6 for n in looks[0]["seeds"]},
              "findings": {"main/local-modeling": "supported"}, "stop": "every comparison is decided"}
    with open(out / "looks.jsonl", "a") as f:
        f.write(json.dumps(forged) + "\n")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"contestant": "conv", "seed": 0, "status": "done", "attempt_s": [1], "final_top1": "high"}) + "\n")
        f.write('{"contestant": "conv", "seed": 1, "status": "do')  # torn by a crash
    capsys.readouterr()
    main(["report", str(out)])
    err = capsys.readouterr().err
    assert f"look {len(looks) + 1} is not a look the results back" in err and "claims finished seeds" in err
    assert "Traceback" not in err and err.count("\n") == 1
    main(["battle", "--output", str(out)])  # the resume reads the ledger too
    err = capsys.readouterr().err
    assert "is not a run record the battle wrote" in err and "torn last line" in err and "Traceback" not in err
    report = (out / "report.md").read_text()
    assert f"| {len(looks) + 1} |" not in report  # the forged look is not in the Looks table
    history: list = []
    from spach.battle.findings import judge
    from spach.battle.results import load_results
    from spach.battle.study import Study
    study = Study.from_dict(json.loads((out / "study.json").read_text()))
    judge(load_results(out, study), study, read_looks(out, load_results(out, study)), None, history)
    assert len(history) == len(looks)


def test_budget_amounts_a_battle_cannot_mean_are_refused(tmp_path, capsys):
    from spach.battle.budget import parse_budget
    from spach.errors import SpachError

    for bad in ("1" + "0" * 400 + "h", "2.5 runs", "0 runs", "1e9h", "nan m", "inf h"):
        with pytest.raises(SpachError):
            parse_budget(bad)
    study = tmp_path / "s.toml"
    for text, message in ((SEQUENTIAL.replace("first_wave = 2", "first_wave = 0"), "study.first_wave: must lie in 2..8"),
                          (SEQUENTIAL.replace('"12 runs"', '"1.5 gpu-h"').replace('spending = "obf"', 'spending = "obf"\n')
                           + '\n[recipe]\ndevice = "cpu"\n', "counts GPU hours"),
                          (SEQUENTIAL.replace('spending = "obf"', 'spending = "fast"'), "study.spending: 'fast' is not a spending function")):
        study.write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["battle", str(study), "--dry-run"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err

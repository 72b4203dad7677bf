"""Stopping a battle that trains two runs at a time: Ctrl-C (SIGINT to the process group, as a terminal
sends it), or SIGINT or SIGTERM to a battle started in the background (with SIGINT ignored, as a shell
starts a background job) stops every job within seconds, the runs in flight save their
checkpoints, no queued run starts, the ledger holds exactly the finished runs, and a rerun completes."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import spawn

from spach.battle.runner import run_battle
from spach.files import read_jsonl

STUDY = """
[study]
name = "stop"
base = "tiny"
seeds = [0, 1]
jobs = 2

[data]
train_subset = 64
val_subset = 32
eval_train_subset = 32

[recipe]
epochs = 40                  # a run outlasts the stop by far, even on a loaded machine (12 finished first once)
"""
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _battle(tmp_path: Path, background: bool) -> tuple[subprocess.Popen, Path, list[str]]:
    """`spach battle` in its own process group, returned once both first runs have trained an epoch."""
    (tmp_path / "s.toml").write_text(STUDY)
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = spawn([sys.executable, "-m", "spach", "battle", str(tmp_path / "s.toml"), "--output", str(out), "--no-report"],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, background=background)
    lines: list[str] = []
    for line in p.stdout:
        lines.append(line)
        if {ln.split(":")[0] for ln in lines if ": epoch " in ln} >= {"[1/4] conv seed 0", "[2/4] attn seed 0"}:
            return p, out, lines
    pytest.fail("the battle ended before its runs started:\n" + "".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigint in the background", "sigterm in the background"])
def test_a_stop_ends_every_job_and_a_rerun_completes(how, tmp_path):
    p, out, lines = _battle(tmp_path, background=how.endswith("in the background"))
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    else:  # `kill -INT PID` / `kill PID`: to the battle alone
        p.send_signal(signal.SIGINT if how.startswith("sigint") else signal.SIGTERM)
    sent = time.time()
    rest, _ = p.communicate(timeout=20)  # past it, the test's clean-up kills the battle and its workers
    took = time.time() - sent
    text = "".join(lines) + rest
    assert p.returncode == 130 and took < 15, (took, text[-3000:])
    time.sleep(1)  # a straggler worker would write on
    started = {c.parent for c in out.glob("runs/*/*/config.json")}
    # none started later (a run in its last evaluation may finish: it is then recorded)
    assert all((d / "config.json").stat().st_mtime <= sent for d in started), text[-3000:]
    finished = {(d.parent.name, int(d.name[4:])) for d in started if (d / "summary.json").is_file()}
    done = {(r["contestant"], r["seed"]) for r in read_jsonl(out / "results.jsonl") if r["status"] == "done"}
    assert done == finished  # the ledger holds exactly the finished runs
    stopped = [d for d in started if not (d / "summary.json").is_file()]
    assert stopped, text[-3000:]
    for d in stopped:  # each run in flight saved where it stopped
        assert "interrupted: saved" in d.with_name(d.name + ".log").read_text()
        assert f"{d.parent.name} {d.name.replace('seed', 'seed ')}: stopped: its checkpoint is saved" in text
    told = (f"battle interrupted: {len(finished)} run(s) finished in this battle and are recorded; "
            + ", ".join(f"{d.parent.name} {d.name.replace('seed', 'seed ')}" for d in stopped))
    assert told.split("; ")[0] in text and "saved a checkpoint when stopped" in text, text[-3000:]
    assert f"{4 - len(started)} run(s) did not start; resume with: spach battle --output {out}" in text
    if how != "ctrl-c":
        return
    run_battle(None, out, jobs=1, report=False, stream=io.StringIO())
    ledger = sorted((r["contestant"], r["seed"], r["status"]) for r in read_jsonl(out / "results.jsonl"))
    assert ledger == sorted((c, s, "done") for c in ("conv", "attn") for s in (0, 1))
    assert all("resuming" in d.with_name(d.name + ".log").read_text() for d in stopped)

"""Nothing lost: a tiny battle SIGKILLed at every stage boundary of a run, then rerun, ends with the
ledger and metrics of an uninterrupted battle; two battles on one folder cannot both run."""
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_process, spawn

from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.errors import SpachError
from spach.files import read_jsonl

STUDY = """
[study]
name = "faults"
seeds = [0, 1]

[data]
dataset = "tiny"
train_subset = 64
val_subset = 32
workers = 0

[recipe]
epochs = 2
batch_size = 16
lr = 3e-3
lr_base_size = 0
warmup_epochs = 0
mixup = 0.0
cutmix = 0.0
aa = "none"
color_jitter = 0.0
reprob = 0.0
repeated_aug = 1
model_ema = false
drop_path = 0.0
eval_batch_size = 32

[[contestant]]
name = "conv"
arch = { net_arch = [["conv", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }
"""

# Each stage: the function to wrap, and when (which call) to SIGKILL the battle, after the original ran.
# Calls are counted over the whole battle; the 2nd run (seed 1) is hit where a count allows it.
KILL = {  # stage: (owner, attribute, call, before/after, (ledger lines, run 2 summary written) at the kill)
    "before-training": ("spach.battle.local", "execute", 2, "before", (1, False)),     # run 2 about to train
    "mid-epoch": ("spach.train.progress.Progress", "step", 11, "after", (1, False)),   # run 2, epoch 1, step 3/4
    "after-checkpoint": ("spach.train.engine", "_save", 3, "after", (1, False)),       # run 2's epoch-1 checkpoint
    "after-summary": ("spach.train.checkpoint", "atomic_write_text", 2, "after", (1, True)),  # run 2's summary.json
    # (summary.json is the one text the checkpoint module writes: once per run)
    "after-ledger": ("spach.battle.results.Ledger", "append", 1, "after", (1, False)),  # run 1's ledger line
    "during-report": ("spach.battle.report", "render_html", 1, "before", (2, True)),    # report.md, no HTML yet
}

KILLER = """
import importlib, os, signal, sys, torch
torch.set_num_threads(1)
module_name, attr, nth, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    owner = importlib.import_module(module_name)
except ModuleNotFoundError:
    mod, cls = module_name.rsplit(".", 1)
    owner = getattr(importlib.import_module(mod), cls)
original, calls = getattr(owner, attr), [0]

def wrapped(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if when == "after" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, attr, wrapped)
from spach.cli import main
main(["battle", sys.argv[5], "--output", sys.argv[6]])
"""


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _state(out: Path) -> tuple[list, dict]:
    ledger = sorted((r["contestant"], r["seed"], r["status"], r["final_top1"]) for r in read_jsonl(out / "results.jsonl"))
    metrics = {str(p.relative_to(out)): [(r["epoch"], r["train_loss"], r["top1"]) for r in read_jsonl(p)]
               for p in sorted(out.glob("runs/*/*/metrics.jsonl"))}
    return ledger, metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "b"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_battle(parse_study(STUDY), out, report=False, stream=io.StringIO())
    finally:
        torch.set_num_threads(n)
    return _state(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL))
def test_sigkill_at_each_stage_then_rerun_equals_uninterrupted(stage, tmp_path, uninterrupted, one_thread):
    study, out = tmp_path / "s.toml", tmp_path / "b"
    study.write_text(STUDY)
    module, attr, nth, when, (lines, summary) = KILL[stage]
    p = run_process([sys.executable, "-c", KILLER, module, attr, str(nth), when, str(study), str(out)],
                    capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (stage, p.returncode, p.stderr[-2000:])
    assert len(read_jsonl(out / "results.jsonl")) == lines  # killed where the stage says
    assert (out / "runs/conv/seed1/summary.json").is_file() == summary
    assert (out / "report.md").is_file() == (stage == "during-report") and not (out / "report.html").exists()
    run_battle(None, out, stream=io.StringIO())  # rerun: resumes from what the folder holds
    ledger, metrics = _state(out)
    assert ledger == uninterrupted[0], stage  # every run recorded once, as done, with the same result
    assert metrics == uninterrupted[1], stage  # every epoch once, bit-identical to the uninterrupted battle
    assert (out / "report.html").is_file() and not list(out.rglob(".*.tmp"))


def test_two_battles_on_one_folder(tmp_path, one_thread):
    study, out = tmp_path / "s.toml", tmp_path / "b"
    text = STUDY.replace("epochs = 2", "epochs = 30")
    study.write_text(text)
    first = spawn([sys.executable, "-m", "spach", "battle", str(study), "--output", str(out)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(SpachError, match=rf"study folder {out} is in use by spach PID {first.pid} on "):
        run_battle(parse_study(text), out, stream=io.StringIO())
    assert first.wait(timeout=300) == 0, first.stderr.read()
    lines = read_jsonl(out / "results.jsonl")
    assert sorted((r["contestant"], r["seed"]) for r in lines) == [("conv", 0), ("conv", 1)]  # each run once
    for metrics in out.glob("runs/*/*/metrics.jsonl"):
        assert [r["epoch"] for r in read_jsonl(metrics)] == list(range(1, 31))


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, one_thread):
    out = tmp_path / "b"
    out.mkdir()
    (out / ".lock").write_text("spach PID 999999 on elsewhere since 2020-01-01 00:00:00\n")  # no process holds it
    run_battle(parse_study(STUDY.replace("seeds = [0, 1]", "seeds = [0]")), out, report=False,
               stream=io.StringIO())
    assert [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["done"]


def test_a_run_folder_has_one_owner(tmp_path):
    from spach.files import FolderLock
    from spach.train.config import TrainConfig
    from spach.train.engine import train

    cfg = TrainConfig(dataset="tiny", model="spach", model_kwargs={"net_arch": [["conv", 1]], "hidden_dim": 8,
                      "patch_size": 4, "num_heads": 1}, epochs=1, batch_size=16, output=str(tmp_path / "run"),
                      progress="none", workers=0, mixup=0.0, cutmix=0.0, aa="none", repeated_aug=1, model_ema=False)
    with FolderLock(tmp_path / "run", "run folder"):
        with pytest.raises(SpachError, match=r"run folder .*run is in use by spach PID"):
            train(cfg)
    assert train(cfg)["epochs"] == 1

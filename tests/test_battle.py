"""The battle runner on the built-in tiny dataset: end to end, resume, failure isolation, parallel runs."""
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_group, spawn

from spach.battle.command import battle_command
from spach.battle.estimate import print_plan
from spach.battle.runner import run_battle
from spach.battle.study import load_study, parse_study
from spach.cli import main
from spach.errors import SpachError
from spach.files import read_jsonl
from spach.train import checkpoint

TINY = """
[study]
name = "tiny-test"
seeds = [0, 1]
{study_extra}

[data]
dataset = "tiny"
train_subset = 64
val_subset = 32
eval_train_subset = 32
workers = 0

[recipe]
epochs = {epochs}
batch_size = 32
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
eval_batch_size = 64

[[contestant]]
name = "conv"
arch = {{ net_arch = [["conv", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }}

[[contestant]]
name = "{second}"
arch = {{ net_arch = [["{mixer}", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }}
"""
# the tiny study asks neither finding 1 nor 2, so it has no pairs figure (plots.make_all draws only what applies)
PLOTS = {"accuracy_vs_macs", "accuracy_vs_throughput", "accuracy_vs_params", "accuracy_vs_training_loss", "learning_curves"}


def tiny(epochs=2, second="attn", mixer="attn", study_extra=""):
    return TINY.format(epochs=epochs, second=second, mixer=mixer, study_extra=study_extra)


def summaries(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime for p in out.glob("runs/*/*/summary.json")}


def test_tiny_study_end_to_end_then_skips_finished_runs(tmp_path):
    out = tmp_path / "b"
    log = io.StringIO()
    report = run_battle(parse_study(tiny()), out, stream=log)
    text = log.getvalue()
    assert "[1/4] conv seed 0: epoch 1/2" in text and "study ETA" in text and "[4/4] attn seed 1: done" in text
    assert report == out / "report.html"
    ledger = read_jsonl(out / "results.jsonl")
    assert [(r["contestant"], r["seed"], r["status"]) for r in ledger] == [
        ("conv", 0, "done"), ("attn", 0, "done"), ("conv", 1, "done"), ("attn", 1, "done")]
    assert {p.stem for p in (out / "plots").glob("*.png")} == PLOTS
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "| conv | main | conv | single |" in md and "## Findings" in md and "How far this is from the paper" in md
    assert all(f"(plots/{p}.png)" in md for p in PLOTS)
    assert html.count("data:image/png;base64,") == len(PLOTS) and "src=\"http" not in html
    costs = json.loads((out / "costs.json").read_text())
    assert costs["attn"]["family"] == "attn" and costs["attn"]["macs"] > costs["conv"]["macs"] > 0

    before = summaries(out)
    log = io.StringIO()
    run_battle(None, out, stream=log, report=False)  # resume from the recorded study: nothing to do
    assert "4 runs finished earlier, 0 to run" in log.getvalue()
    assert summaries(out) == before and len(read_jsonl(out / "results.jsonl")) == 4


def test_report_command_regenerates(tmp_path, capsys):
    out = tmp_path / "b"
    study = parse_study(tiny().replace("seeds = [0, 1]", "seeds = [0]"))
    run_battle(study, out, report=False, stream=io.StringIO())
    assert not (out / "report.md").exists()
    main(["report", str(out)])
    assert capsys.readouterr().out.startswith(f"report: {out / 'report.html'}")
    assert (out / "report.md").is_file() and len(list((out / "plots").glob("*.png"))) == len(PLOTS)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "is not a battle folder" in capsys.readouterr().err


def test_resume_after_a_killed_run(tmp_path):
    study_file = tmp_path / "s.toml"
    study_file.write_text(tiny(epochs=12))
    out = tmp_path / "b"
    proc = spawn([sys.executable, "-m", "spach", "battle", str(study_file), "--output", str(out), "--no-report"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "runs" / "attn" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while len(read_jsonl(second)) < 2:  # the first run finished, the second is part-way
            assert proc.poll() is None and time.time() < deadline, "the battle ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_group(proc)
    finished = summaries(out)
    assert list(finished) == ["runs/conv/seed0/summary.json"]
    # the epochs the checkpoint holds (a kill between its save and the metrics line leaves one line short)
    killed_at = checkpoint.load(second.parent / "checkpoint.pth")["epoch"]

    log = io.StringIO()
    run_battle(None, out, report=False, stream=log)
    assert "1 runs finished earlier, 3 to run" in log.getvalue()
    assert summaries(out)["runs/conv/seed0/summary.json"] == finished["runs/conv/seed0/summary.json"]
    assert f"resuming {out / 'runs' / 'attn' / 'seed0'} at epoch {killed_at + 1}" in (out / "runs/attn/seed0.log").read_text()
    assert [r["epoch"] for r in read_jsonl(second)] == list(range(1, 13))
    assert len(summaries(out)) == 4


BROKEN_MIXER = """
import torch.nn as nn
import spach

@spach.register_mixer("broken")
class Broken(nn.Module):
    '''Runs in eval mode (so it can be profiled) but fails as soon as it trains.'''
    def forward(self, x):
        if self.training:
            raise RuntimeError("broken mixer: cannot train")
        return x
"""


def test_a_failing_contestant_does_not_sink_the_study(tmp_path):
    (tmp_path / "broken_mixer.py").write_text(BROKEN_MIXER)
    study_file = tmp_path / "s.toml"
    study_file.write_text(tiny(second="broken", mixer="broken", study_extra='imports = ["broken_mixer.py"]'))
    out = tmp_path / "b"
    log = io.StringIO()
    run_battle(load_study(study_file), out, stream=log)
    # the cost measurement runs every model first: a model that cannot run fails its runs before any training
    assert "[2/4] broken seed 0: FAILED: model does not run: RuntimeError: broken mixer: cannot train" in log.getvalue()
    status = {(r["contestant"], r["seed"]): r["status"] for r in read_jsonl(out / "results.jsonl")}
    assert status == {("conv", 0): "done", ("broken", 0): "failed", ("conv", 1): "done", ("broken", 1): "failed"}
    assert "Traceback" in (out / "runs/broken/seed0.error.txt").read_text()
    md = (out / "report.md").read_text()
    assert "## Failed runs" in md and "| broken seed 1 | RuntimeError: broken mixer: cannot train |" in md

    log = io.StringIO()
    run_battle(None, out, stream=log, report=False)  # a rerun retries the failed runs only
    assert "2 runs finished earlier, 2 to run" in log.getvalue()


def test_a_changed_recipe_is_refused(tmp_path):
    out = tmp_path / "b"
    one_seed = tiny(epochs=1).replace("seeds = [0, 1]", "seeds = [0]")
    run_battle(parse_study(one_seed), out, report=False, stream=io.StringIO())
    with pytest.raises(SpachError, match=r"runs/conv/seed0 was trained with lr = 0.003, the study now says 0.005"):
        run_battle(parse_study(one_seed.replace("lr = 3e-3", "lr = 5e-3")), out, stream=io.StringIO())
    with pytest.raises(SpachError, match="holds no battle"):
        run_battle(None, tmp_path / "empty", stream=io.StringIO())


def test_two_runs_at_a_time(tmp_path):
    out = tmp_path / "b"
    study = parse_study(tiny(epochs=1).replace("seeds = [0, 1]", "seeds = [0]"))
    log = io.StringIO()
    run_battle(study, out, jobs=2, report=False, stream=log)
    assert "conv seed 0: done" in log.getvalue() and "attn seed 0: done" in log.getvalue()
    assert len(summaries(out)) == 2


def test_a_timm_model_as_outside_baseline(tmp_path):
    arch = 'arch = { net_arch = [["conv", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }'
    text = tiny(epochs=1, second="resnet", mixer="conv").replace("seeds = [0, 1]", "seeds = [0]")
    study = parse_study(text.replace(f'name = "resnet"\n{arch}', 'name = "resnet"\nmodel = "resnet10t"'))
    out = tmp_path / "b"
    run_battle(study, out, stream=io.StringIO())
    costs = json.loads((out / "costs.json").read_text())
    assert costs["resnet"]["family"] == "outside" and costs["resnet"]["macs"] > 0
    assert len(summaries(out)) == 2 and "| resnet | main | outside | - |" in (out / "report.md").read_text()


def test_dry_run_times_a_cpu_study_here_and_estimates_gpu_hours_for_imagenet():
    log = io.StringIO()
    hours = print_plan(load_study(preset="tiny"), log)
    text = log.getvalue()
    assert "2 contestants x 2 seeds = 4 runs" in text and "timed on this CPU" in text and "wall with 1 job(s)" in text
    assert 0 < hours < 0.1  # seconds of training, timed here
    log = io.StringIO()
    hours = print_plan(load_study(preset="paper"), log)
    if not torch.cuda.is_available():
        assert "no GPU here to time it" in log.getvalue() and 3000 < hours < 30000
    log = io.StringIO()
    assert battle_command(list_presets=True, stream=log) is None
    assert "default" in log.getvalue() and "paper" in log.getvalue()


def test_data_paths_are_absolute_given_again_win_and_a_dry_run_checks_them(tmp_path, monkeypatch, capsys):
    from spach.battle import command
    seen = []
    monkeypatch.setattr(command, "run_battle", lambda study, out, **kw: seen.append((study, out)) or out)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(tiny().replace('dataset = "tiny"', 'dataset = "imagefolder"'))
    battle_command("s.toml", output="b", data="imgs", report=False)
    assert seen[-1][0].data["data_path"] == str(tmp_path / "imgs")  # relative: recorded absolute
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "study.json").write_text(json.dumps(seen[-1][0].to_dict()))
    monkeypatch.chdir(tmp_path / "b")
    battle_command(output=str(tmp_path / "b"), data="../moved", report=False)  # a resume, elsewhere
    assert seen[-1][0].data["data_path"] == str(tmp_path / "moved")
    for args, flag in [(["--preset", "paper"], "pass --data DIR"), (["--preset", "medium-cifar10"], "needs --data (")]:
        with pytest.raises(SystemExit) as e:
            main(["battle", *args, "--dry-run"])
        err = capsys.readouterr()
        assert e.value.code == 2 and flag in err.err and "--data-path" not in err.err and not err.out
        assert len(err.err.strip().splitlines()) == 1


def test_a_folder_keeps_its_study(tmp_path, capsys):
    from spach.battle.plan import open_study
    out = tmp_path / "b"
    out.mkdir()
    first = parse_study(tiny(), source="first.toml")
    (out / "study.json").write_text(json.dumps(first.to_dict()))
    grown = parse_study(tiny(second="mlp", mixer="mlp").replace("seeds = [0, 1]", "seeds = [0, 1, 2]"), source="first.toml")
    assert open_study(out, grown) is grown  # the same study extended: contestants and seeds added
    other = parse_study(tiny().replace('name = "tiny-test"', 'name = "other"'), source="other.toml")
    stranger = parse_study(tiny(second="x", mixer="mlp").replace('name = "conv"', 'name = "y"'), source="s.toml")
    for study in (other, stranger):
        with pytest.raises(SpachError, match="holds the study 'tiny-test' .from first.toml., not .* a folder keeps one "
                                             "study; choose another folder with --output"):
            run_battle(study, out, stream=io.StringIO())
    assert json.loads((out / "study.json").read_text())["name"] == "tiny-test"
    (tmp_path / "o.toml").write_text(tiny().replace('name = "tiny-test"', 'name = "other"'))
    with pytest.raises(SystemExit) as e:
        main(["battle", str(tmp_path / "o.toml"), "--output", str(out)])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1

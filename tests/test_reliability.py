"""Bad input found up front with a one-line error (exit 2, no traceback), and files that stay readable
and shareable: each defect of issue 9 reproduced first, then guarded here."""
import errno
import io
import os
import shutil
import stat

import pytest
import torch
from conftest import TINY_KW, cli_error, run_process
from test_faults import STUDY

from spach import files
from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.cli import main
from spach.errors import SpachError
from spach.files import read_jsonl
from spach.train.config import TrainConfig

# -- 2 and 10: every recipe value is checked when the study is read (and by spach train) -------------------------
@pytest.mark.parametrize("old, new, where", [
    ("epochs = 2", "epochs = 0", "recipe.epochs: must be >= 1"),
    ("batch_size = 16", "batch_size = 0", "recipe.batch_size: must be >= 1"),
    ("batch_size = 16", "batch_size = -5", "recipe.batch_size: must be >= 1"),
    ("lr = 3e-3", "lr = -1.0", "recipe.lr: must be > 0"),
    ("workers = 0", "workers = -1", "data.workers: must be >= 0"),
    ("seeds = [0, 1]", "seeds = [-1]", "study.seeds: expected a non-empty list of integers from 0 to 4294967295"),
    ("seeds = [0, 1]", "seeds = [99999999999999999999]", "study.seeds: expected a non-empty list of integers from 0"),
    ("seeds = [0, 1]", "seeds = [4294967296]", "study.seeds: expected a non-empty list of integers from 0"),
    ('aa = "none"', 'aa = "bogus"', "recipe.aa: 'bogus' is not an augmentation policy"),
    ('aa = "none"', 'aa = "none"\nopt = "adamz"', "recipe.opt: 'adamz' is not a timm optimizer"),
    ('aa = "none"', 'aa = "none"\namp = "fp8"', "recipe.amp: must be one of auto, bf16, fp16, off"),
    ("workers = 0", "workers = 0\nmean = [0.5, 0.5]\nstd = [0.5, 0.5]", "data.mean: has 2 values but tiny images have 1"),
    ("workers = 0", "workers = 0\nmean = [0.5]\nstd = [0.0]", "data.std: must be > 0"),
    ("workers = 0", "workers = 0\nmean = [0.5]", "data.std: must be given together with mean"),
    ("train_subset = 64", "train_subset = -10", "data.train_subset: must be >= 0"),
    ("warmup_epochs = 0", "warmup_epochs = -2", "recipe.warmup_epochs: must be >= 0"),
    ("warmup_epochs = 0", "warmup_epochs = 0\nsmoothing = 5.0", r"recipe.smoothing: must lie in \[0, 1\)"),
    ('name = "faults"', 'name = "../../x"', "study.name: '../../x' is not a folder-safe name"),
])
def test_bad_recipe_values_fail_when_the_study_is_read(old, new, where):
    assert old in STUDY
    with pytest.raises(SpachError, match=f"^s.toml: {where}"):
        parse_study(STUDY.replace(old, new), source="s.toml")


def test_a_device_that_is_not_here_fails_before_training(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    study = parse_study(STUDY.replace('aa = "none"', 'aa = "none"\ndevice = "cuda"'), source="s.toml")
    with pytest.raises(SpachError, match="s.toml: recipe.device: device cuda was asked for, but no CUDA GPU"):
        run_battle(study, tmp_path / "b", stream=io.StringIO())
    assert not (tmp_path / "b").exists()  # nothing written


def test_a_battle_whose_runs_all_fail_exits_non_zero(tmp_path, capsys):
    (tmp_path / "broken.py").write_text(
        "import torch.nn as nn\nimport spach\n\n@spach.register_mixer('broken_for_test')\nclass Broken(nn.Module):\n"
        "    def forward(self, x):\n        raise RuntimeError('this mixer always fails')\n")
    text = STUDY.replace('name = "faults"', 'name = "faults"\nimports = ["broken.py"]').replace('["conv", 1]', '["broken_for_test", 1]')
    (tmp_path / "s.toml").write_text(text)
    err = cli_error(["battle", str(tmp_path / "s.toml"), "--output", str(tmp_path / "b")], capsys)
    assert "all 2 runs of faults that were tried failed (first error: model does not run: RuntimeError: this mixer always fails)" in err
    assert (tmp_path / "b" / "report.html").is_file()  # the report still lists the failures


# -- 3: tracebacks become one-line errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-2"], "--epochs must be >= 1, got -2"),
    (["--model-kwargs", '{"net_arch": 5}'], "net_arch must be a non-empty list, got 5"),
    (["--model-kwargs", '{"net_arch": [["conv", 1]], "hidden_dim": 0}'], "hidden_dim must be an integer >= 1, got 0"),
    (["--model-kwargs", '{"net_arch": [["conv", 1]], "patch_size": 0}'], "patch_size must be an integer >= 1, got 0"),
])
def test_train_flags_fail_in_one_line(flags, match, tmp_path, capsys):
    err = cli_error(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", TINY_KW, "--output",
                     str(tmp_path / "run"), *flags], capsys)
    assert match in err


def test_a_study_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "s.toml").write_bytes(STUDY.encode().replace(b"faults", b"fa\xffults"))
    err = cli_error(["battle", str(tmp_path / "s.toml"), "--output", str(tmp_path / "b")], capsys)
    assert "is not UTF-8 text" in err


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(SpachError, match=r"no space left on the device to write .*x.json; free some space and rerun"):
        files.atomic_write_text(tmp_path / "x.json", "{}")
    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(SpachError, match="no space left on the device"):
        files.append_jsonl(tmp_path / "y.jsonl", {"a": 1})


def test_an_output_folder_that_cannot_be_written(tmp_path, capsys):
    err = cli_error(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", TINY_KW,
                     "--output", "/sys/spach-cannot-write-here/run"], capsys)
    assert "cannot create the folder /sys/spach-cannot-write-here" in err
    (tmp_path / "file").write_text("x")
    err = cli_error(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", TINY_KW,
                     "--output", str(tmp_path / "file" / "run")], capsys)
    assert err.endswith(f"--output {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder; "
                        "choose another --output")


# -- 5, 6, 8, 11: files that survive corruption, are shareable, and never render user HTML ------------------------------
@pytest.fixture(scope="module")
def battle(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "b"
    text = STUDY.replace('name = "faults"', 'name = "faults"\ndescription = "<b>bold</b> & <script>x</script>"')
    old = os.umask(0o022)
    try:
        run_battle(parse_study(text.replace("seeds = [0, 1]", "seeds = [0]")), out, stream=io.StringIO())
    finally:
        os.umask(old)
    return out


def test_written_files_honour_the_umask(battle):
    for name in ("report.html", "report.md", "results.jsonl", "study.json", "costs.json",
                 "runs/conv/seed0/checkpoint.pth", "runs/conv/seed0/summary.json"):
        assert stat.S_IMODE((battle / name).stat().st_mode) == 0o644, name


def test_report_md_escapes_user_html(battle):
    md = (battle / "report.md").read_text()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;" in md and "<script>" not in md


def test_a_corrupt_ledger_line_is_skipped_and_named(battle, tmp_path, capsys):
    out = tmp_path / "b"
    run_process(["cp", "-r", str(battle), str(out)], check=True)
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"contestant": "conv", "seed": 7, "status": "d\xffone"}\n{"torn": ')
    assert len(read_jsonl(out / "results.jsonl")) == 1
    assert "skipped line 2 of" in capsys.readouterr().err
    run_battle(None, out, stream=io.StringIO())  # a later battle on the folder still works
    files.append_jsonl(out / "results.jsonl", {"after": "torn"})  # the torn line is closed, not glued to
    assert read_jsonl(out / "results.jsonl")[-1] == {"after": "torn"}


@pytest.mark.parametrize("name, expect", [
    ("study.json", "is corrupt; rerun 'spach battle STUDY --output"),
    ("costs.json", None),
    ("runs/conv/seed0/summary.json", None),
])
def test_report_survives_corrupt_files(battle, tmp_path, name, expect, capsys):
    out = tmp_path / "b"
    run_process(["cp", "-r", str(battle), str(out)], check=True)
    (out / name).write_bytes(b"\x00{not json")
    if expect:
        assert expect in cli_error(["report", str(out)], capsys)
    else:
        main(["report", str(out)])
        assert "spach: ignored " in capsys.readouterr().err and (out / "report.html").is_file()


# -- 9: messages that say what is wrong and never advise unsafe loading --------------------------------------------
class Custom:
    """A Python object that weights_only loading must refuse."""


def test_checkpoint_messages(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(1)}, "x": Custom()}, tmp_path / "unsafe.pth")
    err = cli_error(["eval", "--pretrained", str(tmp_path / "unsafe.pth"), "--dataset", "tiny"], capsys)
    assert "refuses to unpickle" in err and "weights_only" not in err and "likely succeed" not in err
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    err = cli_error(["eval", "--pretrained", str(tmp_path / "cut.pth"), "--dataset", "tiny"], capsys)
    assert "is truncated or not a PyTorch checkpoint" in err and "Errno" not in err
    err = cli_error(["eval", "--pretrained", str(tmp_path), "--dataset", "tiny"], capsys)
    assert "is a folder" in err


def test_train_config_values(tmp_path):
    with pytest.raises(SpachError, match="batch_size must be >= 1, got -5"):
        TrainConfig(batch_size=-5)
    with pytest.raises(SpachError, match="ratio must be two numbers"):
        TrainConfig(ratio=[1.0])
    with pytest.raises(SpachError, match="epochs must be int, got 'ten'"):
        TrainConfig(epochs="ten")


@pytest.mark.parametrize("where, code, message", [
    ("fsync", errno.ENOSPC, "no space left on the device to write "),
    ("mkstemp", errno.EROFS, "cannot write "),
])
def test_report_on_a_full_or_read_only_disk_is_one_line(battle, tmp_path, monkeypatch, capsys, where, code, message):
    out = tmp_path / "b"
    shutil.copytree(battle, out)
    before = (out / "plots" / "accuracy_vs_macs.png").read_bytes()

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os if where == "fsync" else files.tempfile, where, fail)
    err = cli_error(["report", str(out)], capsys)
    assert message + str(out / "plots") in err
    assert (out / "plots" / "accuracy_vs_macs.png").read_bytes() == before and not list(out.rglob(".*.tmp"))

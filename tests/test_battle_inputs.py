"""Careless or hostile input to `spach battle`, `spach report` and `spach bench`: each mistake is one line
and exit 2, a busy machine is named, and user text reaches the report escaped (issues 19 and 20)."""
import importlib
import io
import os

import pytest

from spach.battle.estimate import print_plan
from spach.battle.study import load_study
from spach.bench.measure import BenchSettings
from spach.cli import main

bench = importlib.import_module("spach.bench.command")


def test_bench_and_the_dry_run_warn_on_a_busy_machine(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench, "run", lambda models, settings: [])
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    bench.command(["spach_xxs_patch16_224_conv"], BenchSettings())
    assert "warning" not in capsys.readouterr().err  # an idle machine: no word
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 4.0, 3.0))
    bench.command(["spach_xxs_patch16_224_conv"], BenchSettings())
    assert capsys.readouterr().err == ("spach bench: warning: load average 5.2 on 2 core(s): other processes share the "
                                       "CPU, so times measured now can be several times off; measure on an idle machine\n")
    log = io.StringIO()
    print_plan(load_study(preset="tiny"), log)
    assert "warning: load average 5.2 on 2 core(s)" in log.getvalue()


def _cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_battle_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "--output " + str(tmp_path / "f") + " is a file, not a folder" in _cli(
        capsys, "battle", "--preset", "tiny", "--output", str(tmp_path / "f"))


def test_a_bad_pretrained_of_a_timm_contestant(tmp_path, capsys):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for path, message in ((tmp_path / "none.pth", f"recipe.pretrained '{tmp_path / 'none.pth'}' is not a file; give the "
                                                  "path of a checkpoint of model 'resnet10t'"),
                          (tmp_path / "junk.pth", "cannot read checkpoint ")):  # the project's one loader says why
        (tmp_path / "s.toml").write_text(f'[study]\nname = "pre"\nbase = "tiny"\nseeds = [0]\n[[contestant]]\n'
                                         f'name = "resnet"\nmodel = "resnet10t"\nrecipe = {{ pretrained = "{path}" }}\n')
        err = _cli(capsys, "battle", str(tmp_path / "s.toml"), "--output", str(tmp_path / path.stem), "--no-report")
        assert f"spach battle: error: contestant 'resnet': {message}" in err


def test_a_data_folder_that_is_not_there_is_named_so(tmp_path, capsys):
    """issue 26.6: --data /nonexistent was told it 'is not a folder with train/ and val/ class folders'."""
    missing = tmp_path / "nonexistent"
    err = _cli(capsys, "battle", "--preset", "paper", "--data", str(missing), "--dry-run")
    assert f"data folder {missing} does not exist; pass --data to a folder holding train/ and val/ class folders" in err
    (tmp_path / "f").write_text("x")
    assert f"data path {tmp_path / 'f'} is a file, not a folder" in _cli(capsys, "battle", "--preset", "paper", "--data",
                                                                        str(tmp_path / "f"), "--dry-run")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    assert f"{tmp_path / 'd'} has no val/ folder" in _cli(capsys, "battle", "--preset", "paper", "--data",
                                                        str(tmp_path / "d"), "--dry-run")
    err = _cli(capsys, "battle", "--preset", "paper", "--dry-run")
    assert "preset paper: data.data_path is not set: the study trains on image folders; pass --data DIR" in err
    missing_fmnist = _cli(capsys, "train", "--preset", "fmnist", "--data-path", str(missing), "--output", str(tmp_path / "r"))
    assert f"data folder {missing} does not exist" in missing_fmnist

"""Progress suits where it goes (`spach.terminal`): a bar on a terminal, lines in a file; by one rule for
training, evaluation and the benchmark."""
import sys

import pytest
import torch

from spach import bench
from spach.terminal import track
from spach.train.engine import train
from spach.train.evaluate import evaluate_checkpoint
from test_engine import tiny_cfg


@pytest.fixture
def terminal(monkeypatch):
    """stderr that says it is a terminal (what a person running the command sees)."""
    def on(yes: bool = True) -> None:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: yes, raising=False)
    return on


def test_a_bar_on_a_terminal_lines_in_a_file(capsys, terminal):
    assert list(track(range(3), "phase", name=str)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[:3] == ["phase 1/3: 0", "phase 2/3: 1", "phase 3/3: 2"]
    assert err.splitlines()[3].startswith("phase: done in 0:0")
    terminal()
    assert list(track(range(3), "phase", name=str)) == [0, 1, 2]
    assert "\r" in capsys.readouterr().err  # tqdm's bar


def test_bench_into_a_file_writes_a_line_per_model_not_a_bar(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.run(["spach_ms_xxs_patch4_224_conv"], batch_size=1, img_size=32, quick=True, latency=False)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "spach bench 1/1: spach_ms_xxs_patch4_224_conv", err


def test_training_into_a_file_says_each_phase(tmp_path, capsys, terminal):
    train(tiny_cfg(tmp_path / "r", epochs=1, progress="auto"))
    out = capsys.readouterr().out
    assert "epoch 1/1: training, 8 steps\n" in out and "epoch 1/1: testing on 64 images\n" in out, out
    terminal()
    train(tiny_cfg(tmp_path / "r2", epochs=1, progress="auto"))
    captured = capsys.readouterr()
    assert "epoch 1/1: testing" not in captured.out and "epoch 1/1: testing on 64 images" in captured.err  # its bar


def test_spach_eval_into_a_file_says_what_it_evaluates(tmp_path, capsys):
    train(tiny_cfg(tmp_path / "r", epochs=1))
    capsys.readouterr()
    evaluate_checkpoint(None, str(tmp_path / "r" / "best.pth"), None, "tiny", 32, 0, "cpu")
    assert capsys.readouterr().err == "spach eval: spach on 64 tiny images, cpu\n"

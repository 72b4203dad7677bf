"""benchmarks/vs_reference.py --battle, benchmarks/token_mlp_forms.py, benchmarks/scan_cpu.py and
benchmarks/mixers_cpu.py run end to end (one repeat or round: smoke tests, not measurements)."""
import importlib.util
import pathlib
import re

import pytest

from spach.battle.study import load_study
from spach.models.token_mlp import FORMS

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vs_reference():
    return _load("vs_reference")


def test_battle_mode_runs_every_default_contestant(vs_reference):
    rows = vs_reference.main(["--battle", "--repeats", "1", "--warmup", "0"])
    assert len(rows) == len(load_study(preset="default").contestants) and all(r["fp32"] > 0 and r["bf16"] > 0 for r in rows)


def test_token_mlp_forms_times_every_shape(capsys):
    forms = _load("token_mlp_forms")
    forms.main(["--dtypes", "fp32", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if " infer " in line or " train " in line]
    assert len(rows) == 2 * len(forms.SHAPES) and all(line.split()[-3] in FORMS for line in rows)


def test_mixers_cpu_times_every_contender_against_conv(capsys):
    rows = _load("mixers_cpu").main(["--mixers", "conv,window4,gmlp,window", "--rounds", "1", "--steps", "1", "--batch", "4"])
    assert [r["mixer"] for r in rows] == ["conv", "window4", "gmlp"]  # window7 does not tile the 8x8 grid: left out
    assert all(r["infer"] > 0 and r["train"] > 0 for r in rows)
    assert all(0.9 < r["macs"] / rows[0]["macs"] < 1.1 for r in rows)  # matched in MACs
    out = capsys.readouterr().out
    assert re.search("left out window7: .*window7: 7x7 windows do not tile", out) and "load average after" in out


def test_scan_cpu_times_the_scan_and_the_matched_models():
    rows = _load("scan_cpu").main(["--quick", "--rounds", "1", "--batch", "4"])
    assert [r["what"].split(",")[0] for r in rows[:1]] == ["scan fwd+bwd"] and rows[0]["ratio"] > 0
    models = {r["what"].split(" (")[0]: r for r in rows[1:]}
    assert set(models) == {"conv", "scan", "gatedconv"} and all(r["img_s"] > 0 for r in rows[1:])
    assert all(abs(r["macs"] / models["conv"]["macs"] - 1) <= 0.1 for r in rows[1:])

"""benchmarks/vs_reference.py --battle runs end to end (one repeat: a smoke test, not a measurement)."""
import importlib.util
import pathlib

import pytest

from spach.battle.study import load_study

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vs_reference.py"


@pytest.fixture(scope="module")
def vs_reference():
    spec = importlib.util.spec_from_file_location("vs_reference", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_battle_mode_runs_every_default_contestant(vs_reference):
    rows = vs_reference.main(["--battle", "--repeats", "1", "--warmup", "0"])
    assert len(rows) == len(load_study(preset="default").contestants) and all(r["fp32"] > 0 and r["bf16"] > 0 for r in rows)

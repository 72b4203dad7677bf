"""A fresh install takes the versions the suite passed with (constraints.txt), so a dependency's new
release cannot break it; the newest are taken only when asked for."""
import re
import tomllib
from pathlib import Path

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found.items()}


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs if not r.startswith("spach")]
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in project["dependencies"] + extras}
    pinned = pins()
    assert not names - set(pinned), names - set(pinned)
    assert "+cpu" not in pinned["torch"]  # the CUDA wheel, which also runs on CPU


def make(*args: str) -> str:
    return run_process(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_setup_uses_the_constraints_unless_latest():
    assert "pip install -q -c constraints.txt -e '.[test]'" in make("-B", "setup")
    latest = make("setup", "LATEST=1")  # runs even on a set-up venv
    assert "-c constraints.txt" not in latest and "--upgrade --upgrade-strategy eager -e '.[test]'" in latest
    assert ".venv-latest/bin/python -m pytest" in make("test-latest")

"""`spach battle`: pick the study (a file, a preset, the one already in --output, or the default)
and the launcher (the local pool, or a batch job per run), then run it, or print its plan and cost
estimate (`--dry-run`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from spach.battle.estimate import print_plan
from spach.battle.launchers import make_launcher
from spach.battle.plan import check_data, open_study
from spach.battle.resources import parse_pairs, resolve
from spach.battle.results import STUDY_FILE
from spach.battle.runner import run_battle
from spach.battle.study import list_presets as presets
from spach.battle.study import check_looks, load_study, preset_text
from spach.errors import SpachError
from spach.files import check_writable

OUTPUT_FIX = "give a new folder or a battle's folder"


def battle_command(study_file: str | None = None, preset: str | None = None, output: str | None = None,
                   jobs: int | None = None, data: str | None = None, dry_run: bool = False, report: bool = True,
                   list_presets: bool = False, stream: TextIO | None = None, launcher: str | None = None,
                   resources: dict[str, Any] | None = None, slurm: list[str] | None = None,
                   budget: str | None = None, pilot: str | None = None) -> Path | None:
    """`spach battle`: pick the study (file, preset, the one already in --output, or the default), run it
    with `launcher` (local, submitit-local or slurm; `resources`: the --nodes ... flags, `slurm`: the
    --slurm KEY=VALUE pairs; `budget`: overrides the study's, e.g. "15m", and makes it sequential; `pilot`: a
    pilot's study folder the dry run predicts decisions from)."""
    stream = stream or sys.stdout
    if list_presets:
        for name in presets():
            first = next((ln for ln in preset_text(name).splitlines() if ln.startswith("description")), "")
            print(f"{name:<16} {first.split('=', 1)[-1].strip().strip(chr(34))}", file=stream)
        return None
    if jobs is not None and jobs < 1:
        raise SpachError(f"--jobs must be >= 1, got {jobs}")
    if pilot is not None and not dry_run:
        raise SpachError("--pilot goes with --dry-run (it predicts decisions from a pilot's results); add --dry-run")
    if pilot is not None and not (Path(pilot) / STUDY_FILE).is_file():
        raise SpachError(f"--pilot {pilot}: not a battle's study folder (no {STUDY_FILE}); give the --output folder of a "
                         "pilot battle")
    if output is not None:
        check_writable(output, "--output", "folder", fix=OUTPUT_FIX)
    resuming = study_file is None and preset is None and output is not None and (Path(output) / STUDY_FILE).is_file()
    study = None if resuming else load_study(study_file, preset)
    if data:  # recorded absolute (a resume may start elsewhere); given again on a resume, it wins
        study = study or open_study(Path(output), None)
        study.data["data_path"] = os.path.abspath(os.path.expanduser(data))
    if budget is not None:  # given again on a resume, it wins too
        study = study or open_study(Path(output), None)
        study.budget = budget
        check_looks(study, _budget_flag_error)
    out = Path(output or Path("battles") / study.name)
    if output is None:
        check_writable(out, "--output", "folder", fix=OUTPUT_FIX)
    flags = {k: v for k, v in (resources or {}).items() if v is not None}
    if slurm:
        flags["extra"] = parse_pairs(slurm)
    batch = make_launcher(launcher, out, flags, jobs)
    if dry_run:
        dry_run_study = study or open_study(Path(output), None)
        check_data(dry_run_study)
        if jobs is not None:
            dry_run_study.jobs = jobs
        print_plan(dry_run_study, stream, pilot)
        if batch is not None:
            print(f"each run: one job of {resolve(dry_run_study, batch.flags).describe()}", file=stream)
        return None
    result = run_battle(study, out, jobs=jobs, report=report, stream=stream, launcher=batch)
    if report:
        print(f"report: {result} (and {result.with_suffix('.md')})", file=stream, flush=True)
    return result


def _budget_flag_error(where: str, problem: str) -> None:
    raise SpachError(f"--budget: {problem}" if where == "study.budget" else f"{where}: {problem}")

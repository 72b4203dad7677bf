"""The battle runner: every (contestant, seed) of a study trained by `spach.train.train`, each in its
own run folder, by a launcher: one after another or N at a time in worker processes the battle owns
(`spach.battle.local`, the default), or as batch jobs (`spach.battle.launchers`: Slurm
through submitit). A stop signal starts no new run and lets the runs in flight save (see `pool`).

Resumable by construction: a run whose `summary.json` covers the study's epochs is skipped, any other
is (re)started with `resume="auto"`, so an interrupted run continues from its last checkpoint. A run
that raises is recorded (ledger line + `<run>.error.txt`) and the others go on.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from spach.battle.afford import available_cores
from spach.battle.budget import Clock, parse_budget
from spach.battle.costs import measure_costs
from spach.battle.launcher import Launcher, Progress, ledger_record
from spach.battle.local import LocalPool
from spach.battle.looks import run_sequential
from spach.battle.plan import Run, check_compatible, check_data, open_study, plan
from spach.battle.report import write_report
from spach.battle.results import LEDGER_FILE, STUDY_FILE, Ledger
from spach.battle.study import Study
from spach.errors import SpachError
from spach.files import FolderLock, atomic_write_text, read_json
from spach.humanize import hms
from spach.signals import interrupting


def run_battle(study: Study | None, out: str | Path, jobs: int | None = None, report: bool = True,
               device: str = "cpu", stream: TextIO | None = None, launcher: Launcher | None = None) -> Path:
    """Run (or resume) the study in folder `out` with `launcher` (default: the local pool of `jobs`
    processes); returns the report path (or `out` when `report` is off).

    The process owns the folder until it returns (a second battle on it fails at once, naming this
    one). Every start first reconciles the ledger with the run folders, so a run that finished just
    before a crash is recorded exactly once. Raises a SpachError, after the report, when every run failed."""
    started = time.time()
    out = Path(out)
    stream = stream or sys.stdout
    study = open_study(out, study)
    launcher = launcher or LocalPool(jobs or study.jobs, study.imports)
    launcher.check(study)
    # SIGINT and SIGTERM stop the battle (and a batch launcher's monitor) also when it was started in the
    # background with SIGINT ignored; the local pool and the engine install their own handlers within
    with interrupting(), FolderLock(out, "study folder"):
        runs = plan(study, out)
        check_compatible(runs)
        check_data(study)
        atomic_write_text(out / STUDY_FILE, json.dumps(study.to_dict(), indent=1) + "\n")
        say = functools.partial(print, file=stream, flush=True)
        say(f"battle {study.name}: {len(study.contestants)} contestants x {len(study.seeds)} seeds -> {out}")
        # inference speed is measured where the runs train: here for the local pool, not on a login node
        t_costs = time.time()
        here = isinstance(launcher, LocalPool) or getattr(launcher, "cluster", "") == "local"
        clock = Clock(parse_budget(study.budget), out, started=started, gpus=_gpus(study)) if study.sequential else None
        slots = max(launcher.slots(len(runs)), 1)
        costs = measure_costs(study, out, device, timed=here, threads=max(1, available_cores() // slots),
                              deadline=clock.deadline() if clock else 0.0, jobs=min(slots, available_cores()) if here else 1)
        say(f"costs (params, MACs{', training and evaluation speed' if here else ''}) measured in "
            f"{time.time() - t_costs:.1f} s")
        ledger = Ledger(out / LEDGER_FILE)
        for record in reconcile(runs, ledger):
            say(f"recorded {record['contestant']} seed {record['seed']}: it finished before the last battle stopped")
        pending = [r for r in runs if not r.is_done()]
        progress = Progress(runs, costs, stream, launcher.slots(len(pending)))
        for r in runs:
            r.finished = r not in pending
        say(f"{len(runs) - len(pending)} runs finished earlier, {len(pending)} to run")
        broken = [r for r in pending if "error" in costs.get(r.contestant.name, {})]
        for r in broken:
            cost = costs[r.contestant.name]
            outcome = ledger_record(r, None, f"model does not run: {cost['error']}", time.time())
            atomic_write_text(r.error_file, outcome["error"] + "\n\n" + cost.get("traceback", ""))
            ledger.append(outcome)
            progress.finish(r, outcome)
        pending = [r for r in pending if r not in broken]
        try:
            if clock is not None:
                progress.note = lambda: f"budget left {clock.budget.show(clock.left(ledger))}"
                run_sequential(study, runs, out, lambda wave, guard: launcher.run(wave, progress, ledger, guard), ledger,
                               clock, costs, launcher.slots(len(pending)), say)
            else:
                launcher.run(pending, progress, ledger)
        except KeyboardInterrupt:
            say(launcher.stopped(out))
            raise
        say(f"battle {study.name}: finished in {hms(time.time() - progress.started)}")
        t_report = time.time()
        result = write_report(out) if report else out
        if report:
            say(f"report written in {time.time() - t_report:.1f} s; the battle took {hms(time.time() - started)} in all")
    records = ledger.records()
    tried = {(r["contestant"], r["seed"]) for r in records}
    failed = [r for r in runs if (r.contestant.name, r.seed) in tried and not r.is_done()]
    if failed and len(failed) == len(tried):
        first = next((rec["error"] for rec in records if rec.get("status") == "failed" and "error" in rec), "unknown error")
        raise SpachError(f"all {len(failed)} runs of {study.name} that were tried failed (first error: {first}); see "
                         f"{result if report else out / LEDGER_FILE} and the runs' .error.txt files")
    return result


def _gpus(study: Study) -> int:
    """GPUs one run holds (a GPU-hour budget's unit): the study's [slurm] nodes x GPUs per node, else 1."""
    return max(int(study.slurm.get("nodes", 1)), 1) * max(int(study.slurm.get("gpus_per_node", 1)), 1)


def reconcile(runs: list[Run], ledger: Ledger) -> list[dict[str, Any]]:
    """Append a ledger line for every finished run the ledger does not record as done (the battle was
    killed between the run's summary.json and its ledger line); returns the lines added."""
    recorded = {(r.get("contestant"), r.get("seed")) for r in ledger.records() if r.get("status") == "done"}
    added = []
    for run in runs:
        if run.is_done() and (run.contestant.name, run.seed) not in recorded:
            summary = read_json(run.folder / "summary.json")
            record = {**ledger_record(run, summary, None, time.time()), "attempt_s": None, "reconciled": True}
            ledger.append(record)
            added.append(record)
    return added

"""`--launcher local`: a battle's runs trained here, one after another in this process or `jobs` at a
time in worker processes the battle owns (`spach.battle.pool`). A stop signal starts no new run and lets
the runs in flight save; a run the budget cannot pay for does not start, and one in flight stops at the
battle's deadline (the engine's `Deadline`), its checkpoint saved."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import torch

from spach.battle.afford import available_cores
from spach.battle.launcher import Guard, Launcher, Progress, execute, ledger_record
from spach.battle.plan import Run
from spach.battle.pool import NOT_STARTED, Workers, catching_stops
from spach.battle.results import Ledger, read_jsonl
from spach.battle.study import Study, check_runnable
from spach.errors import first_line
from spach.files import atomic_write_text, os_error, read_json
from spach.plugins import import_plugins
from spach.terminal import resolve_mode
from spach.train.runtime import StopFlag


def _worker_init(threads: int, imports: list[str]) -> None:
    torch.set_num_threads(threads)
    import_plugins(imports)


class LocalPool(Launcher):
    """`--launcher local`: the runs train here, one after another or `jobs` at a time in spawned processes."""

    def __init__(self, jobs: int, imports: list[str]):
        # two jobs on one core (taskset, a cgroup) only share it: the pool runs no more jobs than cores
        self.jobs, self.imports = min(jobs, available_cores()), imports
        self.halt = Halt()

    def check(self, study: Study) -> None:
        check_runnable(study)

    def slots(self, pending: int) -> int:
        return self.jobs

    def run(self, runs: list[Run], progress: Progress, ledger: Ledger, guard: Guard | None = None) -> dict[str, Any]:
        self.halt = Halt()
        if self.jobs <= 1:
            _run_serial(runs, progress, ledger, self.halt, guard)
        else:
            _run_parallel(runs, progress, ledger, self.jobs, self.imports, self.halt, guard)
        return {"walled": self.halt.walled}

    def stopped(self, out: Path) -> str:
        return self.halt.message(out)


def _run_serial(runs: list[Run], progress: Progress, ledger: Ledger, halt: Halt, guard: Guard | None) -> None:
    bar = resolve_mode("auto")  # the engine's within-epoch bar on a terminal, else its log lines
    with catching_stops() as stop:  # between runs; inside one, the engine's own handler saves and stops it
        for i, run in enumerate(runs):
            if stop:
                halt.unstarted = len(runs) - i
                raise KeyboardInterrupt
            if not halt.admit(run, progress, guard):
                continue
            progress.say(run, f"training ({'resuming' if progress.epochs_done[id(run)] else 'starting'}, "
                              f"{run.config.epochs} epochs)")
            started = time.time()
            try:
                outcome = execute(run, lambda rec, run=run: progress.epoch(run, rec), progress=bar)
            except KeyboardInterrupt as e:
                halt.record(run, cut_short(run, e, started), progress, ledger)
                halt.unstarted = len(runs) - i - 1
                raise
            halt.record(run, outcome, progress, ledger)


def _run_parallel(runs: list[Run], progress: Progress, ledger: Ledger, jobs: int, imports: list[str],
                  halt: Halt, guard: Guard | None) -> None:
    """`jobs` runs at a time in worker processes sharing the cores; progress is read from their metrics files.
    A stop signal (see `spach.battle.pool`) starts nothing new and lets the runs in flight save."""
    threads = max(1, available_cores() // jobs)
    started: dict[int, float] = {}

    def start(run: Run) -> None:
        started[id(run)] = time.time()
        progress.say(run, "training")

    def tick() -> None:
        for run in runs:
            if id(run) in started and not run.finished:
                for rec in read_jsonl(run.folder / "metrics.jsonl", live=True)[progress.epochs_done[id(run)]:]:
                    progress.epoch(run, rec)

    def done(run: Run, outcome: dict[str, Any]) -> None:
        tick()
        if outcome["status"] == "lost":
            if stop:  # killed while stopping (a second Ctrl-C)
                outcome = {"status": "interrupted", "saved": False}
            else:
                outcome = ledger_record(run, None, outcome["error"], started[id(run)])
                atomic_write_text(run.error_file, outcome["error"] + "\n")
        halt.record(run, outcome, progress, ledger)

    workers = Workers(jobs, functools.partial(_worker_init, threads, imports), _attempt)
    with catching_stops() as stop:
        left = workers.run(runs, stop, start, done, tick, lambda run: halt.admit(run, progress, guard))
        halt.unstarted += sum(1 for run in left if run.name not in halt.walled)
    if stop:
        raise KeyboardInterrupt


def _attempt(run: Run) -> dict[str, Any]:
    """One run in a worker process (its stderr, too, goes to the run's log)."""
    started = time.time()
    try:
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log_file, "a") as log, contextlib.redirect_stderr(log):
            return execute(run)
    except OSError as e:
        return ledger_record(run, None, first_line(os_error(e, run.log_file)), started)
    except KeyboardInterrupt as e:
        return cut_short(run, e, started)


def cut_short(run: Run, e: KeyboardInterrupt, started: float) -> dict[str, Any]:
    """The outcome of a run a stop signal ended: done (it had just finished), or interrupted, `saved`
    unless the engine was aborted (a second SIGINT, raised by its handler) before it saved."""
    if run.is_done():
        return ledger_record(run, read_json(run.folder / "summary.json"), None, started)
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    aborted = tb is not None and tb.tb_frame.f_code is StopFlag.__call__.__code__
    return {"status": "interrupted", "saved": not aborted}


@dataclasses.dataclass
class Halt:
    """What the runs of a local battle became, for a true message when a stop signal ends it."""

    finished: int = 0
    saved: list[str] = dataclasses.field(default_factory=list)
    unsaved: list[str] = dataclasses.field(default_factory=list)
    unstarted: int = 0
    walled: list[str] = dataclasses.field(default_factory=list)  # kept from starting, or stopped, by the budget's wall

    def admit(self, run: Run, progress: Progress, guard: Guard | None) -> bool:
        """Whether `run` may start now; a refusal is told and remembered."""
        why = guard(run) if guard is not None else ""
        if why:
            run.finished = True
            self.walled.append(run.name)
            progress.say(run, f"not started: {why}")
        return not why

    def record(self, run: Run, outcome: dict[str, Any], progress: Progress, ledger: Ledger) -> None:
        if outcome == NOT_STARTED:
            self.unstarted += 1
            progress.say(run, "stopped before it started")
            return
        if outcome.get("deadline"):
            run.finished = True
            self.walled.append(run.name)
            progress.say(run, "stopped at the budget's wall: its checkpoint is saved (a larger budget resumes it)")
            return
        if outcome["status"] == "interrupted":
            (self.saved if outcome["saved"] else self.unsaved).append(run.name)
            progress.say(run, "stopped: its checkpoint is saved" if outcome["saved"] else
                         "stopped before saving: it resumes from its last checkpoint")
            return
        ledger.append(outcome)
        progress.finish(run, outcome)
        self.finished += 1

    def message(self, out: Path) -> str:
        parts = [f"{self.finished} run(s) finished in this battle and are recorded"]
        if self.saved:
            parts.append(f"{', '.join(self.saved)} saved a checkpoint when stopped")
        if self.unsaved:
            parts.append(f"{', '.join(self.unsaved)} stopped without saving (they resume from their last checkpoint)")
        if self.unstarted:
            parts.append(f"{self.unstarted} run(s) did not start")
        return f"battle interrupted: {'; '.join(parts)}; resume with: spach battle --output {out}"

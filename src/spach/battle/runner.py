"""The battle runner: every (contestant, seed) of a study trained by `spach.train.train`, each in its
own run folder, by a launcher: one after another or N at a time in worker processes the battle owns
(`LocalPool`, the default; `spach.battle.pool`), or as batch jobs (`spach.battle.launchers`: Slurm
through submitit). A stop signal starts no new run and lets the runs in flight save (see `pool`).

Resumable by construction: a run whose `summary.json` covers the study's epochs is skipped, any other
is (re)started with `resume="auto"`, so an interrupted run continues from its last checkpoint. A run
that raises is recorded (ledger line + `<run>.error.txt`) and the others go on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from spach.battle.costs import measure_costs
from spach.battle.afford import available_cores
from spach.battle.budget import Clock, parse_budget
from spach.battle.looks import run_sequential
from spach.battle.plan import Run, check_compatible, check_data, epoch_images, open_study, plan
from spach.battle.pool import NOT_STARTED, Workers, catching_stops
from spach.battle.report import write_report
from spach.battle.results import LEDGER_FILE, STUDY_FILE, Ledger, read_jsonl
from spach.battle.study import Study, check_runnable
from spach.errors import SpachError, first_line
from spach.files import FolderLock, atomic_write_text, os_error, read_json
from spach.humanize import hms
from spach.plugins import import_plugins
from spach.signals import interrupting
from spach.train.engine import Deadline, train
from spach.terminal import resolve_mode
from spach.train.runtime import StopFlag

Guard = Callable[[Run], str]  # '' when the run may start now, else why not (the budget's wall)


def ledger_record(run: Run, summary: dict | None, error: str | None, started: float) -> dict[str, Any]:
    """The ledger line of one run attempt."""
    rec = {"contestant": run.contestant.name, "seed": run.seed, "status": "done" if error is None else "failed",
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "attempt_s": round(time.time() - started, 1)}
    if summary:
        rec.update({k: summary.get(k) for k in ("final_top1", "best_top1", "final_train_loss", "epochs", "wall_time_s")})
    if error is not None:
        rec["error"] = error
    return rec


def execute(run: Run, on_epoch: Callable[[dict], None] | None = None, progress: str = "lines") -> dict[str, Any]:
    """Train one run (resuming it if it was interrupted); never raises for a failing run, except
    KeyboardInterrupt. The engine's own output goes to `<run>.log`."""
    started = time.time()
    run.error_file.unlink(missing_ok=True)
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg = dataclasses.replace(run.config, resume="auto", progress=progress)
        with open(run.log_file, "a") as log, contextlib.redirect_stdout(log):
            summary = train(cfg, on_epoch_end=on_epoch)
        return ledger_record(run, summary, None, started)
    except Deadline:  # the budget's wall: saved, and a later battle with more budget resumes it
        return {"status": "interrupted", "saved": True, "deadline": True}
    except Exception as e:
        error = first_line(e) if isinstance(e, SpachError) else f"{type(e).__name__}: {first_line(e)}"
        atomic_write_text(run.error_file, traceback.format_exc())
        return ledger_record(run, None, error, started)


def _worker_init(threads: int, imports: list[str]) -> None:
    torch.set_num_threads(threads)
    import_plugins(imports)


class Progress:
    """Lines on `stream`: which run, its epoch, and ETAs for the run and the whole study. An epoch's time
    is predicted from the contestant's own epochs, else from the seconds per unit of work seen so far
    (MACs x images, a training image counting three forward passes)."""

    def __init__(self, runs: list[Run], costs: dict[str, dict], stream: TextIO, jobs: int = 1):
        self.runs, self.costs, self.stream, self.jobs = runs, costs, stream, jobs
        self.index = {id(r): i + 1 for i, r in enumerate(runs)}
        self.epoch_times: dict[str, list[float]] = {}
        self.epochs_done: dict[int, int] = {}
        self.started = time.time()
        self.note: Callable[[], str] | None = None  # appended to epoch lines (a sequential battle's budget left)
        for r in runs:
            recs = read_jsonl(r.folder / "metrics.jsonl", live=True)
            self.epochs_done[id(r)] = len(recs)
            self.epoch_times.setdefault(r.contestant.name, []).extend(x.get("epoch_time", math.nan) for x in recs)

    def say(self, run: Run | None, text: str) -> None:
        head = f"[{self.index[id(run)]:>{len(str(len(self.runs)))}}/{len(self.runs)}] {run.name}: " if run else ""
        print(head + text, file=self.stream, flush=True)

    def _work(self, run: Run) -> float:
        trained, scored = epoch_images(run.config)
        return self.costs.get(run.contestant.name, {}).get("macs", 0) * (3 * trained + scored)

    def _epoch_time(self, run: Run) -> float:
        own = [t for t in self.epoch_times.get(run.contestant.name, []) if math.isfinite(t)]
        if own:
            return sum(own) / len(own)
        work = {r.contestant.name: self._work(r) for r in self.runs}
        seen = [(sum(t for t in ts if math.isfinite(t)), len(ts) * work.get(n, 0))
                for n, ts in self.epoch_times.items() if ts]
        secs, total = sum(s for s, _ in seen), sum(w for _, w in seen)
        return secs / total * self._work(run) if total else math.nan

    def remaining(self, run: Run) -> float:
        if run.is_done():
            return 0.0
        return (run.config.epochs - self.epochs_done[id(run)]) * self._epoch_time(run)

    def epoch(self, run: Run, rec: dict[str, Any]) -> None:
        self.epochs_done[id(run)] = rec["epoch"]
        self.epoch_times.setdefault(run.contestant.name, []).append(rec.get("epoch_time", math.nan))
        left = [r for r in self.runs if not r.finished]
        study_eta = sum(self.remaining(r) for r in left) / max(1, min(self.jobs, len(left)))
        scored = f"test top-1 {rec['top1']:.2f}%" if isinstance(rec.get("top1"), (int, float)) else "not scored"
        self.say(run, f"epoch {rec['epoch']}/{run.config.epochs}  train loss {rec['train_loss']:.3f}  "
                      f"{scored}  {rec.get('images_per_s', 0):.0f} img/s  |  "
                      f"run ETA {hms(self.remaining(run))}  "
                      + (self.note() if self.note else f"study ETA {hms(study_eta)}"))

    def finish(self, run: Run, outcome: dict[str, Any]) -> None:
        run.finished = True
        if outcome["status"] == "done":
            self.say(run, f"done: test top-1 {outcome.get('final_top1') or math.nan:.2f}% in {hms(outcome['attempt_s'])}")
        else:
            log = f", log: {outcome['log']}" if outcome.get("log") else ""
            self.say(run, f"FAILED: {outcome['error']} (traceback: {run.error_file}{log})")


class Launcher(ABC):
    """How a battle's pending runs get trained; `run_battle` plans, records and reports around it."""

    @abstractmethod
    def check(self, study: Study) -> None:
        """Refuse (SpachError) what cannot run, before anything trains or is submitted."""

    def slots(self, pending: int) -> int:
        """How many runs train at once (the study ETA divides by it)."""
        return 1

    @abstractmethod
    def run(self, runs: list[Run], progress: Progress, ledger: Ledger, guard: Guard | None = None) -> dict[str, Any]:
        """Train `runs`: each outcome appended to `ledger` and told to `progress.finish`. A run that `guard`
        refuses when its turn comes does not start (it would not finish within the budget); returns
        {"walled": the names of the runs the budget's wall kept from starting or stopped}."""

    @abstractmethod
    def stopped(self, out: Path) -> str:
        """What to tell when Ctrl-C stops the battle."""


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
        costs = measure_costs(study, out, device, timed=here,
                              threads=max(1, available_cores() // max(launcher.slots(len(runs)), 1)),
                              deadline=clock.deadline() if clock else 0.0)
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
            outcome = ledger_record(r, None, f"model does not run: {costs[r.contestant.name]['error']}", time.time())
            atomic_write_text(r.error_file, outcome["error"] + "\n")
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

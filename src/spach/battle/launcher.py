"""What every battle launcher shares: how one run is trained and recorded (`execute`, `ledger_record`),
the progress lines of a battle, and the `Launcher` interface (the local pool, `spach.battle.local`;
batch jobs through submitit, `spach.battle.launchers`). A `Guard` keeps a run from starting when the
budget cannot pay for it (`spach.battle.looks.run_sequential`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, TextIO

from spach.battle.plan import Run, epoch_images
from spach.battle.results import Ledger, read_jsonl
from spach.battle.study import Study
from spach.errors import SpachError, first_line
from spach.files import atomic_write_text
from spach.humanize import hms
from spach.train.engine import Deadline, train

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

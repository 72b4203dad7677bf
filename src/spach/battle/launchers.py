"""Launchers behind `spach battle --launcher`: `local` (the process pool, `runner.LocalPool`) and the
batch launchers through submitit: `slurm` (one Slurm job per run) and `submitit-local` (the same jobs
as processes on this machine, through submitit's `LocalExecutor`: how the tests run them).

A batch battle is a monitor: it submits every pending run as one job (recording the job id in the
run's `JobLog`), then watches the queue and the run folders, and records each outcome in the ledger.
Stopped and re-run, it first reads the job ids back: a job still in the queue is watched, not
submitted again; a job that ended while nobody watched is recorded and its run submitted again. The
study folder (on a filesystem the cluster shares) is the single source of truth; the launcher and
its flags are recorded there (`launcher.json`), so `spach battle --output DIR` continues as started.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spach.battle.job import JOBS_SUFFIX, JobLog, RunJob
from spach.battle.plan import Run
from spach.battle.resources import Resources, flag_name, resolve
from spach.battle.results import LEDGER_FILE, RUNS_DIR, Ledger, read_jsonl
from spach.battle.runner import Guard, Launcher, Progress, ledger_record
from spach.battle.study import Study, check_runnable
from spach.errors import SpachError, first_line
from spach.files import atomic_write_text, read_json

LAUNCHERS = ("local", "submitit-local", "slurm")
CLUSTERS = {"submitit-local": "local", "slurm": "slurm"}  # submitit's executor of each batch launcher
SETTINGS_FILE = "launcher.json"
JOBS_DIR = "jobs"  # submitit's folder: <job id>_submission.sh (the sbatch script), pickles, <job id>_<task>_log.*
SLURM_TOOLS = ("sbatch", "srun", "sacct")
MAX_TIMEOUTS = 30  # requeues after a time limit before a run is given up (DeiT's slurm_max_num_timeout)
# Slurm job states in which a job may still run (sacct; RUNNING also on this machine); any other means it has ended
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING",
          "COMPLETING", "SIGNALING", "STAGE_OUT", "UNKNOWN"}
TABLE_EVERY_S = 1800  # the state of every run, again after this long (and once the first jobs are out)
PREEMPT_WAIT_S = 600  # a PREEMPTED job is back in the queue within seconds (--requeue); after this long it has ended


def make_launcher(name: str | None, out: Path, flags: dict[str, Any], jobs: int | None = None) -> Launcher | None:
    """The launcher of `spach battle --launcher NAME` on study folder `out` (None: the local pool).
    Without --launcher, the one recorded in `out` (or local); its recorded flags hold unless given again."""
    recorded = read_json(out / SETTINGS_FILE) or {}
    before = recorded.get("launcher")
    name = name or before or "local"
    if name not in LAUNCHERS:
        raise SpachError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}")
    if before and before != name:
        busy = unfinished_jobs(out)
        if busy:
            raise SpachError(f"{out} runs its jobs with --launcher {before} and {busy[0]} is not recorded as ended; "
                             f"re-run with --launcher {before} to watch it (or cancel the jobs first)")
    if name == "local":
        if flags:
            raise SpachError(f"{flag_name(next(iter(flags)))} sets the resources of a batch job; add --launcher slurm "
                             "(or submitit-local)")
        return None
    if before == name:
        old = recorded.get("flags", {})
        flags = {**old, **flags, "extra": {**old.get("extra", {}), **flags.get("extra", {})}}
        jobs = jobs or recorded.get("jobs")
    return SubmititLauncher(name, out, {k: v for k, v in flags.items() if v != {}}, jobs)


def unfinished_jobs(out: Path) -> list[str]:
    """'job N of <run>' for every run whose latest job has no ledger line."""
    recorded = {str(r.get("job_id")) for r in read_jsonl(out / LEDGER_FILE) if r.get("job_id")}
    busy = []
    for path in sorted((out / RUNS_DIR).glob(f"*/*{JOBS_SUFFIX}")):
        seed = path.name.removesuffix(JOBS_SUFFIX)
        last = next((e for e in reversed(read_jsonl(path, live=True)) if e.get("event") == "submitted"), None)
        if last and str(last["job_id"]) not in recorded and not (path.parent / seed / "summary.json").is_file():
            busy.append(f"job {last['job_id']} of {path.parent.name} {seed}")
    return busy


@dataclass
class Watch:
    """A job the monitor follows, and what it has told about it so far."""

    run: Run
    job_id: str
    submitted: float
    seen: int = 0  # events of the job's JobLog told so far
    starts: int = 0
    requeues: int = 0
    ended_at: float | None = None  # when the queue first said the job had ended

    @property
    def state(self) -> str:
        return "pending" if not self.starts else "requeued" if self.requeues >= self.starts else "running"


class SubmititLauncher(Launcher):
    """`--launcher slurm` / `submitit-local`: every pending run one job, then the monitor."""

    def __init__(self, name: str, out: Path, flags: dict[str, Any], limit: int | None = None,
                 poll_s: float | None = None):
        self.name, self.cluster, self.out, self.flags, self.limit = name, CLUSTERS[name], Path(out), flags, limit
        self.poll_s = poll_s or (30.0 if self.cluster == "slurm" else 1.0)
        self.grace_s = 3 * self.poll_s if self.cluster == "slurm" else 0.0  # for a shared filesystem's lag
        self.resources = Resources()
        self.imports: list[str] = []
        self.study_name = ""
        self.executor: Any = None
        self.handles: dict[str, Any] = {}  # the jobs submitted by this process
        self.watching: list[Watch] = []
        self.summary = ""
        self.table_at = 0.0

    # ------------------------------------------------------------------ before anything is submitted
    def check(self, study: Study) -> None:
        try:
            import submitit  # optional dependency (spach[slurm]): only the batch launchers need it
        except ImportError:
            raise SpachError(f"--launcher {self.name} needs submitit: pip install 'spach[slurm]'") from None
        if self.cluster == "slurm":
            missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
            if missing:
                raise SpachError(f"--launcher slurm: {missing[0]} is not on PATH (no Slurm here); run the battle on "
                                 "the cluster's login node, or use --launcher local")
        else:
            check_runnable(study)  # the jobs train on this machine
        self.resources = resolve(study, self.flags)
        self.imports, self.study_name = study.imports, study.name
        if self.cluster == "local":
            self._check_here(self.resources)
        self.executor = submitit.AutoExecutor(self.out / JOBS_DIR, cluster=self.cluster,
                                              slurm_max_num_timeout=MAX_TIMEOUTS)
        for key, value in self.resources.parameters(f"spach-{study.name}").items():
            try:
                self.executor.update_parameters(**{key: value})
            except (NameError, ValueError, TypeError, AssertionError) as e:
                raise SpachError(f"submitit refuses {key} = {value!r}: {first_line(e)}") from None

    @staticmethod
    def _check_here(res: Resources) -> None:
        if res.nodes > 1:
            raise SpachError(f"--nodes: --launcher submitit-local runs on this machine; got {res.nodes} nodes, use 1")
        if res.gpus_per_node > torch.cuda.device_count():
            raise SpachError(f"--gpus-per-node: {res.gpus_per_node} asked for, this machine has "
                             f"{torch.cuda.device_count()}; use --launcher slurm for a cluster's GPUs")

    def slots(self, pending: int) -> int:
        return max(1, min(pending, self.limit or pending))

    def stopped(self, out: Path) -> str:
        where = "in the Slurm queue" if self.cluster == "slurm" else "running on this machine"
        cancel = f"; scancel stops a job (the ids are in {out / RUNS_DIR}/*/*{JOBS_SUFFIX})" if self.cluster == "slurm" else ""
        return (f"monitor stopped: {len(self.watching)} job(s) stay {where} and keep training; re-run "
                f"'spach battle --output {out}' to watch them again and build the report{cancel}")

    # ------------------------------------------------------------------ the monitor
    def run(self, runs: list[Run], progress: Progress, ledger: Ledger, guard: Guard | None = None) -> dict[str, Any]:
        progress.say(None, f"{self.name}: each run one job of {self.resources.describe()}; jobs in {self.out / JOBS_DIR}")
        watching, queue = self._attach(runs, progress, ledger)
        self.watching = watching  # the list the loop updates: stopped() counts the jobs still watched
        if watching:
            self._record_settings()
        submitted, walled = False, []
        while watching or queue:
            while queue and len(watching) < (self.limit or len(queue) + len(watching)):
                run = queue.pop(0)
                why = guard(run) if guard is not None else ""
                if why:  # the budget cannot pay for it: not submitted
                    walled.append(run.name)
                    progress.say(run, f"not submitted: {why}")
                    continue
                try:
                    watching.append(self.submit(run))
                except SpachError as e:
                    if not submitted:
                        raise  # Slurm refuses the first job: nothing was submitted, one line says why
                    self._finish(ledger, progress, run, self._failed(run, str(e), time.time(), None))
                    continue
                if not submitted:
                    self._record_settings()
                submitted = True
                progress.say(run, f"submitted: job {watching[-1].job_id} (pending)")
            states = self._states([w.job_id for w in watching])
            for w in list(watching):
                outcome = self._poll(w, states.get(w.job_id, "UNKNOWN"), progress)
                if outcome is not None:
                    watching.remove(w)
                    self._finish(ledger, progress, w.run, outcome)
            self._say_queue(watching, queue, progress)
            if time.time() - self.table_at > TABLE_EVERY_S and (watching or queue):
                self._say_table(watching, queue, progress)
            if watching or queue:
                time.sleep(self.poll_s)
        return {"walled": walled}

    def _record_settings(self) -> None:
        """launcher.json: how this study's jobs are run, the default of the next battle on the folder."""
        settings = {"launcher": self.name, "flags": self.flags, "jobs": self.limit, "resources": self.resources.describe()}
        atomic_write_text(self.out / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")

    def _attach(self, runs: list[Run], progress: Progress, ledger: Ledger) -> tuple[list[Watch], list[Run]]:
        """Watch the runs whose latest job may still be in the queue; queue the others for submission
        (recording first how a job that ended while nobody watched went)."""
        recorded = {str(r.get("job_id")) for r in ledger.records() if r.get("job_id")}
        last = {id(r): JobLog(r).last_job() for r in runs}
        ids = [str(j["job_id"]) for j in last.values() if j and str(j["job_id"]) not in recorded]
        states = self._states(ids)
        watching, queue = [], []
        for run in runs:
            job = last[id(run)]
            if job is None or str(job["job_id"]) in recorded:
                queue.append(run)
                continue
            w = Watch(run, str(job["job_id"]), time.mktime(time.strptime(job["time"], "%Y-%m-%dT%H:%M:%S")))
            outcome = self._poll(w, states.get(w.job_id, "UNKNOWN"), progress, quiet=True, ended=True)
            if outcome is None:
                watching.append(w)
                epoch = progress.epochs_done[id(run)]
                progress.say(run, f"job {w.job_id} is already in the queue ({w.state}"
                                  f"{f', epoch {epoch}/{run.config.epochs}' if epoch else ''}): watching it")
            else:
                ledger.append(outcome)
                progress.say(run, f"job {w.job_id} ended while the battle was away ({outcome['status']}"
                                  f"{': ' + outcome['error'] if outcome.get('error') else ''}); submitting it again")
                queue.append(run)
        return watching, queue

    def submit(self, run: Run) -> Watch:
        """Submit `run` as one job (its id recorded in the run's JobLog); a refusal is a SpachError with Slurm's message."""
        import submitit  # optional dependency (spach[slurm]): only the batch launchers need it

        self.executor.update_parameters(name=f"spach-{self.study_name}-{run.contestant.name}-seed{run.seed}")
        failures = (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError)
        # Ctrl-C waits until the job id is recorded, so a job in the queue is always known (sbatch inherits the
        # mask and finishes too; not on this machine, where the job's own processes would inherit it)
        stops = {signal.SIGINT, signal.SIGTERM}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, stops) if self.cluster == "slurm" else None
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's refusal; we say it once
                job = self.executor.submit(RunJob(run, self.imports, self.resources.cpus_per_task))
            JobLog(run).append("submitted", job.job_id, launcher=self.name, log=str(self._log(job.job_id)))
        except failures as e:
            raise SpachError(f"Slurm refused the job of {run.name}: {slurm_message(e)}; check --partition, --account "
                             "and --slurm (sinfo lists the partitions, sacctmgr show associations user=$USER "
                             "your accounts)") from None
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.handles[job.job_id] = job
        return Watch(run, job.job_id, time.time())

    def _states(self, job_ids: list[str]) -> dict[str, str]:
        """The queue's state of each job: a Slurm state (one sacct call for all), or on this machine
        RUNNING while the job's controller process lives, else ENDED."""
        if not job_ids:
            return {}
        if self.cluster == "local":
            return {j: self._local_state(j) for j in job_ids}
        import submitit  # optional dependency (spach[slurm]): only the batch launchers need it

        watcher = submitit.SlurmJob.watcher
        for j in job_ids:
            watcher.register_job(j)
        watcher.update()
        return {j: (watcher.get_state(j, mode="cache").split() or ["UNKNOWN"])[0].upper() for j in job_ids}

    def _local_state(self, job_id: str) -> str:
        job = self.handles.get(job_id)
        if job is not None:
            return "RUNNING" if job.get_info()["jobState"] == "RUNNING" else "ENDED"
        try:  # a job submitted by an earlier monitor: its controller process, if it still runs
            alive = b"submitit.local._local" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
        except (OSError, ValueError):
            alive = False
        return "RUNNING" if alive else "ENDED"

    def _poll(self, w: Watch, state: str, progress: Progress, quiet: bool = False, ended: bool = False) -> dict | None:
        """Tell what changed for job `w`; its outcome (a ledger line) once it has ended, else None."""
        events = JobLog(w.run).events(w.job_id)
        for event in events[w.seen:]:
            if event.get("event") == "started":
                w.starts += 1
                again = f" (start {w.starts}: resuming from its checkpoint)" if w.starts > 1 else ""
                text = f"running: job {w.job_id} on {event.get('host', '?')}{again}"
            elif event.get("event") == "requeued":
                w.requeues += 1
                text = f"requeued: job {w.job_id} was preempted or reached its time limit; it resumes from its checkpoint"
            else:
                continue
            if not quiet:
                progress.say(w.run, text)
        w.seen = len(events)
        for rec in read_jsonl(w.run.folder / "metrics.jsonl", live=True)[progress.epochs_done[id(w.run)]:]:
            if quiet:
                progress.epochs_done[id(w.run)] = rec["epoch"]
            else:
                progress.epoch(w.run, rec)
        finished = next((e for e in events if e.get("event") == "finished"), None)
        if finished is not None:
            return {**finished["record"], "job_id": w.job_id, "launcher": self.name, "log": str(self._log(w.job_id))}
        if state in ACTIVE:
            w.ended_at = None
            return None
        w.ended_at = w.ended_at or time.time()
        wait = PREEMPT_WAIT_S if state == "PREEMPTED" else 0.0 if ended else self.grace_s
        if time.time() - w.ended_at < wait:
            return None
        stopped = any(e.get("event") == "stopped" for e in events)
        why = f"job {w.job_id} ended ({state}) without finishing" + (": stopped, its checkpoint is kept" if stopped else "")
        return self._failed(w.run, why, w.submitted, w.job_id)

    def _failed(self, run: Run, error: str, started: float, job_id: str | None) -> dict[str, Any]:
        """The ledger line of a job that failed outside the run (refused, killed, lost), and its .error.txt."""
        log = self._log(job_id) if job_id else None
        tail = log.read_text(errors="replace").splitlines()[-40:] if log and log.is_file() else []
        atomic_write_text(run.error_file, "\n".join([error, *([f"log: {log}", *tail] if log else [])]) + "\n")
        return {**ledger_record(run, None, error, started), "launcher": self.name,
                **({"job_id": job_id, "log": str(log)} if job_id else {})}

    def _log(self, job_id: str) -> Path:
        """The job's rank-0 stderr (submitit's log; the engine's own output is in the run's .log)."""
        return self.out / JOBS_DIR / f"{job_id}_0_log.err"

    @staticmethod
    def _finish(ledger: Ledger, progress: Progress, run: Run, outcome: dict[str, Any]) -> None:
        ledger.append(outcome)
        progress.finish(run, outcome)

    def _say_queue(self, watching: list[Watch], queue: list[Run], progress: Progress) -> None:
        counts = {s: sum(w.state == s for w in watching) for s in ("pending", "running", "requeued")}
        done = sum(r.is_done() for r in progress.runs)
        failed = sum(r.finished and not r.is_done() and r.error_file.exists() for r in progress.runs)
        line = (f"queue: {counts['pending'] + len(queue)} pending, {counts['running']} running, {counts['requeued']} "
                f"requeued; {done} done, {failed} failed (of {len(progress.runs)} runs)")
        if line != self.summary:
            self.summary = line
            progress.say(None, line)


    def _say_table(self, watching: list[Watch], queue: list[Run], progress: Progress) -> None:
        """One line per run of the study: done, failed, to submit, or its job's state (and epoch)."""
        self.table_at = time.time()
        jobs, waiting = {id(w.run): w for w in watching}, {id(r) for r in queue}
        for run in progress.runs:
            w = jobs.get(id(run))
            if w is not None:
                epoch = progress.epochs_done[id(run)]
                state = f"{w.state} (job {w.job_id}{f', epoch {epoch}/{run.config.epochs}' if epoch else ''})"
            else:
                state = "to submit" if id(run) in waiting else "done" if run.is_done() else "failed"
            progress.say(run, state)


def slurm_message(e: BaseException) -> str:
    """Slurm's refusal as one line: sbatch's error lines without their 'sbatch: error: ' prefix."""
    lines = [ln.strip().removeprefix("sbatch: error:").strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(dict.fromkeys(lines)) or type(e).__name__

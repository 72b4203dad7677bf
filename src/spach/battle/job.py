"""One run as a batch job: the callable submitit runs on the cluster (`RunJob`), and the run's job
record in the study folder (`JobLog`).

A job has one task per GPU (submitit's model); the tasks set torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from `submitit.JobEnvironment` and call the same `train(cfg)`
that `torchrun -m spach train` runs, so a multi-GPU run is one distributed training. Rank 0 trains
through the battle's `execute` (the run's `.log`, `.error.txt` and ledger line, as a local run).

Preemption and time limits: submitit sends USR2 (Slurm's `--signal`, before the time limit); the job
hands it to the engine as a stop (the engine saves a mid-epoch checkpoint at the next step), then to
submitit's own handler, which calls `RunJob.checkpoint` and requeues the same job: it resumes with
`resume="auto"`. SIGTERM (scancel, preemption) also saves a checkpoint; the job then ends.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import time
from typing import Any

import torch

from spach.battle.plan import Run
from spach.battle.runner import execute
from spach.files import append_jsonl, read_jsonl
from spach.plugins import import_plugins
from spach.train.engine import train
from spach.train.runtime import StopFlag

JOBS_SUFFIX = ".jobs.jsonl"


class JobLog:
    """`runs/<contestant>/seed<k>.jobs.jsonl`: the batch jobs of one run, one appended line per event:
    `submitted` (by the battle, with the job id), then from the job's rank 0: `started` (again after
    each requeue), `requeued`, `stopped` (a SIGTERM/SIGINT saved a checkpoint) and `finished` (with
    the run's ledger line, done or failed)."""

    def __init__(self, run: Run):
        self.path = run.folder.with_name(run.folder.name + JOBS_SUFFIX)

    def append(self, event: str, job_id: str, **info: Any) -> None:
        append_jsonl(self.path, {"event": event, "job_id": job_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_jsonl(self.path, live=True) if job_id is None or e.get("job_id") == job_id]

    def last_job(self) -> dict[str, Any] | None:
        """The `submitted` line of the run's latest job."""
        return next((e for e in reversed(self.events()) if e.get("event") == "submitted"), None)


def distributed_env(env: Any) -> dict[str, str]:
    """torchrun's variables for the task of a submitit `JobEnvironment` (none for a one-task job):
    rank 0 of the job's first node is the rendezvous, on a port derived from the job id."""
    if env.num_tasks <= 1:
        return {}
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)), "MASTER_ADDR": env.hostnames[0],
            "MASTER_PORT": str(20000 + int(digits) % 20000)}


class RunJob:
    """The callable of one run's job (pickled by submitit; runs in every task of the job)."""

    def __init__(self, run: Run, imports: list[str], threads: int | None = None):
        self.run, self.imports, self.threads = run, imports, threads

    def __call__(self) -> dict[str, Any] | None:
        import submitit  # optional dependency (spach[slurm]): only a batch job runs this

        env = submitit.JobEnvironment()
        os.environ.update(distributed_env(env))
        if self.threads:
            torch.set_num_threads(self.threads)
        import_plugins(self.imports)
        main, log = env.global_rank == 0, JobLog(self.run)
        if main:
            log.append("started", env.job_id, host=socket.gethostname(), pid=os.getpid(), tasks=env.num_tasks)
        usr = getattr(signal, "SIG" + env.USR_SIG)
        requeue = signal.getsignal(usr)  # submitit's: on rank 0, calls checkpoint() and requeues the job
        preempted: list[int] = []

        def stop_then_requeue(signum: int, frame: Any) -> None:
            preempted.append(signum)
            stop = signal.getsignal(signal.SIGTERM)
            if isinstance(stop, StopFlag):  # training: the engine saves at the next step, then stops
                stop(signal.SIGTERM, frame)
            elif callable(requeue):  # not training (yet, or any more): requeue now
                requeue(signum, frame)

        signal.signal(usr, stop_then_requeue)
        try:
            if not main:
                train(dataclasses.replace(self.run.config, resume="auto", progress="none"))
                return None
            outcome = execute(self.run)
            log.append("finished", env.job_id, record=outcome)
            return outcome
        except KeyboardInterrupt:
            if preempted and callable(requeue):
                requeue(preempted[0], None)  # rank 0 exits here, requeued; the other ranks go on
            if main:
                log.append("stopped", env.job_id, checkpoint=str(self.run.folder / "checkpoint.pth"))
            raise
        finally:
            signal.signal(usr, requeue)

    def checkpoint(self) -> Any:
        """submitit's hook on preemption or time limit (rank 0): requeue the same run; it resumes from
        the checkpoint the engine has just saved (`resume="auto"`)."""
        import submitit  # optional dependency (spach[slurm]): only a batch job runs this

        JobLog(self.run).append("requeued", submitit.JobEnvironment().job_id)
        return submitit.helpers.DelayedSubmission(self)

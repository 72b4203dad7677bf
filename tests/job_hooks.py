"""A study import for the batch-job tests; it acts only inside a batch job (SUBMITIT_EXECUTOR set), at
a training step, for the first job to get there (a marker file, created once, says who did):
- SPACH_TEST_PREEMPT=<marker>: at epoch 2 step 2, SIGUSR2 to the job's own process, as Slurm sends it
  before a time limit (submitit's preemption signal);
- SPACH_TEST_KILL=<marker>: at epoch 1 step 2, SIGKILL (a job killed from outside, e.g. out of memory);
- SPACH_TEST_HOLD=<file>: every job waits at its first step until <file> exists."""
import os
import signal
import time

from spach.train import progress


def _first(var: str) -> bool:
    mark = os.environ.get(var)
    if not mark:
        return False
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def step(self, i, loss, lr, _step=progress.Progress.step):
    _step(self, i, loss, lr)
    hold = os.environ.get("SPACH_TEST_HOLD")
    while hold and self.epoch == 0 and i == 0 and not os.path.exists(hold):
        time.sleep(0.1)
    if self.epoch == 0 and i == 1 and _first("SPACH_TEST_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    if self.epoch == 1 and i == 1 and _first("SPACH_TEST_PREEMPT"):
        os.kill(os.getpid(), signal.SIGUSR2)


if os.environ.get("SUBMITIT_EXECUTOR"):
    progress.Progress.step = step

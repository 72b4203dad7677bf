"""The local pool's worker processes, owned by the battle: at most `jobs` of them, each handed one item
at a time, so nothing is queued ahead of a worker and a stop starts nothing new.

Stopping (Ctrl-C sends SIGINT to the whole process group; SIGTERM may reach only the battle): the
battle stops handing out items and sends SIGTERM to every busy worker, again each poll until it has
ended, so a signal that fell between two of the worker's handlers is not lost. Inside a run the
engine's own handler takes it: the run saves its checkpoint at the next step and raises
KeyboardInterrupt (repeated SIGTERMs are harmless there; a second SIGINT is the engine's "abort
without saving"). A worker starts with SIGINT/SIGTERM blocked until its own handler is in place, so
a stop during its start-up is never a traceback; it then returns without taking another item.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
from collections import deque
from typing import Any, Callable, Iterator

from spach.signals import handling

STOPS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.5
NOT_STARTED = {"status": "not started"}  # a worker's answer to an item a stop kept from starting
STARTING = "starting"  # a worker's word that it starts the item: until then, a stop may simply end it
IDLE_WAIT_S = 1
SAVE_WAIT_S = 60  # leaving by an error: how long a busy worker may take to save before it is killed


class Stop:
    """A signal handler that records SIGINT/SIGTERM instead of raising: `.at` the time of the first."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.at = 0.0

    def __call__(self, signum: int, frame: Any) -> None:
        self.at = self.at or time.time()
        self.signals.append(signum)

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def aborted(self) -> bool:
        """A second SIGINT: stop without waiting for the runs to save (as the engine's second Ctrl-C)."""
        return self.signals.count(signal.SIGINT) >= 2


@contextlib.contextmanager
def catching_stops() -> Iterator[Stop]:
    """SIGINT/SIGTERM recorded in the returned `Stop` while inside (handlers restored on exit)."""
    stop = Stop()
    with handling(stop, STOPS):
        yield stop


def _serve(conn: mp.connection.Connection, init: Callable[[], None], task: Callable[[Any], Any]) -> None:
    """A worker: items from `conn` until None, the pipe's end, or a stop signal; each answered with task(item)."""
    stop = Stop()
    for s in STOPS:
        signal.signal(s, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # blocked by the parent around our start
    init()
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        if stop:  # stopped before the item started (during our start-up, or while it was on its way)
            conn.send(NOT_STARTED)
            return
        conn.send(STARTING)
        conn.send(task(item))
        if stop:
            return


class Workers:
    """Up to `jobs` spawned worker processes running `task` on items; `init` runs once in each."""

    def __init__(self, jobs: int, init: Callable[[], None], task: Callable[[Any], Any]):
        self.jobs, self.init, self.task = jobs, init, task
        self.ctx = mp.get_context("spawn")

    def _spawn(self) -> tuple[Any, mp.connection.Connection]:
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(theirs, self.init, self.task))
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)  # the child inherits the mask (see _serve)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        theirs.close()
        return proc, mine

    def run(self, items: list[Any], stop: Stop, started: Callable[[Any], None], done: Callable[[Any, Any], None],
            tick: Callable[[], None], admit: Callable[[Any], bool] | None = None) -> list[Any]:
        """Run `items` in order, at most `jobs` at a time, until all are done or `stop` is set: `started(item)`
        when one is handed out, `done(item, result)` with the task's result (`NOT_STARTED` when a stop came
        first, `lost(exit code)` when its worker died without an answer), `tick()` every poll; an item that
        `admit(item)` refuses when its turn comes is skipped (a budget it would not finish within). Returns the
        items that never started."""
        queue, idle, busy, refused = deque(items), [], {}, []
        try:
            while (queue or busy) and not stop:
                while queue and len(busy) < self.jobs:
                    item = queue.popleft()
                    if admit is not None and not admit(item):
                        refused.append(item)
                        continue
                    proc, conn = idle.pop() if idle else self._spawn()
                    if not proc.is_alive():  # a worker stopped on its own (a signal to it alone)
                        proc, conn = self._spawn()
                    conn.send(item)
                    busy[proc] = [conn, item, False]
                    started(item)
                self._collect(busy, idle, done, timeout=POLL_S)
                tick()
            while busy:  # stopping: the busy workers save and end; nothing new is handed out
                self._collect(busy, idle, done, timeout=0)
                for proc, (conn, item, starting) in list(busy.items()):
                    if not starting or stop.aborted:  # still starting up (importing torch can take seconds)
                        proc.kill()
                        proc.join()
                        del busy[proc]
                        done(item, NOT_STARTED if not starting else lost(proc.exitcode))
                    else:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, signal.SIGTERM)
                self._collect(busy, idle, done, timeout=POLL_S)
                tick()
        finally:
            for proc, conn in idle:
                with contextlib.suppress(OSError):
                    conn.send(None)
            for proc in busy:  # only when leaving by an exception: they save and end, as on a stop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            # an idle worker has answered and holds nothing: it may take seconds to tear torch down
            now = time.time()
            for proc, until in [(p, now + IDLE_WAIT_S) for p, _ in idle] + [(p, now + SAVE_WAIT_S) for p in busy]:
                proc.join(max(0.0, until - time.time()))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return refused + list(queue)

    @staticmethod
    def _collect(busy: dict, idle: list, done: Callable[[Any, Any], None], timeout: float) -> None:
        """Hand each result that arrived (or each worker that died) to `done`; free workers go to `idle`."""
        if timeout:
            mp.connection.wait([c for c, _, _ in busy.values()] + [p.sentinel for p in busy], timeout=timeout)
        for proc, entry in list(busy.items()):
            conn, item, _ = entry
            result, ended = None, False
            try:
                while not ended and conn.poll():
                    result = conn.recv()
                    ended = result != STARTING
                    entry[2] = True
            except (EOFError, OSError):
                pass
            if not ended and not proc.is_alive():
                proc.join()
                result, ended = lost(proc.exitcode), True
            if ended:
                del busy[proc]
                done(item, result)
                if proc.is_alive():
                    idle.append((proc, conn))


def lost(exitcode: int | None) -> dict[str, Any]:
    """The result of an item whose worker died before answering."""
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return {"status": "lost", "error": f"its worker process died ({how})"}

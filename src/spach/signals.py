"""Signal handlers set for a block of code and put back after it: `handling(handler)`, and
`interrupting()`, under which SIGINT and SIGTERM both raise KeyboardInterrupt. The training loop's
own stop flag (`spach.train.runtime.stop_on_signals`) and the battle pool's (`spach.battle.pool`)
are built on `handling`."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


@contextlib.contextmanager
def handling(handler: Any, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """`handler` for `signals` while inside, the earlier handlers restored on exit (outside the main
    thread, where handlers cannot be set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupting() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while inside, whatever the process inherited: one
    started in the background (`cmd &`, nohup, a script's job) begins with SIGINT ignored, and SIGTERM's
    default ends a process without running its `finally` blocks. Long-running work (every CLI command,
    a battle and its monitor, a download, an export) runs inside it; the loops that save before they
    stop (the engine, the battle's pool) install their own handlers within."""
    with handling(_interrupt):
        yield

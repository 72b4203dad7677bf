"""What a run prints while it trains: a tqdm bar on a terminal, plain lines otherwise (rank 0 only; the
rule is `spach.terminal.use_bar`): a line as each epoch and each evaluation starts, and every
`log_interval` steps."""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from tqdm import tqdm

from spach.terminal import resolve_mode, track

T = TypeVar("T")


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (rank 0 only)."""

    def __init__(self, mode: str, enabled: bool, interval: int):
        self.mode = resolve_mode(mode) if enabled else "none"
        self.interval = max(1, interval)
        self.bar: Any = None

    def start(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.t0, self.done0 = epoch, epochs, total, time.time(), done
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        elif self.mode == "lines":
            print(f"epoch {epoch + 1}/{epochs}: training, {total - done} steps" + (f" (from step {done + 1})" if done else ""),
                  flush=True)

    def step(self, i: int, loss: float, lr: float) -> None:
        if self.mode == "bar":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.mode == "lines" and (i + 1) % self.interval == 0:
            rate = (i + 1 - self.done0) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - i - 1) / max(rate, 1e-9)
            print(f"epoch {self.epoch + 1}/{self.epochs} step {i + 1}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def evaluating(self, loader: Iterable[T], what: str) -> Iterator[T]:
        """`loader` of an evaluation at the end of the epoch (`what`: 'testing on 10000 images'), with its bar or its line."""
        return track(loader, f"epoch {self.epoch + 1}/{self.epochs}: {what}", mode=self.mode, stream=sys.stdout)

    def line(self, text: str) -> None:
        if self.mode != "none":
            print(text, flush=True)

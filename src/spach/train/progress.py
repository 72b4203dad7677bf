"""What a run prints while it trains: a tqdm bar on a terminal, plain periodic lines otherwise (rank 0 only)."""
from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise (rank 0 only)."""

    def __init__(self, mode: str, enabled: bool, interval: int):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.interval = max(1, interval)
        self.bar: Any = None

    def start(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.t0, self.done0 = epoch, epochs, total, time.time(), done
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)

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

    def line(self, text: str) -> None:
        if self.mode != "none":
            print(text, flush=True)

"""Equivalent implementations of one operation, picked by measured speed once per key.

    ATTENTION = Choice("attention", names, default="sdpa", env_var="SPACH_ATTENTION")
    name = ATTENTION.fixed() or ATTENTION.pick(key, lambda: fastest({name: run, ...}, device))

`fixed` answers first (and before the caller touches its tensors, which are proxies under FX): the
process-wide override (`set`, or the `use(name)` context), the environment variable, the fixed default
while tracing (compile/FX/JIT, a `TorchDispatchMode` such as the FLOP counter or fake tensors,
CUDA-graph capture: nothing can be timed there). Otherwise `pick` returns the cached choice for the key,
or measures the candidates once and caches the fastest for the process. A choice may keep
its default unless another candidate is faster by more than `keep_default_within` (a fraction): where
the candidates are close, timing noise would otherwise flip the choice, and with it the rounding, from
one process to the next.

A training checkpoint carries every choice made so far (`export_choices`) and a resumed run restores them
(`restore_choices`), so a run continues with the kernels it started with.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from spach.device import time_once
from spach.errors import SpachError

AUTO = "auto"
_CHOICES: dict[str, Choice] = {}


def tracing() -> bool:
    """Whether timing is impossible or meaningless now: compiling, tracing, under a dispatch mode
    (FLOP counter, fake tensors) or capturing a CUDA graph."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return True
    if is_in_torch_dispatch_mode():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def fastest(runs: dict[str, Callable[[], object]], device: torch.device, rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each of `runs` that can run here: one untimed call each (a RuntimeError drops
    the candidate), then `rounds` rounds alternating them; the best time each."""
    best: dict[str, float] = {}
    for name, run in runs.items():
        try:
            with warnings.catch_warnings():  # a backend that cannot run says why before it raises
                warnings.simplefilter("ignore")
                run()
        except RuntimeError:  # this candidate cannot run these shapes/dtype here
            continue
        best[name] = float("inf")
    for _ in range(rounds):
        for name in best:
            best[name] = min(best[name], time_once(runs[name], device))
    return best


class Choice:
    """The measured choice among the implementations `names` of one operation (see the module doc)."""

    def __init__(self, what: str, names: Iterable[str], default: str, env_var: str, keep_default_within: float = 0.0):
        self.what, self.names, self.default, self.env_var = what, tuple(names), default, env_var
        self.keep_default_within = keep_default_within
        self.cache: dict[tuple, str] = {}
        self.override: str | None = None
        _CHOICES[what] = self

    def check(self, name: str | None) -> str | None:
        if name is not None and name != AUTO and name not in self.names:
            raise SpachError(f"unknown {self.what} implementation {name!r}; use {AUTO} or one of {', '.join(self.names)}")
        return name

    def set(self, name: str | None) -> None:
        """Use `name` for every call of this process (`auto`: measure; None: back to the environment
        variable, else `auto`)."""
        self.override = self.check(name)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        before, self.override = self.override, self.check(name)
        try:
            yield
        finally:
            self.override = before

    def fixed(self) -> str | None:
        """The name the override, the environment or tracing imposes now; None when it is to be measured."""
        name = self.override or os.environ.get(self.env_var) or AUTO
        if name != AUTO:
            if name not in self.names:
                raise SpachError(f"{self.env_var}={name!r} names no {self.what} implementation; use {AUTO} or one of "
                                 f"{', '.join(self.names)}")
            return name
        return self.default if tracing() else None

    def pick(self, key: tuple, measure: Callable[[], dict[str, float]]) -> str:
        """The implementation for a call with this key when nothing is `fixed`: cached, or measured now
        and cached."""
        if key not in self.cache:
            self.cache[key] = self.best(measure())
        return self.cache[key]

    def best(self, times: dict[str, float]) -> str:
        if not times:
            return self.default
        name = min(times, key=times.get)
        if self.default in times and times[self.default] <= times[name] * (1 + self.keep_default_within):
            return self.default
        return name


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, torch.dtype) else value


def _typed(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
        return getattr(torch, value[6:])
    return value


def export_choices() -> dict[str, list[list]]:
    """Every cached choice of every operation as plain data: {what: [[*key, name], ...]}."""
    return {what: [[*map(_plain, key), name] for key, name in c.cache.items()] for what, c in _CHOICES.items() if c.cache}


def restore_choices(saved: dict[str, list[list]] | None) -> None:
    """Put back choices `export_choices` wrote (those of operations or implementations unknown here are
    ignored: they are measured again)."""
    for what, entries in (saved or {}).items():
        choice = _CHOICES.get(what)
        for *key, name in entries if choice is not None else ():
            if name in choice.names:
                choice.cache[tuple(map(_typed, key))] = name

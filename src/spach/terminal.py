"""Progress that suits where it goes, by one rule for every command (`use_bar`): a live bar where a person
watches (stderr is a terminal), plain lines where the text is kept (a file, a pipe, a batch job's log),
as a bar's carriage returns would fill a file with thousands of half-lines, and no line at all would
leave a long phase (an epoch, an evaluation, a model's benchmark) silent."""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

from spach.humanize import hms

T = TypeVar("T")
MODES = ("auto", "bar", "lines", "none")


def use_bar() -> bool:
    """The rule: a bar when stderr (where bars are drawn) is a terminal."""
    return sys.stderr.isatty()


def resolve_mode(mode: str) -> str:
    """"auto" as the rule says ("bar" or "lines"); the other modes as they are."""
    return ("bar" if use_bar() else "lines") if mode == "auto" else mode


def track(items: Iterable[T], desc: str, total: int | None = None, mode: str = "auto", stream: TextIO | None = None,
          name: Callable[[T], str] | None = None) -> Iterator[T]:
    """`items` with progress: a bar on a terminal; otherwise (`lines`) one line to `stream` (default stderr)
    as the phase starts, or with `name`, one line per item as it starts ('desc 2/5: <name>') and one
    when all are done; `none`: silent."""
    mode = resolve_mode(mode)
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    if mode == "bar":
        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
        return
    say: Callable[[str], None] = lambda text: print(text, file=stream or sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    if mode == "lines" and name is None:
        say(desc)
    for i, item in enumerate(items):
        if mode == "lines" and name is not None:
            say(f"{desc} {i + 1}/{total if total is not None else '?'}: {name(item)}")
        yield item
    if mode == "lines" and name is not None:
        say(f"{desc}: done in {hms(time.time() - started)}")

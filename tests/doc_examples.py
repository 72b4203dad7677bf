"""The examples of README.md and the docs pages, as the tests run them (tests/test_docs.py).

Every fenced ``python`` block runs, in page order, in one namespace per page; every ``spach ...`` line
of a ``bash`` block (and every ``$ spach ...`` line of a ``console`` block) runs through `spach.cli.main`
as if in a fresh process. Each page runs in a folder of its own. An HTML comment right above a block
says how to treat it (on a code host and in the built site the comment does not show):

- ``<!-- skip: REASON -->``: not run (it needs a GPU, a cluster, a download, ImageNet or hours); the
  test is skipped with that reason;
- ``<!-- file: NAME -->``: the block is a file the next examples use, written into the page's folder
  (a Python file is not run; a TOML file holding a ``[study]`` table is loaded as a study, so it must be valid);
- ``<!-- shorten: "OLD" => "NEW" ... -->``: replace OLD by NEW before running, where the text says a
  command is slow (each OLD must be in the block).

A shell line that is not a ``spach`` command (make, torchrun, pip, ...) must sit in a skipped block.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spach import plugins
from spach.battle import study as study_module
from spach.cli import main
from spach.models import mixers

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = SHELL | {"python"}
KEYS = ("skip", "file", "shorten")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARK = re.compile(r"^\s*<!--\s*(\w[\w-]*):\s*(.*?)\s*-->\s*$")
_OWN = {n for n, c in mixers._MIXERS.items() if c.__module__.split(".")[0] == "spach"}  # not a test module's
BUILTIN_MIXERS = {"mixers": {n: mixers._MIXERS[n] for n in _OWN},
                  "params": {n: p for n, p in mixers._PARAMS.items() if n in _OWN}}  # the registry: names, numbered names


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    @property
    def skip(self) -> str | None:
        return self.marks.get("skip")

    def source(self) -> str:
        """The text as the tests run it (shortened where the page says so)."""
        text = self.text
        if "shorten" in self.marks:
            words = shlex.split(self.marks["shorten"])
            if len(words) % 3 or any(w != "=>" for w in words[1::3]):
                raise ValueError(f"{self.name}: shorten takes \"OLD\" => \"NEW\" pairs, got {self.marks['shorten']!r}")
            for old, new in zip(words[::3], words[2::3]):
                if old not in text:
                    raise ValueError(f"{self.name}: shorten: {old!r} is not in the block")
                text = text.replace(old, new)
        return text

    def commands(self) -> list[list[str]]:
        """The spach command lines of a shell block, as argument lists (without `spach`)."""
        lines, current = [], ""
        for raw in self.source().splitlines():
            if self.lang == "console":
                if raw.startswith("$ "):
                    current = raw[2:]
                elif not current:
                    continue  # output
                else:
                    current += "\n" + raw
            else:
                current += ("\n" if current else "") + raw
            if current.endswith("\\"):
                current = current[:-1]
                continue
            words = shlex.split(current, comments=True)
            current = ""
            if not words:
                continue
            if words[0] != "spach":
                raise ValueError(f"{self.name}: {' '.join(words[:3])!r} is not a spach command; mark the block "
                                 "<!-- skip: why it is not run -->, or move the line to a skipped block")
            lines.append(words[1:])
        return lines

    @property
    def counts(self) -> int:
        """How many examples the block holds: 1 for Python, one per spach command."""
        if self.lang == "python":
            return 0 if "file" in self.marks else 1
        return len(self.commands()) if self.lang in SHELL and not self.skip else 0


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file that the tests run, write or skip."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body, i = i, [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        marks, j = {}, start - 1
        while j >= 0 and (mark := MARK.match(lines[j])):
            key, value = mark.groups()
            if key not in KEYS:
                raise ValueError(f"{_rel(path)}:{j + 1}: unknown example mark {key!r} (known: {', '.join(KEYS)})")
            marks[key] = value
            j -= 1
        if lang in RUNNABLE or "file" in marks:
            found.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marks))
    return found


def pages() -> list[Path]:
    """README.md and every page of the site (not docs/pending, not the build, not the battle reports,
    which are what a battle wrote)."""
    skip = {"_build", "pending", "battles"}
    return [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if not skip & set(p.relative_to(DOCS).parts))


def _registry(state: dict) -> dict:
    return {k: dict(v) for k, v in state.items()}


@contextlib.contextmanager
def _mixers(state: dict) -> None:
    """Run with the mixer registry `state` (its mixers and the numbered names' parameters, updated with
    what the code registers), then put it back."""
    live = {"mixers": mixers._MIXERS, "params": mixers._PARAMS}
    saved = _registry(live)
    for key, table in live.items():
        table.clear()
        table.update(state[key])
    try:
        yield
    finally:
        for key, table in live.items():
            state[key] = dict(table)
            table.clear()
            table.update(saved[key])


class Page:
    """One page's folder, its Python namespace and its own modules (a plugin file it wrote)."""

    def __init__(self, path: Path, folder: Path):
        self.path, self.folder = path, folder
        self.blocks = blocks(path)
        self.namespace: dict = {"__name__": "__docs_example__"}
        self.mixers = _registry(BUILTIN_MIXERS)
        self.modules: dict = {}
        self.done = 0
        self.failed: str | None = None

    def run_until(self, index: int) -> None:
        """Run the blocks before `index` that have not run, then block `index`."""
        while self.done <= index:
            block, self.done = self.blocks[self.done], self.done + 1
            if self.failed:
                raise AssertionError(f"an earlier example of this page failed ({self.failed})")
            if block.skip:
                continue
            try:
                self._run(block)
            except BaseException:
                self.failed = block.name
                raise

    def _own_modules(self) -> dict:
        return {k: m for k, m in list(sys.modules.items())
                if str(getattr(m, "__file__", "") or "").startswith(str(self.folder) + os.sep)}

    def _run(self, block: Block) -> None:
        if "file" in block.marks:
            target = self.folder / block.marks["file"]
            target.write_text(block.source())
            if target.suffix == ".toml" and re.search(r"^\[study\]", block.text, re.M):
                with fresh_process(self):  # it may import a plugin, as `spach battle FILE` would
                    study_module.load_study(target)
            return
        if block.lang == "python":
            sys.modules.update(self.modules)
            sys.path.insert(0, str(self.folder))
            try:
                with _mixers(self.mixers):
                    exec(compile(block.source(), block.name, "exec"), self.namespace)
            finally:
                sys.path.remove(str(self.folder))
                self.modules = self._own_modules()
                for name in self.modules:
                    del sys.modules[name]
            return
        for argv in block.commands():
            run_command(argv, self)


@contextlib.contextmanager
def fresh_process(page: Page) -> None:
    """Run as a fresh `spach` process would: built-in mixers only, no plugin imported yet; the
    process-wide state the code changes (threads, signal handlers, imported plugins) is put back after."""
    imported, threads = set(plugins._IMPORTED), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    plugins._IMPORTED.clear()
    try:
        with _mixers(_registry(BUILTIN_MIXERS)):
            yield
    finally:
        for name in page._own_modules():
            del sys.modules[name]
        plugins._IMPORTED.clear()
        plugins._IMPORTED.update(imported)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)


def run_command(argv: list[str], page: Page) -> None:
    """`spach ARGV`, as a fresh process would run it."""
    with fresh_process(page):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise AssertionError(f"spach {shlex.join(argv)} exited with status {e.code}") from None

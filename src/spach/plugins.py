"""Plugins: modules or .py files a user names to register custom mixers (`spach.register_mixer`) or
models before a model is built. A battle study names them (`study.imports`), `spach train --imports`
too; a run records them (absolute paths) in its config, so `spach eval`, `spach export` and a resumed
run import them again: the same code the user chose to run when the run was trained."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from spach.errors import SpachError
from spach.text import one_line

_IMPORTED: set[str] = set()  # a plugin file registers its mixers once per process


def import_plugins(imports: list[str], where: str = "study.imports") -> None:
    """Import the modules or .py files in `imports` (each once per process); `where` names the setting
    they came from in the one-line error of one that cannot be imported."""
    taken = [f"{Path(item).stem} ({taken_by})" for item in imports if item not in _IMPORTED and item.endswith(".py")
             for taken_by in [_module_taken(item)] if taken_by]
    if taken:
        raise SpachError(f"{where}: a plugin file is imported under its file name, and these names "
                         f"are taken by installed modules: {', '.join(taken)}; rename the file(s)")
    for item in imports:
        if item in _IMPORTED:
            continue
        module = None
        try:
            if item.endswith(".py"):
                spec = importlib.util.spec_from_file_location(Path(item).stem, item)
                if spec is None or not Path(item).is_file():
                    raise FileNotFoundError(item)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except BaseException as e:  # a plugin's sys.exit() too: it may not end the command, nor print raw text
            if module is not None and sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]  # as Python's own import: no half-imported module left behind
            if isinstance(e, (SpachError, KeyboardInterrupt)):
                raise
            raise SpachError(f"{where}: cannot import {item!r} ({type(e).__name__}: {one_line(e) or 'no message'})") from None
        _IMPORTED.add(item)


def _module_taken(item: str) -> str:
    """Where the module named like plugin file `item` comes from, when that is not `item` itself ('' if free)."""
    name = Path(item).stem
    try:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module else getattr(importlib.util.find_spec(name), "origin", None)
    except (ImportError, ValueError):
        return ""
    if origin is None and (module is not None or importlib.util.find_spec(name) is not None):
        return "a built-in module"
    if origin is None or Path(origin).resolve() == Path(item).resolve():
        return ""
    return origin

"""The shape of the package (docs/internals.md): imports point one way, battle -> train -> bench ->
models (all may use the shared modules), no cycles, no module over ~400 lines, and imports inside
functions only for optional dependencies, or to keep a command's start-up short (DEFERRED)."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "spach"
LAYERS = {"models": 0, "bench": 1, "train": 2, "battle": 3}  # a package may import its own layer or lower ones
SHARED = {"errors", "files", "device", "humanize", "text", "terminal"}  # importable from anywhere; they import only each other
OPTIONAL = {"torch.utils.tensorboard", "wandb", "onnx", "onnxruntime", "onnxscript", "submitit", "playwright",
            "playwright.sync_api", "safetensors", "safetensors.torch", "torch.utils.tensorboard.writer"}
# imports deferred to where they are used, so that `spach --help`, `spach models` and `import spach` do not pay
# for them: the command line imports a command's modules when that command is named; matplotlib (0.5 s and
# more) loads for `spach bench --plots` only
DEFERRED = {"spach.cli": "*", "spach.bench.command": {"spach.bench.plots"}}
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    return {".".join(("spach", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(path: pathlib.Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(spach modules imported at the top level, (line, module) of imports inside functions)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if not names:
            continue
        if node.col_offset == 0:
            top |= {n for n in names if n.startswith("spach")}
        else:
            inner += [(node.lineno, n) for n in names[:1]]
    return top, inner


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_point_one_way():
    mods = _modules()
    for name, path in mods.items():
        own = _package(name)
        for dep in _imports(path)[0]:
            dep_mod = next((m for m in (dep, dep.rsplit(".", 1)[0]) if m in mods), None)
            if dep_mod is None or dep_mod == "spach":
                continue
            target = _package(dep_mod)
            if own in SHARED:
                assert target in SHARED, f"{name} (shared) imports {dep_mod}"
            elif own in LAYERS and target in LAYERS:
                assert LAYERS[target] <= LAYERS[own], f"{name} imports {dep_mod}: against the layering"


def test_no_import_cycles():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for dep in _imports(path)[0]:
            d = next((m for m in (dep, dep.rsplit(".", 1)[0]) if m in mods), None)
            if d and d != name and d != "spach" and not name.endswith("__init__") and not mods[d].name == "__init__.py":
                deps.add(d)
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [n, d]) if d in stack else f"{n} -> {d}")
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_modules_are_small_and_imports_are_visible():
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it"
        deferred = DEFERRED.get(name, set())
        hidden = [(line, mod) for line, mod in _imports(path)[1]
                  if mod not in OPTIONAL and mod != "spach" and deferred != "*" and mod not in deferred]
        assert not hidden, f"{name} imports inside functions: {hidden} (only optional dependencies may be)"

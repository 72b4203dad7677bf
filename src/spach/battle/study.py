"""A battle study: a TOML file of contestants, data, recipe, seeds and questions, validated up front.

    [study]
    name = "my-study"
    seeds = [0, 1]
    questions = ["multi-stage", "hybrid"]   # optional: the findings to judge (default: all five)
    imports = ["my_mixers.py"]              # optional: modules or files that register custom mixers

    [data]                                  # spach.engine.TrainConfig data fields
    dataset = "fashion-mnist"

    [recipe]                                # TrainConfig recipe fields, shared by every contestant
    epochs = 4
    lr = 2e-3

    [[contestant]]
    name = "conv-ms"                        # also its folder name
    model = "spach"                         # "spach" + arch, a zoo name, or any timm model name
    arch = { net_arch = [[["conv", 2]], [["conv", 4]]], hidden_dim = 32 }
    recipe = { lr = 1e-3 }                  # optional: only the knobs in CONTESTANT_KNOBS

Presets ship as package data (`spach/studies/<name>.toml`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import tomllib

from spach.battle.questions import QUESTION_KEYS
from spach.device import parse_device
from spach.errors import SpachError
from spach.files import read_text
from spach.models.backbone import SpachConfig, normalize_arch
from spach.models.zoo import list_models
from spach.train.config import ConfigError, TrainConfig
from spach.train.datasets import DATASETS, canonical_dataset

# TrainConfig fields a study may not set: the battle owns them.
MANAGED = {"model", "model_kwargs", "output", "resume", "seed", "progress", "preset"}
# Recipe knobs one contestant may change on its own (everything else is shared, for a fair fight).
CONTESTANT_KNOBS = {"lr", "weight_decay", "drop_path", "drop", "batch_size", "warmup_epochs", "clip_grad", "opt",
                    "pretrained"}
DATA_FIELDS = {"dataset", "data_path", "img_size", "mean", "std", "train_subset", "val_subset", "eval_train_subset",
               "workers", "skip_bad_images"}
# Model arguments the engine derives from the data and the recipe, so an arch may not set them.
ENGINE_SET = {"num_classes": "it comes from the dataset", "in_chans": "it comes from the dataset",
              "img_size": "set [data].img_size instead", "drop_path_rate": "set recipe.drop_path instead",
              "drop_rate": "set recipe.drop instead"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TABLES = {"study", "data", "recipe", "contestant"}
_STUDY_KEYS = {"name", "description", "seeds", "questions", "imports", "jobs", "notes", "base"}
_CONTESTANT_KEYS = {"name", "model", "arch", "recipe", "label"}


@dataclass
class Contestant:
    name: str
    model: str = "spach"
    arch: dict[str, Any] = field(default_factory=dict)  # TrainConfig.model_kwargs
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of CONTESTANT_KNOBS
    label: str = ""


@dataclass
class Study:
    name: str
    seeds: list[int]
    contestants: list[Contestant]
    data: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)  # empty: all findings
    imports: list[str] = field(default_factory=list)
    description: str = ""
    notes: str = ""  # shown in the report (e.g. how far this setting is from the paper's)
    jobs: int = 1
    source: str = ""  # the file (or preset) it came from, for messages

    def config(self, contestant: Contestant | None = None, seed: int | None = None, output: str = "",
               **extra: Any) -> TrainConfig:
        """The training config of one run (default: the first contestant's first seed, which carries
        the settings every run shares)."""
        contestant = contestant or self.contestants[0]
        return TrainConfig(**{**self.data, **self.recipe, **contestant.recipe}, model=contestant.model,
                           model_kwargs=contestant.arch, seed=self.seeds[0] if seed is None else seed, output=output,
                           **extra)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Study":
        d = dict(d)
        d["contestants"] = [Contestant(**c) for c in d["contestants"]]
        return cls(**d)


def _presets_dir() -> Any:
    return resources.files("spach") / "studies"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    path = _presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise SpachError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    return path.read_text()


def load_study(path: str | Path | None = None, preset: str | None = None) -> Study:
    """A study from a TOML file or a preset (default: the `default` preset), validated."""
    if path is not None and preset is not None:
        raise SpachError("give a study file or --preset, not both")
    if path is not None:
        path = Path(path)
        return parse_study(read_text(path, "study file"), source=str(path), base=path.parent)
    name = preset or "default"
    return parse_study(preset_text(name), source=f"preset {name}")


def parse_study(text: str, source: str = "study", base: Path | None = None) -> Study:
    """Parse and validate a study's TOML text; every mistake raises a SpachError naming the field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpachError(f"{source}: not valid TOML: {e}") from None
    v = _Validator(source)
    raw = _with_base(raw, v)
    v.keys(raw, _TABLES, "the top level")
    st = v.table(raw, "study")
    v.keys(st, _STUDY_KEYS, "study")
    study = Study(
        name=v.name(v.get(st, "study.name", str, default=Path(source).stem if base else source.split()[-1])),
        description=v.get(st, "study.description", str, default=""),
        notes=v.get(st, "study.notes", str, default=""),
        seeds=v.seeds(st.get("seeds", [0])),
        questions=v.questions(st.get("questions", [])),
        imports=[_resolve_import(i, base) for i in v.get(st, "study.imports", list, default=[])],
        jobs=v.get(st, "study.jobs", int, default=1),
        contestants=[],
        source=source,
    )
    if study.jobs < 1:
        v.fail("study.jobs", f"must be >= 1, got {study.jobs}")
    import_plugins(study.imports, source)
    fields = _train_fields()
    study.data = v.train_fields(v.table(raw, "data"), "data", fields, allowed=DATA_FIELDS)
    study.recipe = v.train_fields(v.table(raw, "recipe"), "recipe", fields, allowed=set(fields) - MANAGED - DATA_FIELDS)
    entries = raw.get("contestant", [])
    if not isinstance(entries, list) or not entries:
        v.fail("contestant", "the study has no contestants; add [[contestant]] tables with a name and a model")
    for i, entry in enumerate(entries):
        study.contestants.append(v.contestant(entry, i, fields))
    names = [c.name for c in study.contestants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        v.fail("contestant.name", f"{dup[0]!r} is used by more than one contestant; names must be unique")
    for c in study.contestants:
        v.recipe_values(study, c)
    return study


def check_runnable(study: Study) -> None:
    """What only matters when the study is about to train here: the device it asks for exists."""
    device = study.config().device
    try:
        parse_device(device)
    except SpachError as e:
        raise SpachError(f"{study.source}: recipe.device: {e}") from None


_IMPORTED: set[str] = set()  # a plugin file registers its mixers once per process


def _with_base(raw: dict, v: "_Validator") -> dict:
    """`[study] base = "<preset>"`: start from that preset; tables given here override its keys, and a
    [[contestant]] given here replaces the preset's one of the same name, or is added after them."""
    base = raw.get("study", {}).get("base") if isinstance(raw.get("study"), dict) else None
    if base is None:
        return raw
    if not isinstance(base, str) or base not in list_presets():
        v.fail("study.base", f"unknown preset {base!r}; choose one of {', '.join(list_presets())}")
    parent = _with_base(tomllib.loads(preset_text(base)), v)
    merged = {k: {**parent.get(k, {}), **raw.get(k, {})} for k in set(parent) | set(raw) if k != "contestant"}
    own = {c.get("name"): c for c in raw.get("contestant", []) if isinstance(c, dict)}
    merged["contestant"] = [own.pop(c.get("name"), c) for c in parent.get("contestant", [])] + list(own.values())
    merged["study"].pop("base", None)
    return merged


def import_plugins(imports: list[str], source: str = "study") -> None:
    """Import the modules or .py files that register custom mixers (`spach.register_mixer`)."""
    for item in imports:
        if item in _IMPORTED:
            continue
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
        except SpachError:
            raise
        except Exception as e:
            raise SpachError(f"{source}: study.imports: cannot import {item!r} ({type(e).__name__}: {e})") from None
        _IMPORTED.add(item)


def _resolve_import(item: Any, base: Path | None) -> str:
    if isinstance(item, str) and item.endswith(".py") and base is not None and not Path(item).is_absolute():
        return str((base / item).resolve())
    return item


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


class _Validator:
    """Checks with messages of the form '<source>: <field>: <problem>; <fix>'."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> None:
        raise SpachError(f"{self.source}: {where}: {problem}")

    def keys(self, table: dict, allowed: set[str], where: str, hint: str = "") -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                fix = f"did you mean {close[0]!r}?" if close else hint or f"known: {', '.join(sorted(allowed))}"
                self.fail(f"{where}.{key}" if where != "the top level" else key,
                          f"unknown {'table' if where == 'the top level' else 'key'}; {fix}")

    def table(self, raw: dict, name: str) -> dict:
        t = raw.get(name, {})
        if not isinstance(t, dict):
            self.fail(name, f"must be a table ([{name}]), not a {type(t).__name__}")
        return t

    def get(self, table: dict, where: str, kind: type, default: Any) -> Any:
        value = table.get(where.rsplit(".", 1)[-1], default)
        if not _is(value, kind):
            self.fail(where, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def name(self, name: str) -> str:
        if not _NAME.match(name):
            self.fail("study.name", f"{name!r} is not a folder-safe name (letters, digits, - _ . + and no '/' or "
                      "leading dot): it names the study's folder under battles/")
        return name

    def seeds(self, seeds: Any) -> list[int]:
        if not isinstance(seeds, list) or not seeds or not all(_is(s, int) and s >= 0 for s in seeds):
            self.fail("study.seeds", f"expected a non-empty list of integers >= 0, got {seeds!r}; e.g. seeds = [0, 1]")
        if len(set(seeds)) != len(seeds):
            self.fail("study.seeds", f"seeds repeat in {seeds!r}; each seed is one run per contestant")
        return list(seeds)

    def questions(self, qs: Any) -> list[str]:
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            self.fail("study.questions", f"expected a list of names, got {qs!r}")
        for q in qs:
            if q not in QUESTION_KEYS:
                self.fail("study.questions", f"unknown question {q!r}; choose from {', '.join(QUESTION_KEYS)}")
        return list(qs)

    def train_fields(self, table: dict, where: str, fields: dict[str, dataclasses.Field], allowed: set[str]) -> dict:
        for key, value in table.items():
            if key not in allowed:
                if key in MANAGED:
                    self.fail(f"{where}.{key}", "is set by the battle itself (per contestant and seed); remove it")
                other = "recipe" if where == "data" else "data"
                if key in fields:
                    self.fail(f"{where}.{key}", f"belongs in [{other}], not [{where}]")
                self.keys({key: value}, allowed, where,
                          hint="not a spach.train.TrainConfig field ('spach train --help' lists them)")
            self.value(f"{where}.{key}", value, fields[key])
        return dict(table)

    def recipe_values(self, study: Study, c: Contestant) -> None:
        """Every value of `c`'s training config, checked as `spach train` checks it, named where it was set."""
        try:
            cfg = study.config(c)
            channels = DATASETS[canonical_dataset(cfg.dataset)][1]
            if cfg.mean and len(cfg.mean) != channels:
                raise ConfigError("mean", f"has {len(cfg.mean)} values but {cfg.dataset} images have {channels} "
                                          "channel(s); give one value per channel (and as many for std)")
        except ConfigError as e:
            where = (f"contestant {c.name!r}.recipe" if e.field in c.recipe else "data" if e.field in DATA_FIELDS
                     else "recipe")
            self.fail(f"{where}.{e.field}", e.problem)

    def value(self, where: str, value: Any, f: dataclasses.Field) -> None:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _TYPES.get(str(f.type), type(default))
        if not _is(value, kind):
            self.fail(where, f"expected {_kind_name(kind)} (like the default {default!r}), got {value!r}")

    def contestant(self, entry: Any, i: int, fields: dict[str, dataclasses.Field]) -> Contestant:
        where = f"contestant[{i}]"
        if not isinstance(entry, dict):
            self.fail(where, "must be a [[contestant]] table")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            self.fail(f"{where}.name", f"expected a folder-safe name (letters, digits, - _ . +), got {name!r}")
        where = f"contestant {name!r}"
        self.keys(entry, _CONTESTANT_KEYS, where)
        model = self.get(entry, f"{where}.model", str, default="spach")
        arch = self.get(entry, f"{where}.arch", dict, default={})
        recipe = self.get(entry, f"{where}.recipe", dict, default={})
        for key, value in recipe.items():
            if key not in CONTESTANT_KNOBS:
                self.fail(f"{where}.recipe.{key}", f"a contestant may only override {', '.join(sorted(CONTESTANT_KNOBS))}; "
                          "shared knobs go in [recipe] so the comparison stays fair")
            self.value(f"{where}.recipe.{key}", value, fields[key])
        self.model(where, model, arch)
        return Contestant(name, model, arch, recipe, self.get(entry, f"{where}.label", str, default=""))

    def model(self, where: str, model: str, arch: dict) -> None:
        if model == "spach" and "net_arch" not in arch:
            self.fail(f"{where}.arch.net_arch", "model 'spach' is built from arch alone; give net_arch, "
                      "e.g. [[\"attn\", 6]] (single-stage) or [[[\"conv\", 2]], [[\"attn\", 2]]] (multi-stage)")
        for key, fix in ENGINE_SET.items():
            if key in arch:
                self.fail(f"{where}.arch.{key}", f"is set by the training engine; {fix}")
        if model == "spach" or model in list_models():
            known = set(SpachConfig.__dataclass_fields__) - set(ENGINE_SET)
            for key in arch:
                if key not in known:
                    self.keys({key: None}, known, f"{where}.arch", hint=f"not a SpachConfig field; known: {', '.join(sorted(known))}")
            if "net_arch" in arch:
                self.net_arch(f"{where}.arch.net_arch", arch["net_arch"])
            return
        if model not in timm.list_models():
            close = difflib.get_close_matches(model, list_models() + ["spach"], n=1)
            self.fail(f"{where}.model", f"{model!r} is neither 'spach', a spach zoo name nor a timm model"
                      + (f"; did you mean {close[0]!r}?" if close else "; see 'spach models' or timm.list_models()"))

    def net_arch(self, where: str, arch: Any) -> None:
        try:
            normalize_arch(arch)
        except SpachError as e:
            self.fail(where, str(e))


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
            dict: "a table"}.get(kind, kind.__name__)

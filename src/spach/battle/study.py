"""A battle study: a TOML file of contestants, data, recipe, seeds and questions, validated up front.

    [study]
    name = "my-study"
    seeds = [0, 1, 2]                       # with a budget: every seed a contestant may get, in order
    budget = "2h"                           # optional: a sequential battle ("15m", "2h", "300 gpu-h", "120 runs")
    first_wave = 3                          # with a budget: the seeds every contestant gets before the first look
    spending = "pocock"                     # with a budget: how alpha is spent over the looks (obf, pocock, hsd(G))
    questions = ["multi-stage", "hybrid"]   # optional: the findings judged on the main arm (default: all)
    margin = 0.5                            # equivalence margin in points of top-1, fixed before the runs
    imports = ["my_mixers.py"]              # optional: modules or files that register custom mixers

    [data]                                  # spach.train.TrainConfig data fields
    dataset = "fashion-mnist"

    [recipe]                                # TrainConfig recipe fields, shared by every contestant
    epochs = 4
    lr = 2e-3

    [arm.scarce]                            # optional: another training regime for some contestants
    questions = ["mlp-overfit"]             # the findings judged on it
    data = { train_subset = 3000 }
    recipe = { epochs = 30 }

    [[contestant]]
    name = "conv-ms"                        # also its folder name
    model = "spach"                         # "spach" + arch, a zoo name, or any timm model name
    arch = { net_arch = [[["conv", 2]], [["conv", 4]]], hidden_dim = 32 }
    recipe = { lr = 1e-3 }                  # optional: only the knobs in CONTESTANT_KNOBS
    arm = "scarce"                          # optional: default "main"

    [[contestant]]
    name = "attn-ms"
    arch = { net_arch = [[["conv", 2]], [["attn", 4]]], num_heads = 2 }
    match = { macs = "conv-ms", tolerance = 0.1 }  # optional, instead of hidden_dim: the width whose MACs
                                            # (or params) are another contestant's, or a number (5.2e6)

    [slurm]                                 # optional: each run's batch job (--launcher slurm; flags win)
    gpus_per_node = 8                       # also nodes, cpus_per_task, timeout_min, partition, account,
    partition = "gpu"                       # constraint, and extra = { qos = "high" } (submitit's slurm_*)

Contestants are compared only within their arm (same data, same recipe). Presets ship as package data
(`spach/studies/<name>.toml`); the schema and its checks live in `spach.battle.schema`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from spach.battle.prior import parse_prior
from spach.battle.questions import PAPER_FINDINGS, QUESTION_KEYS
from spach.battle.schema import (
    ARM_KEYS,
    DATA_FIELDS,
    MANAGED,
    STUDY_KEYS,
    TABLES,
    Validator,
    train_fields,
)
from spach.battle.budget import parse_budget
from spach.battle.matching import resolve_matches
from spach.battle.spending import DEFAULT as DEFAULT_SPENDING
from spach.battle.spending import Spending, spending_function
from spach.device import parse_device
from spach.errors import SpachError
from spach.files import read_text
from spach.plugins import import_plugins
from spach.train.config import ConfigError, TrainConfig

MAIN = "main"  # the arm of contestants that name none


@dataclass
class Contestant:
    name: str
    model: str = "spach"
    arch: dict[str, Any] = field(default_factory=dict)  # TrainConfig.model_kwargs
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of CONTESTANT_KNOBS
    label: str = ""
    arm: str = MAIN
    match: dict[str, Any] = field(default_factory=dict)  # a cost target instead of a width, and what it resolved to


@dataclass
class Arm:
    """A training regime of its own (e.g. scarce data, long training) and the findings judged on it."""

    name: str
    description: str = ""
    questions: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    seeds: list[int]
    contestants: list[Contestant]
    data: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)  # judged on the main arm; empty: all not judged elsewhere
    imports: list[str] = field(default_factory=list)
    description: str = ""
    notes: str = ""  # shown in the report (e.g. how far this setting is from the paper's)
    jobs: int = 1
    margin: float = 0.5  # equivalence margin, points of top-1 (and of the generalisation gap)
    alpha: float = 0.05
    arms: dict[str, Arm] = field(default_factory=dict)  # besides the main arm
    tested_elsewhere: dict[str, str] = field(default_factory=dict)  # question -> the preset that tests it
    source: str = ""  # the file (or preset) it came from, for messages
    sha256: str = ""  # of the study file's text, recorded in the report
    slurm: dict[str, Any] = field(default_factory=dict)  # [slurm]: the batch-job resources of every run
    budget: str = ""  # a sequential battle's budget (spach.battle.budget.parse_budget); "": fixed design
    first_wave: int = 0  # seeds per contestant before the first look (sequential battles)
    spending: str = ""  # how a sequential battle's comparisons spend alpha ("" : spach.battle.spending.DEFAULT)
    rank: list[str] = field(default_factory=list)  # the order the budget takes findings in (default: as asked, arm by arm)
    prior: dict[str, Any] = field(default_factory=dict)  # [prior]: effects and noise the dry run predicts from
    # per arm, the images its runs train and are tested on: recorded by the battle from the data (the report's numbers)
    data_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def sequential(self) -> bool:
        return bool(self.budget)

    def spending_of(self, most: int | None = None) -> Spending:
        """How a comparison that can reach `most` seeds (default: the study's seed list) spends alpha over
        the looks (a fixed design: all of it at its one look)."""
        most = most or len(self.seeds)
        if not self.sequential:
            return Spending(self.alpha, most, most)
        return Spending(self.alpha, min(self.first_wave, most), most, self.spending or DEFAULT_SPENDING)

    @property
    def prior_df(self) -> float:
        """The degrees of freedom the arm's pooled noise lends each pair (`spach.battle.spending.Spending.prior_df`)."""
        return self.spending_of().prior_df

    def config(self, contestant: Contestant | None = None, seed: int | None = None, output: str = "",
               **extra: Any) -> TrainConfig:
        """The training config of one run (default: the first contestant's first seed, which carries
        the settings every run of the main arm shares)."""
        c = contestant or self.contestants[0]
        arm = self.arms.get(c.arm, Arm(MAIN))
        return TrainConfig(**{**self.data, **self.recipe, **arm.data, **arm.recipe, **c.recipe}, model=c.model,
                           model_kwargs=c.arch, imports=self.imports, seed=self.seeds[0] if seed is None else seed,
                           output=output, **extra)

    def questions_of(self, arm: str) -> list[str]:
        """The findings judged on `arm` (the main arm: the study's questions, by default every finding
        that no other arm judges and no other preset is named for)."""
        if arm != MAIN:
            return list(self.arms[arm].questions)
        if self.questions:
            return list(self.questions)
        taken = {q for a in self.arms.values() for q in a.questions} | set(self.tested_elsewhere)
        return [q for q in QUESTION_KEYS if q not in taken and QUESTION_KEYS[q] in PAPER_FINDINGS]

    def arm_names(self) -> list[str]:
        return [MAIN, *self.arms]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Study":
        d = dict(d)
        d["contestants"] = [Contestant(**c) for c in d["contestants"]]
        d["arms"] = {k: Arm(**a) for k, a in d.get("arms", {}).items()}
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
    v = Validator(source)
    raw = _with_base(raw, v)
    v.keys(raw, TABLES, "the top level")
    st = v.table(raw, "study")
    v.keys(st, STUDY_KEYS, "study")
    study = Study(
        name=v.name(v.get(st, "study.name", str, default=Path(source).stem if base else source.split()[-1])),
        description=v.text(v.get(st, "study.description", str, default=""), "study.description", lines=True),
        notes=v.text(v.get(st, "study.notes", str, default=""), "study.notes", lines=True),
        seeds=v.seeds(st.get("seeds", [0])),
        questions=v.questions(st.get("questions", []), "study.questions"),
        imports=[_resolve_import(i, base) for i in v.get(st, "study.imports", list, default=[])],
        jobs=v.get(st, "study.jobs", int, default=1),
        margin=v.get(st, "study.margin", float, default=0.5),
        alpha=v.get(st, "study.alpha", float, default=0.05),
        tested_elsewhere=v.get(st, "study.tested_elsewhere", dict, default={}),
        budget=v.get(st, "study.budget", str, default=""),
        first_wave=v.get(st, "study.first_wave", int, default=0),
        spending=v.get(st, "study.spending", str, default=""),
        rank=v.questions(st.get("rank", []), "study.rank"),
        contestants=[],
        source=source,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    if study.jobs < 1:
        v.fail("study.jobs", f"must be >= 1, got {study.jobs}")
    if st.get("first_wave") == 0:
        v.fail("study.first_wave", f"must lie in 2..{len(study.seeds)} (the seeds listed), got 0")
    if study.margin < 0:
        v.fail("study.margin", f"must be >= 0 (points of top-1; 0: no equivalence test), got {study.margin}")
    if not 0 < study.alpha < 0.5:
        v.fail("study.alpha", f"must lie in (0, 0.5), got {study.alpha}")
    check_looks(study, v.fail)
    v.questions(list(study.tested_elsewhere), "study.tested_elsewhere")
    import_plugins(study.imports, f"{source}: study.imports")
    fields = train_fields()
    recipe_fields = set(fields) - MANAGED - DATA_FIELDS
    study.data = v.train_fields(v.table(raw, "data"), "data", fields, allowed=DATA_FIELDS)
    study.recipe = v.train_fields(v.table(raw, "recipe"), "recipe", fields, allowed=recipe_fields)
    study.slurm = v.slurm(v.table(raw, "slurm"))
    for name, table in v.table(raw, "arm").items():
        where = f"arm.{name}"
        v.name(name, where)
        if not isinstance(table, dict):
            v.fail(where, "must be a table ([arm.NAME]) of description, questions, data and recipe")
        v.keys(table, ARM_KEYS, where)
        study.arms[name] = Arm(name, v.text(v.get(table, f"{where}.description", str, default=""), f"{where}.description",
                                            lines=True),
                               v.questions(table.get("questions", []), f"{where}.questions"),
                               v.train_fields(v.get(table, f"{where}.data", dict, default={}), f"{where}.data", fields,
                                              allowed=DATA_FIELDS),
                               v.train_fields(v.get(table, f"{where}.recipe", dict, default={}), f"{where}.recipe",
                                              fields, allowed=recipe_fields))
    judged = [q for arm in study.arm_names() for q in study.questions_of(arm)]
    twice = sorted({q for q in judged if judged.count(q) > 1})
    if twice:
        v.fail("study.questions", f"{twice[0]!r} is judged on more than one arm; list each question on one arm only")
    unasked = [q for q in study.rank if q not in judged]
    if unasked:
        v.fail("study.rank", f"{unasked[0]!r} is not asked by this study (its arms ask {', '.join(judged) or 'nothing'})")
    entries = raw.get("contestant", [])
    if not isinstance(entries, list) or not entries:
        v.fail("contestant", "the study has no contestants; add [[contestant]] tables with a name and a model")
    for i, entry in enumerate(entries):
        study.contestants.append(Contestant(**v.contestant(entry, i, fields, set(study.arm_names()))))
    names = [c.name for c in study.contestants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        v.fail("contestant.name", f"{dup[0]!r} is used by more than one contestant; names must be unique")
    for c in study.contestants:
        try:
            v.channels(study.config(c))
        except ConfigError as e:
            v.config_error(e, c.name, c.recipe, c.arm)
    if study.budget and parse_budget(study.budget).kind == "gpu-h" and study.config().device == "cpu":
        v.fail("study.budget", f"{study.budget!r} counts GPU hours, but recipe.device is \"cpu\"; give wall time "
               "(e.g. \"15m\") or runs (e.g. \"40 runs\")")
    study.prior = parse_prior(raw.get("prior"), set(names), v.fail)
    resolve_matches(study, v.fail)
    return study


def check_looks(study: Study, fail: Any) -> None:
    """A sequential study's budget, first wave and spending function (`fail(where, problem)` raises);
    an unset first wave (0) becomes min(3, seeds) with a budget."""
    if study.budget:
        try:
            parse_budget(study.budget)
        except SpachError as e:
            fail("study.budget", str(e).split(": ", 1)[1])
        if not study.first_wave:
            study.first_wave = min(3, len(study.seeds))
    elif study.first_wave:
        fail("study.first_wave", "needs a budget: add study.budget (e.g. \"15m\") for a sequential battle, or drop first_wave")
    if study.first_wave and not 2 <= study.first_wave <= len(study.seeds):
        fail("study.first_wave", f"must lie in 2..{len(study.seeds)} (the seeds listed; two are the fewest a pair's noise "
             f"can be estimated from), got {study.first_wave}")
    if study.spending:
        if not study.budget:
            fail("study.spending", "needs a budget: a fixed design spends all its alpha at its one look; drop spending")
        try:
            spending_function(study.spending)
        except SpachError as e:
            fail("study.spending", str(e))


def check_runnable(study: Study) -> None:
    """What only matters when the study is about to train here: the device it asks for exists, and a
    budget of GPU hours has GPUs to count."""
    device = study.config().device
    try:
        found = parse_device(device)
    except SpachError as e:
        raise SpachError(f"{study.source}: recipe.device: {e}") from None
    if study.budget and parse_budget(study.budget).kind == "gpu-h" and found.type == "cpu":
        raise SpachError(f"{study.source}: study.budget: {study.budget!r} counts GPU hours, but this study's runs train on "
                         "the CPU here; give wall time (e.g. \"15m\") or runs (e.g. \"40 runs\")")


def _with_base(raw: dict, v: Validator) -> dict:
    """`[study] base = "<preset>"`: start from that preset; tables given here override its keys, and a
    [[contestant]] given here replaces the preset's one of the same name, or is added after them."""
    base = raw.get("study", {}).get("base") if isinstance(raw.get("study"), dict) else None
    if base is None:
        return raw
    for name in sorted(set(TABLES) - {"contestant"}):  # merged key by key below: each must be a table
        v.table(raw, name)
    entries = raw.get("contestant", [])
    for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        if not isinstance(entry, dict):
            v.fail("contestant" if not isinstance(entries, list) else f"contestant[{i}]",
                   f"must be a [[contestant]] table with a name, got {entry!r}")
    if not isinstance(base, str) or base not in list_presets():
        v.fail("study.base", f"unknown preset {base!r}; choose one of {', '.join(list_presets())}")
    parent = _with_base(tomllib.loads(preset_text(base)), v)
    merged = {k: {**parent.get(k, {}), **raw.get(k, {})} for k in set(parent) | set(raw) if k != "contestant"}
    own = {c.get("name"): c for c in raw.get("contestant", []) if isinstance(c, dict)}
    merged["contestant"] = [own.pop(c.get("name"), c) for c in parent.get("contestant", [])] + list(own.values())
    merged["study"].pop("base", None)
    return merged


def _resolve_import(item: Any, base: Path | None) -> str:
    if isinstance(item, str) and item.endswith(".py") and base is not None and not Path(item).is_absolute():
        return str((base / item).resolve())
    return item



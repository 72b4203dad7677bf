"""The study file's schema: which keys each table takes, and the checks that name the field of every
mistake (`<file>: <table>.<key>: <problem>; <fix>`)."""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection
from typing import Any, NamedTuple

import timm

from spach.battle.questions import QUESTION_KEYS
from spach.errors import SpachError
from spach.models.backbone import SpachConfig, normalize_arch
from spach.models.zoo import list_models
from spach.text import unsafe_char
from spach.train.config import MODEL_KWARGS_FLAGS, ConfigError, TrainConfig
from spach.train.datasets import DATASETS, canonical_dataset

# TrainConfig fields a study may not set: the battle owns them.
MANAGED = {"model", "model_kwargs", "output", "resume", "seed", "progress", "preset", "imports", "deadline"}
# Recipe knobs one contestant may change on its own (everything else is shared, for a fair fight).
CONTESTANT_KNOBS = {"lr", "weight_decay", "drop_path", "drop", "batch_size", "warmup_epochs", "clip_grad", "opt",
                    "pretrained"}
DATA_FIELDS = {"dataset", "data_path", "img_size", "mean", "std", "train_subset", "val_subset", "eval_train_subset",
               "workers", "skip_bad_images"}
# Model arguments the engine derives from the data and the recipe (train's MODEL_KWARGS_FLAGS), so an arch
# may not set them; the fix named is the study file's table, not the train flag.
_STUDY_FIX = {"img_size": "set [data].img_size instead", "drop_path_rate": "set recipe.drop_path instead",
              "drop_rate": "set recipe.drop instead"}
ENGINE_SET = {key: _STUDY_FIX.get(key, why) for key, why in MODEL_KWARGS_FLAGS.items()}
MAX_SEED = 2**32 - 1  # numpy's generators take no larger seed
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The study file, table by table and key by key, each with what it means: the one definition the checks below
# use and the docs' study-file reference is generated from (docs/_ext/spach_docs.py; defaults: the dataclasses
# in spach.battle.study; [data] and [recipe] keys: TrainConfig's fields and their help).
TABLES = {
    "study": "What the study is: its name, seeds, questions, statistics and budget.",
    "data": "The data of the main arm: `spach.train.TrainConfig`'s data fields.",
    "recipe": "The training recipe every contestant of the main arm shares: `TrainConfig`'s other fields.",
    "arm": "`[arm.NAME]`: another training regime (its own data and recipe overrides) and the findings judged on it.",
    "contestant": "`[[contestant]]`: one model of the battle, one table each.",
    "slurm": "The batch job of every run (`--launcher slurm` or `submitit-local`); the command-line flags win.",
    "prior": "What the study expects before it runs (each contestant's mean and run-to-run noise per metric), the "
             "numbers `spach battle --dry-run` predicts decisions from; `--dry-run --pilot DIR` writes it from a pilot.",
}
STUDY_KEYS = {
    "name": "The study's name and the default folder, `battles/<name>` (default: the file's name).",
    "description": "One paragraph, shown at the top of the report.",
    "seeds": "The seeds (default `[0]`): every contestant trains once per seed; with a budget, every seed a "
             "contestant may get, in order.",
    "questions": "The findings judged on the main arm (default: every finding that no arm and no other preset "
                 "judges).",
    "imports": "Modules, or `.py` files relative to the study file, that register custom mixers.",
    "jobs": "Runs trained at a time (`--jobs` overrides).",
    "notes": "Free text shown in the report, e.g. how far this setting is from the paper's.",
    "base": "A preset to start from: the tables given here override its keys, and a contestant replaces the "
            "preset's one of the same name or is added.",
    "margin": "The equivalence margin in points of top-1 (and of the generalisation gap), fixed before the runs; "
              "0: no equivalence test.",
    "alpha": "The significance level of each finding, Holm-corrected over its comparisons.",
    "tested_elsewhere": "A table of question = preset: findings the report names another preset for instead of "
                        "judging them here.",
    "budget": "Makes the battle sequential: `\"15m\"`, `\"2h\"` (wall time of the whole battle), `\"300 gpu-h\"` or "
              "`\"120 runs\"`; `--budget` overrides it.",
    "first_wave": "With a budget: the seeds every contestant gets before the first look (2 or more; unset: 3, or "
                  "all the seeds when fewer).",
    "rank": "With a budget: the findings in the order the budget takes them, whole, while their first wave fits "
            "(default: the main arm's questions in order, then each arm's); a finding left out is named in the report.",
    "spending": "With a budget: how each comparison spends its alpha over the looks: \"obf\" (O'Brien-Fleming), "
                "\"pocock\" or \"hsd(G)\" (Hwang-Shih-DeCani; default: `spach.battle.spending.DEFAULT`).",
}
ARM_KEYS = {
    "description": "What this regime is, shown in the report.",
    "questions": "The findings judged on this arm's contestants.",
    "data": "Overrides of `[data]` for this arm.",
    "recipe": "Overrides of `[recipe]` for this arm.",
}
CONTESTANT_KEYS = {
    "name": "A unique, folder-safe name (letters, digits, `- _ . +`): also its folder, `runs/<name>/`.",
    "model": "`\"spach\"` (built from `arch` alone), a spach zoo name, or any timm model name (an outside baseline).",
    "arch": "The model's arguments: `spach.SpachConfig`'s fields, `net_arch` included.",
    "recipe": "This contestant's own values of the knobs it may change (the rest is shared, for a fair fight).",
    "label": "A longer name, shown in the report.",
    "arm": "The arm it trains in (an `[arm.NAME]` of this file).",
    "match": "A cost target instead of a width: `{ macs = \"CONTESTANT\" or N, tolerance = 0.1 }` (or `params`); the "
             "battle picks the hidden_dim that meets it when the study is read and records it.",
}


class Resource(NamedTuple):
    """A [slurm] key: its type, its least value, and what it sets."""

    kind: type
    least: int | None
    help: str


# [slurm]: the resources of every run's batch job (--launcher slurm / submitit-local); each but `extra` is also a
# flag of `spach battle`. `extra` passes submitit's other slurm_* parameters through (checked when a launcher uses them).
SLURM_KEYS: dict[str, Resource] = {
    "nodes": Resource(int, 1, "Nodes per run (default 1)."),
    "gpus_per_node": Resource(int, 0, "GPUs per node, one task (process) each (default 0)."),
    "cpus_per_task": Resource(int, 1, "CPUs per task, also the run's torch threads."),
    "timeout_min": Resource(int, 1, "A job's time limit in minutes; at the limit it is requeued and resumes "
                                    "(default 1440)."),
    "partition": Resource(str, None, "The Slurm partition."),
    "account": Resource(str, None, "The Slurm account."),
    "constraint": Resource(str, None, "A Slurm node constraint (e.g. `volta32gb`)."),
    "extra": Resource(dict, None, "Any other submitit `slurm_*` parameter, without the prefix: "
                                  "`{ qos = \"high\", mem_gb = 480 }`."),
}

# submitit slurm_* parameters that a resource above (or the one-task-per-GPU rule) already sets: passing them
# through `extra` / --slurm would skip its checks and make the summary lie, so they are refused for it.
SLURM_TAKEN = {**{k: k for k in SLURM_KEYS if k != "extra"}, "time": "timeout_min", "ntasks_per_node": "gpus_per_node",
               "tasks_per_node": "gpus_per_node", "ntasks": "nodes", "gpus": "gpus_per_node",
               "gpus_per_task": "gpus_per_node", "num_gpus": "gpus_per_node", "cpus_per_gpu": "cpus_per_task"}


def submitit_key(key: str) -> str:
    """A passed-through submitit parameter as submitit names it: `NODES`, `slurm_nodes` and `mem-gb` are
    `nodes`, `nodes` and `mem_gb` (submitit's names are lower case), so each meets the checks of its name."""
    return key.strip().lower().replace("-", "_").removeprefix("slurm_")


def train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


class Validator:
    """Checks with messages of the form '<source>: <field>: <problem>; <fix>' (no source: a command-line flag)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> None:
        raise SpachError(f"{self.source}: {where}: {problem}" if self.source else f"{where}: {problem}")

    def keys(self, table: dict, allowed: Collection[str], where: str, hint: str = "") -> None:
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

    def name(self, name: str, where: str = "study.name") -> str:
        if not NAME.match(name):
            self.fail(where, f"{name!r} is not a folder-safe name (letters, digits, - _ . + and no '/' or "
                      "leading dot): it names a folder")
        return name

    def text(self, value: str, where: str, lines: bool = False) -> str:
        """Free text the report and the terminal show (a label, a description): no control character (line
        breaks and tabs only where `lines`) and no bidi control, which would show other text than it holds."""
        bad = unsafe_char(value, allow="\n\t" if lines else "")
        if bad:
            self.fail(where, f"holds {bad}, a control character that would reorder or hide text in the report and "
                      "on the terminal; remove it")
        return value

    def seeds(self, seeds: Any) -> list[int]:
        if not isinstance(seeds, list) or not seeds or not all(_is(s, int) and 0 <= s <= MAX_SEED for s in seeds):
            self.fail("study.seeds", f"expected a non-empty list of integers from 0 to {MAX_SEED} (the random "
                      f"generators' range), got {seeds!r}; e.g. seeds = [0, 1]")
        if len(set(seeds)) != len(seeds):
            self.fail("study.seeds", f"seeds repeat in {seeds!r}; each seed is one run per contestant")
        return list(seeds)

    def questions(self, qs: Any, where: str) -> list[str]:
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            self.fail(where, f"expected a list of names, got {qs!r}")
        for q in qs:
            if q not in QUESTION_KEYS:
                self.fail(where, f"unknown question {q!r}; choose from {', '.join(QUESTION_KEYS)}")
        return list(qs)

    def train_fields(self, table: dict, where: str, fields: dict[str, dataclasses.Field], allowed: set[str]) -> dict:
        for key, value in table.items():
            if key not in allowed:
                if key == "imports":
                    self.fail(f"{where}.{key}", "plugins are the study's: move it to [study] imports")
                if key in MANAGED:
                    self.fail(f"{where}.{key}", "is set by the battle itself (per contestant and seed); remove it")
                other = "recipe" if where == "data" else "data"
                if key in fields:
                    self.fail(f"{where}.{key}", f"belongs in [{other}], not [{where}]")
                self.keys({key: value}, allowed, where,
                          hint="not a spach.train.TrainConfig field ('spach train --help' lists them)")
            self.value(f"{where}.{key}", value, fields[key])
        return dict(table)

    def slurm(self, table: dict) -> dict[str, Any]:
        """The [slurm] table, checked key by key."""
        self.keys(table, set(SLURM_KEYS), "slurm")
        for key, value in table.items():
            self.resource(f"slurm.{key}", key, value)
        if "extra" not in table:
            return dict(table)
        extra = {submitit_key(key): value for key, value in table["extra"].items()}
        for key in table["extra"]:
            self.passthrough(f"slurm.extra.{key}", submitit_key(key), "slurm.{}")
        return {**table, "extra": extra}

    def passthrough(self, where: str, key: str, fix: str) -> None:
        """A submitit parameter passed through (`extra`, --slurm KEY=VALUE) that a resource of its own sets
        is refused in favour of that resource (`fix`: how to name it, e.g. "--{}" or "slurm.{}")."""
        if key in SLURM_TAKEN:
            own = SLURM_TAKEN[key]
            name = fix.format(own.replace("_", "-") if fix.startswith("--") else own)
            rule = " (one task per GPU)" if "tasks" in key else ""
            self.fail(where, f"is set by {name}{rule}, which checks it against the study; use {name} instead")

    def resource(self, where: str, key: str, value: Any) -> None:
        """One batch-job resource (a [slurm] key or its command-line flag) of the right type and size."""
        kind, least, _ = SLURM_KEYS[key]
        if not _is(value, kind):
            self.fail(where, f"expected {_kind_name(kind)}, got {value!r}")
        if least is not None and value < least:
            self.fail(where, f"must be >= {least}, got {value}")

    def config_error(self, e: ConfigError, contestant: str, contestant_recipe: dict, arm: str) -> None:
        """Name where a value a TrainConfig refused was set: the contestant, its arm, [data] or [recipe]."""
        if e.field in contestant_recipe:
            where = f"contestant {contestant!r}.recipe"
        elif arm != "main":
            where = f"arm.{arm}.{'data' if e.field in DATA_FIELDS else 'recipe'}"
        else:
            where = "data" if e.field in DATA_FIELDS else "recipe"
        self.fail(f"{where}.{e.field}", e.problem)

    def channels(self, cfg: TrainConfig) -> None:
        """mean/std need one value per image channel of a known dataset."""
        channels = DATASETS[canonical_dataset(cfg.dataset)][1]
        if cfg.mean and len(cfg.mean) != channels:
            raise ConfigError("mean", f"has {len(cfg.mean)} values but {cfg.dataset} images have {channels} "
                                      "channel(s); give one value per channel (and as many for std)")

    def value(self, where: str, value: Any, f: dataclasses.Field) -> None:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _TYPES.get(str(f.type), type(default))
        if not _is(value, kind):
            self.fail(where, f"expected {_kind_name(kind)} (like the default {default!r}), got {value!r}")

    def contestant(self, entry: Any, i: int, fields: dict[str, dataclasses.Field], arms: set[str]) -> dict[str, Any]:
        """A [[contestant]] table checked, as the keyword arguments of a `Contestant`."""
        where = f"contestant[{i}]"
        if not isinstance(entry, dict):
            self.fail(where, "must be a [[contestant]] table")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            self.fail(f"{where}.name", f"expected a folder-safe name (letters, digits, - _ . +), got {name!r}")
        where = f"contestant {name!r}"
        self.keys(entry, CONTESTANT_KEYS, where)
        model = self.get(entry, f"{where}.model", str, default="spach")
        arch = self.get(entry, f"{where}.arch", dict, default={})
        recipe = self.get(entry, f"{where}.recipe", dict, default={})
        for key, value in recipe.items():
            if key not in CONTESTANT_KNOBS:
                self.fail(f"{where}.recipe.{key}", f"a contestant may only override {', '.join(sorted(CONTESTANT_KNOBS))}; "
                          "shared knobs go in [recipe] so the comparison stays fair")
            self.value(f"{where}.recipe.{key}", value, fields[key])
        self.model(where, model, arch)
        arm = self.get(entry, f"{where}.arm", str, default="main")
        if arm not in arms:
            self.fail(f"{where}.arm", f"no arm named {arm!r}; define it as [arm.{arm}] or use one of {', '.join(sorted(arms))}")
        return dict(name=name, model=model, arch=arch, recipe=recipe, arm=arm,
                    label=self.text(self.get(entry, f"{where}.label", str, default=""), f"{where}.label"),
                    match=self.match(f"{where}.match", self.get(entry, f"{where}.match", dict, default={}), arch))

    def match(self, where: str, match: dict, arch: dict) -> dict:
        """`match = { macs = <number or contestant name>, tolerance = 0.1 }` (or `params = ...`): a cost
        target instead of a width (resolved by `spach.battle.matching` once the study is read)."""
        if not match:
            return {}
        self.keys(match, {"macs", "params", "tolerance"}, where)
        targets = [k for k in ("macs", "params") if k in match]
        if len(targets) != 1:
            self.fail(where, "give one target: macs or params, e.g. match = { macs = \"conv-ss\" } (another "
                      "contestant's) or match = { macs = 5.2e6 }")
        target = match[targets[0]]
        if not (isinstance(target, str) or (_is(target, float) and target > 0)):
            self.fail(f"{where}.{targets[0]}", f"expected a number > 0 or a contestant's name, got {target!r}")
        tolerance = match.get("tolerance", 0.1)
        if not _is(tolerance, float) or tolerance <= 0:
            self.fail(f"{where}.tolerance", f"expected a number > 0 (a fraction: 0.1 is 10%), got {tolerance!r}")
        if "hidden_dim" in arch:
            self.fail(where, "picks arch.hidden_dim; remove hidden_dim from arch (or the match)")
        return {**match, "tolerance": tolerance}

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

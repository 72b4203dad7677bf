"""A study's runs: one per (contestant, seed), each with its own run folder and training config, and
the checks made before any of them trains (recipe unchanged since earlier runs, data present)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spach.battle.results import STUDY_FILE, load_study_folder, run_dir
from spach.battle.study import Arm, Contestant, Study
from spach.errors import SpachError
from spach.files import read_json
from spach.plugins import import_plugins
from spach.train.config import RESUMABLE_CHANGES, TrainConfig, config_dict
from spach.train.datasets import DATASETS, canonical_dataset, dataset_shape, load_dataset, load_folders


@dataclass
class Run:
    contestant: Contestant
    seed: int
    folder: Path
    config: TrainConfig
    finished: bool = False  # done, or failed in this battle

    @property
    def name(self) -> str:
        return f"{self.contestant.name} seed {self.seed}"

    @property
    def error_file(self) -> Path:
        return self.folder.with_name(self.folder.name + ".error.txt")

    @property
    def log_file(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    def is_done(self) -> bool:
        summary = read_json(self.folder / "summary.json")
        epochs = summary.get("epochs") if isinstance(summary, dict) else None
        return isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= self.config.epochs


def plan(study: Study, out: Path) -> list[Run]:
    """All runs, seed-major (every contestant once before any second seed: early partial results are balanced)."""
    return [Run(c, s, run_dir(out, c.name, s), study.config(c, s, str(run_dir(out, c.name, s))))
            for s in study.seeds for c in study.contestants]


def open_study(out: Path, study: Study | None) -> Study:
    """The study to run in `out`: the given one (recorded there), or the one recorded by an earlier battle."""
    if study is None:
        study = load_study_folder(out)
        import_plugins(study.imports, f"{study.source}: study.imports")
    else:
        check_same_study(out, study)
    return study


def check_same_study(out: Path, study: Study) -> None:
    """A folder keeps one study: the one it records, or that study extended (contestants or seeds added)."""
    old = read_json(out / STUDY_FILE, warn=False) if out.is_dir() else None
    if not isinstance(old, dict):
        return  # a new folder (or a corrupt record, which the new study rewrites)
    old_contestants = {c.get("name") for c in old.get("contestants", []) if isinstance(c, dict)}
    if old.get("name") != study.name or not old_contestants & {c.name for c in study.contestants}:
        raise SpachError(f"{out} holds the study {old.get('name')!r} (from {old.get('source') or 'unknown'}), not "
                         f"{study.name!r} (from {study.source}): a folder keeps one study; choose another folder "
                         f"with --output (e.g. --output battles/{study.name})")


def check_compatible(runs: list[Run]) -> None:
    """Refuse to mix runs of another recipe into a study folder (the engine would refuse them one by one)."""
    for run in runs:
        old = read_json(run.folder / "config.json")
        if old is None:
            continue
        new = config_dict(run.config)
        differ = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
        if differ:
            k = differ[0]
            if k == "data_path":
                raise SpachError(f"{run.folder} was trained on the data at {old.get(k)!r}, --data (or data.data_path) now "
                                 f"says {new[k]!r}; pass --data {old.get(k)} to continue it, or use another --output")
            raise SpachError(f"{run.folder} was trained with {k} = {old.get(k)!r}, the study now says {new[k]!r}; "
                             f"use another --output (or delete that run folder to redo it)")


def check_data(study: Study) -> None:
    """Fail before any training when the study's dataset is not there (naming the battle's flag, --data),
    or when a subset asks for more images than it holds; records in `study.data_sizes` what each arm's
    runs will train and be tested on."""
    name = canonical_dataset(study.data.get("dataset", "imagefolder"))
    path = study.data.get("data_path", "")
    if name == "imagefolder" and not path:
        raise SpachError(f"{study.source}: data.data_path is not set: the study trains on image folders; pass --data DIR "
                         "(a folder holding train/ and val/ class folders)")
    try:  # what is wrong with a path given (missing, a file, no train/ folder, ...), said by the loaders
        study.data_sizes = _arm_sizes(study)
    except SpachError as e:  # the loaders speak to `spach train`, whose flag is --data-path
        raise SpachError(str(e).replace("--data-path", "--data")) from None


def _arm_sizes(study: Study) -> dict[str, dict[str, int]]:
    """Per arm: {"train": images a run trains on, "test": images it is tested on}."""
    full: dict[tuple[str, str], tuple[int, int]] = {}
    sizes = {}
    for arm in study.arm_names():
        members = [c for c in study.contestants if c.arm == arm]
        if not members:
            continue
        cfg = study.config(members[0])
        key = (canonical_dataset(cfg.dataset), cfg.data_path)
        if key not in full:
            full[key] = _full_sizes(*key, cfg.skip_bad_images)
        n_train, n_test = full[key]
        for field, n, what in (("train_subset", n_train, "training"), ("eval_train_subset", n_train, "training"),
                               ("val_subset", n_test, "test")):
            if getattr(cfg, field) > n:
                where = f"arm.{arm}.data" if field in study.arms.get(arm, Arm(arm)).data else "data"
                raise SpachError(f"{study.source}: {where}.{field} = {getattr(cfg, field):,} but the {what} set of "
                                 f"{key[0]}{' at ' + key[1] if key[1] else ''} holds {n:,} images; lower it (0: all)")
        sizes[arm] = {"train": min(cfg.train_subset or n_train, n_train), "test": min(cfg.val_subset or n_test, n_test)}
    return sizes


def _full_sizes(name: str, path: str, skip_bad: bool) -> tuple[int, int]:
    """(training images, test images) the dataset holds."""
    if name == "imagefolder":
        train, val = load_folders(path, skip_bad)
        return len(train), len(val)
    return len(load_dataset(name, path or None, train=True)), len(load_dataset(name, path or None, train=False))


def data_shape(study: Study) -> tuple[int, int, int]:
    """(classes, channels, image size) the engine will build the models for, without loading the data."""
    return dataset_shape(study.data)


def epoch_images(cfg: TrainConfig) -> tuple[int, int]:
    """(images trained on per epoch, images scored at each scored epoch) of a run with this config."""
    n_train, n_val = DATASETS[canonical_dataset(cfg.dataset)][3:]
    n_train = min(cfg.train_subset or n_train, n_train)
    return n_train, min(cfg.val_subset or n_val, n_val) + min(cfg.eval_train_subset, n_train)

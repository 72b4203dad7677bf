"""Named recipe presets and config files for `spach train`.

The defaults of `TrainConfig` are the paper's (DeiT) ImageNet recipe. A preset is a named set of
changes for small data, always chosen explicitly (`--preset fmnist`) and recorded in the run's
config. Precedence, lowest first: defaults, preset, `--config FILE` (TOML or YAML), command-line flags.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tomllib
import yaml

from spach.errors import SpachError
from spach.files import read_text
from spach.train.config import Default, TrainConfig

# (a preset's warm-up is a default, as TrainConfig's: cut to fit a shorter run, where a given one is refused)
_SMALL = dict(  # shared by the small-image presets: short schedule, no heavy regularisers
    epochs=10, batch_size=128, lr=4e-3, warmup_epochs=Default(1), warmup_lr=1e-5, min_lr=1e-5,
    mixup=0.0, cutmix=0.0, aa="none", color_jitter=0.0, repeated_aug=1, model_ema=False,
    reprob=0.0, drop_path=0.05, workers=0, eval_batch_size=512,
)

PRESETS: dict[str, dict[str, Any]] = {
    # 28x28 grayscale resized to 32 (multi-stage patch-4 models need a multiple of 32): mild crops and
    # flips on tensors, lr 1e-3 at batch 128.
    "fmnist": dict(_SMALL, dataset="fashion-mnist", img_size=32, scale=[0.75, 1.0], ratio=[0.9, 1.1]),
    # 32x32 colour, longer: RandAugment needs the per-image path.
    "cifar10": dict(_SMALL, dataset="cifar10", epochs=100, warmup_epochs=Default(5), scale=[0.6, 1.0], mixup=0.8, cutmix=1.0,
                    aa="rand-m9-mstd0.5-inc1", reprob=0.25, drop_path=0.1, workers=2),
    "cifar100": dict(_SMALL, dataset="cifar100", epochs=100, warmup_epochs=Default(5), scale=[0.6, 1.0], mixup=0.8, cutmix=1.0,
                     aa="rand-m9-mstd0.5-inc1", reprob=0.25, drop_path=0.1, workers=2),
    # The built-in toy set, for tests and smoke runs: seconds on a CPU.
    "tiny": dict(_SMALL, dataset="tiny", epochs=2, batch_size=32, lr=5e-2, warmup_epochs=Default(0), drop_path=0.0,
                 scale=[0.8, 1.0], ratio=[0.9, 1.1], eval_batch_size=64),
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (`.toml`) or YAML (`.yaml`/`.yml`) or JSON file of `TrainConfig` fields
    (`-` and `_` both accepted in names). A run's `config.json` is accepted too."""
    path = Path(path)
    text = read_text(path, "config file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise SpachError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise SpachError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpachError(f"config file {path} must hold a table of settings, not a {type(data).__name__}")
    data.pop("resolved", None)  # derived values a run's config.json carries
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(preset: str | None = None, config_file: str | None = None, **overrides: Any) -> TrainConfig:
    """defaults < preset < config file < overrides, checked against `TrainConfig`'s fields."""

    values: dict[str, Any] = {}
    file_values = load_config_file(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", "") or ""
    if preset:
        if preset not in PRESETS:
            raise SpachError(f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
        values.update(PRESETS[preset], preset=preset)
    values.update(file_values)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpachError(f"unknown training setting(s) {', '.join(unknown)}; see 'spach train --help'")
    return TrainConfig(**values)

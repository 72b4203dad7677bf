"""Training checkpoints and run folders: reading a checkpoint back (tensors and plain data only), the
model weights a run keeps (`best`, and `final` with safetensors) in either format, and deciding where a
run starts: fresh, resumed from its folder's checkpoint, or refused because the folder holds another run."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from spach.errors import CheckpointError, SpachError
from spach.files import LOCK_FILE, atomic_save, atomic_save_safetensors, is_safetensors, read_json, safetensors_metadata
from spach.models.convert import load_file
from spach.plugins import import_plugins
from spach.train.config import RESUMABLE_CHANGES, ConfigError, TrainConfig, config_dict


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by the engine (tensors and plain data only)."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a training checkpoint")
    return ckpt


def load_resumable(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint to resume from (weights, optimizer state, where the run stood); weights
    alone (best.pth, a safetensors file, a bare state dict) are refused, saying how to start from them."""
    ckpt = None if is_safetensors(path) else load(path)
    if ckpt is None or not isinstance(ckpt.get("optimizer"), dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("epoch"), int):
        raise CheckpointError(f"--resume {path} is not a resumable training checkpoint (it holds model weights only, no "
                              f"optimizer state); start from its weights with --pretrained {path}, or resume a run "
                              "with its checkpoint.pth (--resume auto)")
    return ckpt


WEIGHT_SUFFIX = {"torch": ".pth", "safetensors": ".safetensors"}


def save_weights(state_dict: dict[str, torch.Tensor], info: dict[str, Any], path: Path, save_format: str) -> Path:
    """Model weights plus plain `info` (the run's `args`, its epoch, top-1) as `path` + the format's
    suffix: a torch file `{"model": weights, **info}`, or safetensors with `info` in its metadata.
    `read_checkpoint` and `read_args` read both."""
    path = path.with_suffix(WEIGHT_SUFFIX[save_format])
    if save_format == "safetensors":
        atomic_save_safetensors(state_dict, info, path)
    else:
        atomic_save({"model": state_dict, **info}, path)
    return path


# The settings `spach eval` and `spach export` take from a checkpoint: checked as the flags are (model_kwargs
# may neither set what a flag sets nor widen what loading does)
_USED_ARGS = ("model", "model_kwargs", "img_size", "mean", "std", "imports")


def read_args(path: str | os.PathLike) -> dict[str, Any]:
    """The training config a spach checkpoint carries (`args`; {} for official or bare weights), from a
    torch checkpoint or a safetensors file's metadata."""
    metadata = safetensors_metadata(path)
    return checked_args((metadata if metadata is not None else load(path)).get("args"), path)


def checked_args(args: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The `args` read from checkpoint `path` ({} when it stores none), the settings taken from it checked."""
    if not isinstance(args, dict):
        return {}
    kwargs = args.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CheckpointError(f"checkpoint {path} stores model_kwargs = {kwargs!r}, not a JSON object: the file was "
                              "altered or not written by spach; re-save it from the trained model")
    stored = {k: args[k] for k in _USED_ARGS if k in args}
    try:
        TrainConfig(**stored)
    except ConfigError as e:
        if e.field == "model_kwargs":  # what --model-kwargs may not do, a stored one may not either
            raise CheckpointError(f"checkpoint {path} stores model_kwargs that {e.problem}; it was refused (the file "
                                  "was altered or written by an older spach)") from None
        raise CheckpointError(f"checkpoint {path} stores an invalid {e.field} (it {e.problem}): the file was altered "
                              "or not written by spach; re-save it from the trained model") from None
    return args


def import_recorded_plugins(args: dict[str, Any], given: list[str] | None, path: str | os.PathLike) -> None:
    """Import the plugins (custom mixers) the run of checkpoint `path` recorded in its `args`, said on
    stderr; `given` (--imports) replaces them (an empty list: none)."""
    if given is not None:
        import_plugins(given, "--imports")
        return
    recorded = args.get("imports") or []  # checked_args checked: a list of module names or absolute .py paths
    if recorded:
        import_plugins(recorded, f"checkpoint {path}: imports (recorded by its run; pass --imports to name them anew)")
        print(f"imported the plugin(s) the run of {path} recorded: {', '.join(recorded)} (--imports overrides)",
              file=sys.stderr, flush=True)


def resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, if any; refuses a folder that holds another run."""
    ckpt = out / "checkpoint.pth"
    explicit = cfg.resume not in ("", "auto")
    if explicit and not Path(cfg.resume).is_file():
        raise SpachError(f"--resume {cfg.resume}: no such checkpoint file; pass a checkpoint.pth or 'auto'")
    saved = out / "config.json"
    if not saved.is_file():
        if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise SpachError(f"output folder {out} already holds other files; choose an empty or new --output")
        return Path(cfg.resume) if explicit else None
    old = read_json(saved)
    if not isinstance(old, dict):
        raise SpachError(f"{saved} is unreadable; choose another --output (or delete that folder to start over)")
    old.pop("resolved", None)
    new = config_dict(cfg)
    differ = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if differ:
        raise SpachError(f"output folder {out} holds a different run (it differs in {', '.join(differ[:4])}); "
                         f"choose another --output")
    if explicit:
        return Path(cfg.resume)
    if not ckpt.is_file():
        return None  # the earlier run stopped before its first checkpoint: start again
    if cfg.resume != "auto":
        raise SpachError(f"output folder {out} already holds this run; pass --resume auto to continue it, or choose another --output")
    return ckpt


def check_same_model(ckpt: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    args = ckpt.get("args") or {}
    mine = config_dict(cfg)
    for key in ("model", "model_kwargs"):
        if key in args and args[key] != mine[key]:
            raise CheckpointError(f"checkpoint {path} is of another model ({key} {args[key]!r}, not {mine[key]!r}); "
                                  f"pass the matching --model, or another --output/--resume")

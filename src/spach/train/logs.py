"""Experiment logs beside `metrics.jsonl`: TensorBoard event files and Weights & Biases runs (offline).

`TrainConfig.log` names them: `tensorboard`, `wandb`, both comma-separated, `none`, or `auto`
(TensorBoard when its package is installed, else none). `resolve_log` turns that into the loggers a
run uses (the engine records the answer in config.json's "resolved" section), `open_logs` starts them
in the run folder, and `RunLogs.epoch(record)` writes every number of an epoch's metrics.jsonl record
(losses, top-1/5, lr, images/s, times, memory) at step = the epoch.

- TensorBoard: event files in the run folder itself, so it is the run's log dir and TensorBoard names
  the run after it: `tensorboard --logdir runs` compares `spach train` runs, and as a battle's run
  folders live under its study folder, `tensorboard --logdir STUDY` shows every contestant and seed
  side by side (`runs/<contestant>/seed<k>`). A resumed run opens a new event file that purges the
  steps it redoes.
- Weights & Biases: offline unless `WANDB_MODE` says otherwise (`wandb sync` uploads later); files in
  `$WANDB_DIR`, else `<run>/wandb/`; project `$WANDB_PROJECT`, else `spach`.

Only this module imports the logging packages, and only when a logger is asked for (both are optional
extras: `pip install 'spach[tensorboard]'`, `'spach[wandb]'`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

from spach.errors import SpachError, first_line

# logger -> the package it needs, which is also the name of the spach extra that installs it
LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
_ALONE = ("none", "auto")


def parse_log(spec: str) -> list[str]:
    """The names a `log` value lists, checked for syntax only (no package is looked at); a ValueError
    saying what is wrong otherwise (phrased to follow the knob's name: '--log names an unknown ...')."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    choices = f"choose {', '.join(LOGGERS)} (comma-separated), none or auto"
    if not names:
        raise ValueError(f"is empty; {choices}")
    unknown = [n for n in names if n not in LOGGERS and n not in _ALONE]
    if unknown:
        raise ValueError(f"names an unknown logger {unknown[0]!r}; {choices}")
    if len(names) > 1 and set(names) & set(_ALONE):
        raise ValueError(f"cannot combine none or auto with other loggers, got {spec!r}; {choices}")
    return list(dict.fromkeys(names))


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_log(spec: str) -> str:
    """The loggers a run will use, comma-separated, or 'none': `auto` becomes tensorboard when it is
    installed; a logger asked for by name whose package is missing is a one-line error naming the extra."""
    names = parse_log(spec)
    if names == ["auto"]:
        return "tensorboard" if installed(LOGGERS["tensorboard"]) else "none"
    if names == ["none"]:
        return "none"
    for name in names:
        if not installed(LOGGERS[name]):
            raise SpachError(f"--log {name} needs the {LOGGERS[name]} package: pip install 'spach[{name}]' "
                             f"(or choose another --log)")
    return ",".join(names)


class _Writer(Protocol):
    def epoch(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any], first_epoch: int):
        # optional dependency (spach[tensorboard]): imported only when TensorBoard logging is on
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out), purge_step=first_epoch if first_epoch > 1 else None)
        if first_epoch == 1:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a live `tensorboard --logdir` sees each epoch as it ends

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: dict[str, Any], first_epoch: int):
        # optional dependency (spach[wandb]): imported only when W&B logging is on
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "spach"), name=f"{out.parent.name}/{out.name}", config=config,
                dir=None if os.environ.get("WANDB_DIR") else str(out), mode=os.environ.get("WANDB_MODE", "offline"),
                # console off: W&B would otherwise wrap stdout/stderr, which the battle redirects to run logs
                settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
            )
        except Exception as e:  # wandb raises its own error types (bad mode, unwritable dir, ...)
            raise SpachError(f"Weights & Biases did not start ({first_line(e)}); fix it or choose another --log") from None

    def epoch(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_WRITERS: dict[str, type[_TensorBoard | _WandB]] = {"tensorboard": _TensorBoard, "wandb": _WandB}


class RunLogs:
    """A run's loggers (none at all on ranks other than 0, or with `log none`)."""

    def __init__(self, writers: list[_Writer]):
        self.writers = writers

    def epoch(self, record: dict[str, Any]) -> None:
        """Log every number of one metrics.jsonl record at step = its epoch."""
        scalars = {k: float(v) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for w in self.writers:
            w.epoch(record["epoch"], scalars)

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # close them all, even when one fails
            for w in self.writers:
                stack.callback(w.close)


def open_logs(resolved: str, out: Path, config: dict[str, Any], first_epoch: int = 1) -> RunLogs:
    """Start the loggers `resolved` (from `resolve_log`) names in run folder `out`; `first_epoch` > 1
    continues a resumed run."""
    logs = RunLogs([])
    try:
        for name in resolved.split(","):
            if name != "none":
                logs.writers.append(_WRITERS[name](out, config, first_epoch))
    except BaseException:
        logs.close()
        raise
    return logs

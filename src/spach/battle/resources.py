"""The batch-job resources of a battle's runs (`--launcher slurm` / `submitit-local`): the study's
[slurm] table under the command-line flags, checked against what the study's runs can use, and
turned into the parameters of submitit's `AutoExecutor` (the DeiT / ConvNeXt `run_with_submitit.py`
convention: one task per GPU, `--requeue`, USR2 before the time limit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tomllib

from spach.battle.schema import SLURM_KEYS, Validator, submitit_key
from spach.battle.study import Study
from spach.errors import SpachError

DEFAULT_TIMEOUT_MIN = 1440  # a day per job; a longer run is requeued at the limit and resumes
SIGNAL_DELAY_S = 120  # USR2 this long before the limit: the run saves a checkpoint and is requeued (DeiT's value)
FLAGS = [key for key in SLURM_KEYS if key != "extra"]  # each a --flag of `spach battle`


@dataclass
class Resources:
    """What one run's job asks for; every run of a study asks for the same."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    timeout_min: int = DEFAULT_TIMEOUT_MIN
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # submitit's slurm_* parameters, without the prefix

    @property
    def tasks_per_node(self) -> int:
        """One task (process) per GPU, as torchrun starts one per GPU; one per node without GPUs."""
        return max(1, self.gpus_per_node)

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node

    def parameters(self, name: str) -> dict[str, Any]:
        """The `submitit.AutoExecutor.update_parameters` of one run's job called `name`."""
        params: dict[str, Any] = {"name": name, "nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                                  "timeout_min": self.timeout_min, "slurm_signal_delay_s": SIGNAL_DELAY_S}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        params.update({f"slurm_{key}": getattr(self, key) for key in ("partition", "account", "constraint")
                       if getattr(self, key)})
        extra = dict(self.extra)
        # --requeue: Slurm may put a preempted (or node-failed) job back in the queue; it resumes from its checkpoint
        params["slurm_additional_parameters"] = {"requeue": True, **extra.pop("additional_parameters", {})}
        params.update({f"slurm_{key}": value for key, value in extra.items()})
        return params

    def describe(self) -> str:
        gpus = f"{self.gpus_per_node} GPU(s) ({self.tasks_per_node} tasks)" if self.gpus_per_node else "no GPU (1 task)"
        parts = [f"{self.nodes} node(s) x {gpus}", f"{self.world} process(es) per run"]
        parts += [f"{self.cpus_per_task} CPUs per task"] if self.cpus_per_task else []
        parts += [f"{key} {getattr(self, key)}" for key in ("partition", "account", "constraint") if getattr(self, key)]
        parts += [f"{self.timeout_min} min per job (then requeued)"]
        parts += [f"{key}={value!r}" for key, value in self.extra.items()]
        return ", ".join(parts)


def resolve(study: Study, flags: dict[str, Any]) -> Resources:
    """The study's [slurm] table under `flags` (the --KEY flags, and `extra` from --slurm KEY=VALUE),
    checked against the study's recipe; a mistake names the flag or the study file's field."""
    flag_check = Validator("")
    for key, value in flags.items():
        flag_check.resource(flag_name(key), key, value)
    for key in flags.get("extra", {}):
        flag_check.passthrough(f"--slurm {key}", key, "--{}")
    table = study.slurm
    res = Resources(**{**table, **flags, "extra": {**table.get("extra", {}), **flags.get("extra", {})}})
    where = "--gpus-per-node" if "gpus_per_node" in flags else f"{study.source}: slurm.gpus_per_node"
    for device in sorted({study.config(c).device for c in study.contestants}):
        if res.gpus_per_node and device == "cpu":
            raise SpachError(f"{where}: {res.gpus_per_node} GPU(s) per node asked for, but the study's recipe says "
                             "device = \"cpu\"; ask for no GPU, or set recipe.device = \"auto\"")
        if res.gpus_per_node > 1 and device.startswith("cuda:"):
            raise SpachError(f"{where}: a {res.gpus_per_node}-GPU run gives each process its own GPU, but the study's "
                             f"recipe pins device = {device!r}; set recipe.device = \"cuda\" or \"auto\"")
        if not res.gpus_per_node and device.startswith("cuda"):
            raise SpachError(f"{where}: the study trains on device {device!r} but its jobs ask for no GPU; "
                             "set --gpus-per-node (or [slurm] gpus_per_node)")
    return res


def flag_name(key: str) -> str:
    """The command-line flag of a resource (`extra` comes from --slurm KEY=VALUE)."""
    return "--slurm" if key == "extra" else "--" + key.replace("_", "-")


def parse_pairs(items: list[str]) -> dict[str, Any]:
    """--slurm KEY=VALUE ...: VALUE read as a TOML value where it is one (64, true, ["a"]), else as text."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = submitit_key(key)
        if not sep or not key:
            raise SpachError(f"--slurm expects KEY=VALUE (one of submitit's slurm_* parameters without the prefix, "
                             f"e.g. qos=high or mem_gb=64), got {item!r}")
        try:
            pairs[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pairs[key] = text
    return pairs

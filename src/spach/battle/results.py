"""A battle's results as data: one `RunResult` per (contestant, seed) and one `ContestantResult` per
contestant, read back from the study folder. The findings and the report work on these, never on files.

Study folder layout (written by `spach.battle`):
    study.toml            the study as last run
    costs.json            per contestant: family, layout, cpe, params, MACs, throughput (measured once)
    results.jsonl         the ledger: one line per finished or failed run attempt
    runs/<name>/seed<k>/  the engine's run folder (config.json, metrics.jsonl, summary.json, ...)
    runs/<name>/seed<k>.log, .error.txt   the engine's output, and the traceback of a failed run
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spach.battle.study import Study
from spach.errors import SpachError
from spach.files import append_jsonl, read_json, read_jsonl, warn_once
from spach.train.evaluate import PREDICTIONS_FILE

STUDY_FILE = "study.json"
COSTS_FILE = "costs.json"
LEDGER_FILE = "results.jsonl"
PREDICTION_FILE = "prediction.json"
RUNS_DIR = "runs"


def run_dir(study_dir: Path, contestant: str, seed: int) -> Path:
    return Path(study_dir) / RUNS_DIR / contestant / f"seed{seed}"


class Ledger:
    """`results.jsonl`: one line per finished or failed run attempt, appended (earlier lines are never
    rewritten)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)

    def records(self) -> list[dict[str, Any]]:
        """The run records, read as data: a line whose fields have the wrong types (edited by hand, another
        program's) is skipped, and named once on stderr."""
        out = []
        for i, rec in enumerate(read_jsonl(self.path), 1):
            problem = _bad_record(rec)
            if problem:
                warn_once(self.path, f"record {i} is not a run record the battle wrote ({problem}); it is ignored")
                continue
            out.append(rec)
        return out


_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "contestant": (str,), "seed": (int,), "status": (str,), "time": (str,), "error": (str,), "log": (str,),
    "attempt_s": (int, float, type(None)), "final_top1": (int, float, type(None)), "best_top1": (int, float, type(None)),
    "final_train_loss": (int, float, type(None)), "wall_time_s": (int, float, type(None)), "epochs": (int, type(None)),
    "reconciled": (bool,), "job_id": (str, int), "state": (str,)}


def _bad_record(rec: dict[str, Any]) -> str:
    for key in ("contestant", "seed", "status"):
        if key not in rec:
            return f"no {key}"
    for key, kinds in _RECORD_TYPES.items():
        value = rec.get(key)
        if key in rec and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            return f"{key} is {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value!r}"
    if rec["status"] not in ("done", "failed"):
        return f"status is {rec['status']!r}"
    if isinstance(rec.get("attempt_s"), (int, float)) and rec["attempt_s"] < 0:
        return f"attempt_s is {rec['attempt_s']!r}"
    return ""


def load_study_folder(study_dir: Path) -> Study:
    """The study recorded in a battle folder, or a one-line error saying why there is none."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise SpachError(f"{study_dir} is not a battle folder: it holds no battle (no {STUDY_FILE}); run 'spach battle STUDY --output "
                         f"{study_dir}' first")
    data = read_json(path, warn=False)
    try:
        return Study.from_dict(data)
    except (TypeError, KeyError, AttributeError):
        raise SpachError(f"{path} is corrupt; rerun 'spach battle STUDY --output {study_dir}' with the study file to "
                         "rewrite it (finished runs are kept)") from None


def _num(x: Any) -> float:
    """A number read from a file, NaN when it is not one (a hand-edited "high" is no top-1)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


@dataclass
class RunResult:
    """One training run: its per-epoch records and, once finished, its summary."""

    contestant: str
    seed: int
    status: str  # "done", "failed", "partial" (interrupted) or "pending"
    epochs: list[dict] = field(default_factory=list)
    summary: dict | None = None
    error: str | None = None
    folder: Path | None = None

    def correct(self) -> np.ndarray | None:
        """0/1 per validation image (the final epoch's predictions), or None when the run stored none."""
        if self.status != "done" or self.folder is None:
            return None
        try:
            with np.load(self.folder / PREDICTIONS_FILE) as f:
                return (f["pred"] == f["label"]).astype(np.float64)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    def _last(self, key: str) -> float:
        for rec in reversed(self.epochs):
            if _num(rec.get(key)) == _num(rec.get(key)):
                return _num(rec[key])
        return math.nan

    def _summary(self, key: str) -> float:
        return _num(self.summary.get(key)) if self.summary else math.nan

    @property
    def final_top1(self) -> float:
        value = self._summary("final_top1")
        return value if math.isfinite(value) else self._last("top1")

    @property
    def best_top1(self) -> float:
        value = self._summary("best_top1")
        return value if math.isfinite(value) else max((_num(r.get("top1")) for r in self.epochs
                                                        if math.isfinite(_num(r.get("top1")))), default=math.nan)

    @property
    def final_train_loss(self) -> float:
        value = self._summary("final_train_loss")
        return value if math.isfinite(value) else self._last("train_loss")

    @property
    def fit_loss(self) -> float:
        """Final loss on training images: the clean eval-mode loss on a train subset when the recipe
        measures it, else the running training loss (which includes augmentation and dropout)."""
        clean = self._last("train_eval_loss")
        return clean if not math.isnan(clean) else self.final_train_loss

    @property
    def gap(self) -> float:
        """Generalisation gap: train-subset top-1 minus test top-1 at the last epoch (NaN if unmeasured)."""
        return self._last("train_eval_top1") - self.final_top1

    @property
    def wall_time_s(self) -> float:
        value = self._summary("wall_time_s")
        return value if math.isfinite(value) else float(sum(_num(r.get("epoch_time")) for r in self.epochs
                                                            if math.isfinite(_num(r.get("epoch_time")))))

    def curve(self) -> list[tuple[float, float]]:
        """(training loss, test top-1) per epoch, the training loss as in `fit_loss`."""
        scored = [r for r in self.epochs if math.isfinite(_num(r.get("top1")))]
        key = "train_eval_loss" if scored and all("train_eval_loss" in r for r in scored) else "train_loss"
        return [(_num(r.get(key)), _num(r["top1"])) for r in scored if math.isfinite(_num(r.get(key)))]


@dataclass
class ContestantResult:
    """A contestant's facts (from `costs.json`) and its runs."""

    name: str
    family: str  # conv / attn / mlp / hybrid / a custom mixer / "outside" (timm models)
    layout: str  # "single" or "multi"
    arm: str = "main"
    label: str = ""  # the study's free-text description of the contestant
    cpe: bool = True
    shared: bool = False
    params: int = 0
    macs: int = 0
    throughput: float = math.nan  # inference images/s on the machine that ran the battle
    arch_key: str = ""  # the architecture apart from local modeling and weight sharing
    model: str = "spach"
    scores_train: bool = False  # its recipe scores a training subset (the generalisation gap is measured)
    width: int = 0  # hidden_dim of a SPACH model (0: another model)
    match: dict = field(default_factory=dict)  # the study's cost target for it, if it stated one
    runs: list[RunResult] = field(default_factory=list)

    @property
    def done(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "done"]

    def values(self, metric: str) -> list[float]:
        """`metric` (a `RunResult` property) over the finished seeds, NaNs dropped."""
        vals = [getattr(r, metric) for r in self.done]
        return [float(v) for v in vals if not math.isnan(v)]

    def mean(self, metric: str) -> float:
        vals = self.values(metric)
        return float(np.mean(vals)) if vals else math.nan

    def std(self, metric: str) -> float:
        vals = self.values(metric)
        return float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def load_costs(study_dir: Path) -> dict[str, dict[str, Any]]:
    """`costs.json` (empty when missing or corrupt: the battle measures the costs again)."""
    costs = read_json(Path(study_dir) / COSTS_FILE)
    return {k: v for k, v in costs.items() if isinstance(v, dict)} if isinstance(costs, dict) else {}


def load_run(study_dir: Path, contestant: str, seed: int) -> RunResult:
    folder = run_dir(study_dir, contestant, seed)
    epochs = read_jsonl(folder / "metrics.jsonl", live=True)
    summary = read_json(folder / "summary.json")
    error_file = folder.with_name(folder.name + ".error.txt")
    if isinstance(summary, dict) and math.isfinite(_num(summary.get("final_top1"))):
        return RunResult(contestant, seed, "done", epochs, summary, folder=folder)
    if error_file.exists():
        lines = error_file.read_bytes().decode("utf-8", "replace").strip().splitlines()
        return RunResult(contestant, seed, "failed", epochs, None, lines[-1] if lines else "unknown error", folder)
    return RunResult(contestant, seed, "partial" if epochs else "pending", epochs, folder=folder)


def contestant_entries(study: Study, costs: dict[str, dict[str, Any]]) -> list[ContestantResult]:
    """The study's contestants with their facts (from `costs`) and no runs yet."""
    out = []
    for c in study.contestants:
        facts = costs.get(c.name, {})
        known = {k: facts[k] for k in ContestantResult.__dataclass_fields__
                 if k in facts and k not in ("runs", "name", "arm", "label", "scores_train", "match")}
        known.setdefault("family", "?")
        known.setdefault("layout", "?")
        out.append(ContestantResult(name=c.name, arm=c.arm, label=c.label, match=c.match, **known,
                                    scores_train=study.config(c).eval_train_subset > 0))
    return out


def load_results(study_dir: Path, study: Study) -> list[ContestantResult]:
    """Everything the findings and the report need, in the study's contestant order; each contestant's
    runs in the study's seed order (a missing run is there too, as pending)."""
    entries = contestant_entries(study, load_costs(study_dir))
    for e in entries:
        e.runs = [load_run(study_dir, e.name, s) for s in study.seeds]
    return entries

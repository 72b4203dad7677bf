"""The battle runner: every (contestant, seed) of a study trained by `spach.engine.train`, each in its
own run folder, one after another or N at a time.

Resumable by construction: a run whose `summary.json` covers the study's epochs is skipped, any other
is (re)started with `resume="auto"`, so an interrupted run continues from its last checkpoint. A run
that raises is recorded (ledger line + `<run>.error.txt`) and the others go on. The ledger
`results.jsonl` is rewritten atomically on every append, so a crash loses nothing that finished.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from spach.checkpoint import atomic_write_text
from spach.errors import SpachError
from spach.results import COSTS_FILE, LEDGER_FILE, load_costs, read_json, read_jsonl, run_dir
from spach.study import Contestant, Study, import_plugins

STUDY_FILE = "study.json"
# Known in-memory datasets: (classes, channels, native size, train images, test images).
DATASETS = {"fashion-mnist": (10, 1, 28, 60000, 10000), "cifar10": (10, 3, 32, 50000, 10000),
            "cifar100": (100, 3, 32, 50000, 10000), "tiny": (4, 1, 28, 256, 64),
            "imagefolder": (1000, 3, 0, 1281167, 50000)}  # ImageNet-1k sizes when the folder is not there


@dataclass
class Run:
    contestant: Contestant
    seed: int
    folder: Path
    kwargs: dict[str, Any]  # TrainConfig keyword arguments
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
        return summary is not None and summary.get("epochs", 0) >= self.kwargs.get("epochs", 0)


def plan(study: Study, out: Path) -> list[Run]:
    """All runs, seed-major (every contestant once before any second seed: early partial results are balanced)."""
    from spach.engine import TrainConfig

    epochs = TrainConfig(**study.train_kwargs(study.contestants[0], 0, "")).epochs
    return [Run(c, s, run_dir(out, c.name, s), {"epochs": epochs, **study.train_kwargs(c, s, str(run_dir(out, c.name, s)))})
            for s in study.seeds for c in study.contestants]


def open_study(out: Path, study: Study | None) -> Study:
    """The study to run in `out`: the given one (recorded there), or the one recorded by an earlier battle."""
    saved = out / STUDY_FILE
    if study is None:
        if not saved.is_file():
            raise SpachError(f"{out} holds no battle ({STUDY_FILE} missing); give a study file or --preset")
        study = Study.from_dict(json.loads(saved.read_text()))
        import_plugins(study.imports, study.source)
    return study


def check_compatible(runs: list[Run]) -> None:
    """Refuse to mix runs of another recipe into a study folder (the engine would refuse them one by one)."""
    from spach.engine import RESUMABLE_CHANGES, TrainConfig, config_dict

    for run in runs:
        old = read_json(run.folder / "config.json")
        if old is None:
            continue
        new = config_dict(TrainConfig(**run.kwargs))
        differ = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
        if differ:
            k = differ[0]
            raise SpachError(f"{run.folder} was trained with {k} = {old.get(k)!r}, the study now says {new[k]!r}; "
                             f"use another --output (or delete that run folder to redo it)")


def check_data(study: Study) -> None:
    """Fail before any training when the study's dataset is not there."""
    from spach.data import canonical_dataset, load_dataset

    name = canonical_dataset(study.data.get("dataset", "imagefolder"))
    path = study.data.get("data_path", "")
    if name == "imagefolder":
        if not path or not (Path(path) / "train").is_dir() or not (Path(path) / "val").is_dir():
            raise SpachError(f"data.data_path: {path or '(not set)'} is not a folder with train/ and val/ class folders; "
                             "pass --data DIR")
    elif name != "tiny":
        load_dataset(name, path or None, train=False)


# ----------------------------------------------------------------------------------------- costs
def data_shape(study: Study) -> tuple[int, int, int]:
    """(classes, channels, image size) the engine will build the models for, without loading the data."""
    from spach.data import canonical_dataset

    name = canonical_dataset(study.data.get("dataset", "imagefolder"))
    classes, chans, native = DATASETS[name][:3]
    path = Path(study.data.get("data_path", "") or ".") / "train"
    if name == "imagefolder" and path.is_dir():
        classes = sum(1 for p in path.iterdir() if p.is_dir()) or classes
    return classes, chans, study.data.get("img_size", 0) or native


def contestant_facts(model: Any) -> dict[str, Any]:
    """Family, layout and local-modeling facts of a built model (timm models are 'outside' baselines)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "family"):
        return {"family": "outside", "layout": "-", "cpe": True, "shared": False, "arch_key": type(model).__name__}
    arch = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("cpe", "pos_embed", "shared_spatial_func", "drop_path_rate", "drop_rate", "attn_drop_rate")}
    return {"family": model.family, "layout": "multi" if len(cfg.net_arch) > 1 else "single", "cpe": bool(cfg.cpe),
            "shared": bool(cfg.shared_spatial_func), "arch_key": json.dumps(arch, sort_keys=True, default=str)}


def measure_costs(study: Study, out: Path | None, device: str = "cpu", timed: bool = True) -> dict[str, dict[str, Any]]:
    """Params, MACs and inference throughput (images/s, batch 64, `device`; NaN when not `timed`) of every
    contestant, cached in `out/costs.json`. A model that cannot be built with the study's data is a user
    error; one that crashes otherwise is recorded (`error`) and its runs fail without training."""
    from spach.engine import TrainConfig, build_model
    from spach.profile import count_macs, count_params, throughput

    costs = load_costs(out) if out is not None else {}
    classes, chans, size = data_shape(study)
    for c in study.contestants:
        if c.name in costs and "error" not in costs[c.name]:
            continue
        cfg = TrainConfig(**study.train_kwargs(c, study.seeds[0], ""))
        try:
            model = build_model(cfg, classes, chans, size)
        except SpachError as e:
            raise SpachError(f"contestant {c.name!r}: {e}") from None
        try:
            img = size or model.pretrained_cfg["input_size"][-1]
            costs[c.name] = {"params": count_params(model), "macs": count_macs(model, img),
                             "throughput": throughput(model, 64, img, device) if timed else math.nan,
                             "throughput_device": device, "model": c.model, **contestant_facts(model)}
        except Exception as e:
            costs[c.name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0], "model": c.model}
        if out is not None:
            atomic_write_text(out / COSTS_FILE, json.dumps(costs, indent=1) + "\n")
    return costs


# ---------------------------------------------------------------------------------------- ledger
class Ledger:
    """`results.jsonl`: one line per finished or failed run attempt, each append an atomic rewrite."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        lines = [json.dumps(r) for r in read_jsonl(self.path)] + [json.dumps(record)]
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _outcome(run: Run, summary: dict | None, error: str | None, started: float) -> dict[str, Any]:
    rec = {"contestant": run.contestant.name, "seed": run.seed, "status": "done" if error is None else "failed",
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "attempt_s": round(time.time() - started, 1)}
    if summary:
        rec.update({k: summary.get(k) for k in ("final_top1", "best_top1", "final_train_loss", "epochs", "wall_time_s")})
    if error is not None:
        rec["error"] = error
    return rec


def execute(run: Run, on_epoch: Callable[[dict], None] | None = None, progress: str = "lines") -> dict[str, Any]:
    """Train one run (resuming it if it was interrupted); never raises for a failing run, except
    KeyboardInterrupt. The engine's own output goes to `<run>.log`."""
    from spach.engine import TrainConfig, train

    started = time.time()
    run.error_file.unlink(missing_ok=True)
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg = TrainConfig(**run.kwargs, resume="auto", progress=progress)
        with open(run.log_file, "a") as log, contextlib.redirect_stdout(log):
            summary = train(cfg, on_epoch_end=on_epoch)
        return _outcome(run, summary, None, started)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        error = f"{type(e).__name__}: {first}" if not isinstance(e, SpachError) else first
        atomic_write_text(run.error_file, traceback.format_exc())
        return _outcome(run, None, error, started)


def _worker_init(threads: int, imports: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    import_plugins(imports)


# -------------------------------------------------------------------------------------- progress
def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Lines on `stream`: which run, its epoch, and ETAs for the run and the whole study. An epoch's time
    is predicted from the contestant's own epochs, else from seconds per MAC seen so far."""

    def __init__(self, runs: list[Run], costs: dict[str, dict], stream: TextIO, jobs: int = 1):
        self.runs, self.costs, self.stream, self.jobs = runs, costs, stream, jobs
        self.index = {id(r): i + 1 for i, r in enumerate(runs)}
        self.epoch_times: dict[str, list[float]] = {}
        self.epochs_done: dict[int, int] = {}
        self.started = time.time()
        for r in runs:
            recs = read_jsonl(r.folder / "metrics.jsonl")
            self.epochs_done[id(r)] = len(recs)
            self.epoch_times.setdefault(r.contestant.name, []).extend(x.get("epoch_time", math.nan) for x in recs)

    def say(self, run: Run | None, text: str) -> None:
        head = f"[{self.index[id(run)]:>{len(str(len(self.runs)))}}/{len(self.runs)}] {run.name}: " if run else ""
        print(head + text, file=self.stream, flush=True)

    def _epoch_time(self, name: str) -> float:
        own = [t for t in self.epoch_times.get(name, []) if math.isfinite(t)]
        if own:
            return sum(own) / len(own)
        seen = [(sum(t for t in ts if math.isfinite(t)), len(ts) * self.costs.get(n, {}).get("macs", 0))
                for n, ts in self.epoch_times.items() if ts]
        secs, macs = sum(s for s, _ in seen), sum(m for _, m in seen)
        return secs / macs * self.costs.get(name, {}).get("macs", 0) if macs else math.nan

    def remaining(self, run: Run) -> float:
        if run.is_done():
            return 0.0
        return (run.kwargs["epochs"] - self.epochs_done[id(run)]) * self._epoch_time(run.contestant.name)

    def epoch(self, run: Run, rec: dict[str, Any]) -> None:
        self.epochs_done[id(run)] = rec["epoch"]
        self.epoch_times.setdefault(run.contestant.name, []).append(rec.get("epoch_time", math.nan))
        left = [r for r in self.runs if not r.finished]
        study_eta = sum(self.remaining(r) for r in left) / max(1, min(self.jobs, len(left)))
        self.say(run, f"epoch {rec['epoch']}/{run.kwargs['epochs']}  train loss {rec['train_loss']:.3f}  "
                      f"test top-1 {rec['top1']:.2f}%  {rec.get('images_per_s', 0):.0f} img/s  |  "
                      f"run ETA {_hms(self.remaining(run))}  study ETA {_hms(study_eta)}")

    def finish(self, run: Run, outcome: dict[str, Any]) -> None:
        run.finished = True
        if outcome["status"] == "done":
            self.say(run, f"done: test top-1 {outcome.get('final_top1') or math.nan:.2f}% in {_hms(outcome['attempt_s'])}")
        else:
            self.say(run, f"FAILED: {outcome['error']} (traceback: {run.error_file})")


# ------------------------------------------------------------------------------------------ battle
def run_battle(study: Study | None, out: str | Path, jobs: int | None = None, report: bool = True,
               device: str = "cpu", stream: TextIO | None = None) -> Path:
    """Run (or resume) the study in folder `out`; returns the report path (or `out` when `report` is off)."""
    out = Path(out)
    stream = stream or sys.stdout
    study = open_study(out, study)
    runs = plan(study, out)
    check_compatible(runs)
    check_data(study)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STUDY_FILE, json.dumps(study.to_dict(), indent=1) + "\n")
    print(f"battle {study.name}: {len(study.contestants)} contestants x {len(study.seeds)} seeds -> {out}", file=stream, flush=True)
    costs = measure_costs(study, out, device)
    ledger = Ledger(out / LEDGER_FILE)
    pending = [r for r in runs if not r.is_done()]
    jobs = jobs or study.jobs
    progress = Progress(runs, costs, stream, jobs)
    for r in runs:
        r.finished = r not in pending
    print(f"{len(runs) - len(pending)} runs finished earlier, {len(pending)} to run", file=stream, flush=True)
    broken = [r for r in pending if "error" in costs.get(r.contestant.name, {})]
    for r in broken:
        outcome = _outcome(r, None, f"model does not run: {costs[r.contestant.name]['error']}", time.time())
        atomic_write_text(r.error_file, outcome["error"] + "\n")
        ledger.append(outcome)
        progress.finish(r, outcome)
    pending = [r for r in pending if r not in broken]
    try:
        if jobs <= 1:
            _run_serial(pending, progress, ledger, stream)
        else:
            _run_parallel(pending, progress, ledger, jobs, study.imports)
    except KeyboardInterrupt:
        print(f"battle interrupted: finished runs are kept and the current one saved its checkpoint; "
              f"resume with: spach battle --output {out}", file=stream, flush=True)
        raise
    print(f"battle {study.name}: finished in {_hms(time.time() - progress.started)}", file=stream, flush=True)
    if not report:
        return out
    from spach.report import write_report

    return write_report(out)


def _run_serial(runs: list[Run], progress: Progress, ledger: Ledger, stream: TextIO) -> None:
    bar = "bar" if sys.stderr.isatty() else "lines"  # the engine's within-epoch bar on a terminal, else its log lines
    for run in runs:
        progress.say(run, f"training ({'resuming' if progress.epochs_done[id(run)] else 'starting'}, "
                          f"{run.kwargs['epochs']} epochs)")
        outcome = execute(run, lambda rec, run=run: progress.epoch(run, rec), progress=bar)
        ledger.append(outcome)
        progress.finish(run, outcome)


def _run_parallel(runs: list[Run], progress: Progress, ledger: Ledger, jobs: int, imports: list[str]) -> None:
    """`jobs` runs at a time in spawned processes sharing the cores; progress is read from their metrics files."""
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads, imports)) as pool:
        futures: dict[Future, Run] = {pool.submit(execute, r): r for r in runs}
        announced: set[int] = set()
        try:
            while futures:
                for fut, run in list(futures.items()):
                    # running() is also true for the few calls queued ahead for the workers: announce
                    # (in submission order, as they start) no more runs than there are workers
                    if fut.running() and id(run) not in announced and len(announced & set(map(id, futures.values()))) < jobs:
                        announced.add(id(run))
                        progress.say(run, "training")
                    recs = read_jsonl(run.folder / "metrics.jsonl")
                    for rec in recs[progress.epochs_done[id(run)]:]:
                        progress.epoch(run, rec)
                    if fut.done():
                        outcome = fut.result()
                        ledger.append(outcome)
                        progress.finish(run, outcome)
                        del futures[fut]
                time.sleep(0.5)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ----------------------------------------------------------------------------------------- dry run
# Training throughput per MAC when no GPU is here to measure: DeiT-B (17.6 GMACs) trains 300 epochs of
# ImageNet in 53 h on 8 V100s (DeiT paper), i.e. ~26 TFLOP/s per GPU at 6 FLOPs (2 x fwd+bwd) per MAC.
V100_TRAIN_FLOPS = 26e12


def print_plan(study: Study, stream: TextIO | None = None) -> float:
    """Print the runs and an estimate of their GPU hours; returns the total hours."""
    import torch

    from spach.engine import TrainConfig

    stream = stream or sys.stdout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = measure_costs(study, None, device, timed=device == "cuda")
    name = study.data.get("dataset", "imagefolder")
    from spach.data import canonical_dataset

    n_train, n_val = DATASETS[canonical_dataset(name)][3:]
    n_train = study.data.get("train_subset") or n_train
    n_val = study.data.get("val_subset") or n_val
    cfg = TrainConfig(**study.train_kwargs(study.contestants[0], 0, ""))
    print(f"{study.name}: {len(study.contestants)} contestants x {len(study.seeds)} seeds = "
          f"{len(study.contestants) * len(study.seeds)} runs of {cfg.epochs} epochs on {name} "
          f"({n_train} training, {n_val} validation images)", file=stream)
    measured = device == "cuda"
    basis = (f"inference throughput measured on {torch.cuda.get_device_name()} (batch 64, fp32), training at 1/3 of it"
             if measured else f"no GPU here to measure: GPU hours from MACs at {V100_TRAIN_FLOPS / 1e12:.0f} TFLOP/s "
             "of training per V100 (the rate of DeiT-B: 300 epochs of ImageNet in 53 h on 8 V100s)")
    print(f"estimate: {basis}", file=stream)
    print(f"{'contestant':<28} {'params':>8} {'GMACs':>7} {'img/s':>9} {'GPU h/run':>10}", file=stream)
    total = 0.0
    for c in study.contestants:
        k = costs[c.name]
        if "error" in k:
            print(f"{c.name:<28} cannot run: {k['error']}", file=stream)
            continue
        if measured:
            secs = cfg.epochs * (3 * n_train + n_val) / k["throughput"]
        else:
            secs = cfg.epochs * (n_train * 6 + n_val * 2) * k["macs"] / V100_TRAIN_FLOPS
        hours = secs / 3600
        total += hours * len(study.seeds)
        rate = f"{k['throughput']:.0f}" if math.isfinite(k["throughput"]) else "-"
        print(f"{c.name:<28} {k['params'] / 1e6:>7.2f}M {k['macs'] / 1e9:>7.3f} {rate:>9} {hours:>10.2f}", file=stream)
    print(f"total: {total:.0f} GPU hours ({total / 8:.0f} h on 8 GPUs) for {len(study.seeds)} seed(s)", file=stream)
    return total


# ----------------------------------------------------------------------------------------- command
def battle_command(study_file: str | None = None, preset: str | None = None, output: str | None = None,
                   jobs: int | None = None, data: str | None = None, dry_run: bool = False, report: bool = True,
                   list_presets: bool = False, stream: TextIO | None = None) -> Path | None:
    """`spach battle`: pick the study (file, preset, the one already in --output, or the default), run it."""
    from spach.study import list_presets as presets, load_study, preset_text

    stream = stream or sys.stdout
    if list_presets:
        for name in presets():
            first = next((ln for ln in preset_text(name).splitlines() if ln.startswith("description")), "")
            print(f"{name:<16} {first.split('=', 1)[-1].strip().strip(chr(34))}", file=stream)
        return None
    if jobs is not None and jobs < 1:
        raise SpachError(f"--jobs must be >= 1, got {jobs}")
    resuming = study_file is None and preset is None and output is not None and (Path(output) / STUDY_FILE).is_file()
    study = None if resuming else load_study(study_file, preset)
    if study is not None and data:
        study.data["data_path"] = data
    if dry_run:
        dry_run_study = study or open_study(Path(output), None)
        print_plan(dry_run_study, stream)
        return None
    out = Path(output or Path("battles") / study.name)
    result = run_battle(study, out, jobs=jobs, report=report, stream=stream)
    if report:
        print(f"report: {result} (and {result.with_suffix('.md')})", file=stream, flush=True)
    return result

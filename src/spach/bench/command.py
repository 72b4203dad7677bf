"""`spach bench` over many models: `run` (one setting), `sweep` (batch and image size; with the command's
`--sweep` also the price of every spatial mixer, `spach.bench.mixers`), the table, JSON/CSV output and
the command itself.

    records = spach.bench.run(["spach_ms_s_patch4_224_conv"], dtype="bf16", mode="both")
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Iterable

import torch

from spach.bench.measure import BenchRecord, BenchSettings, bench_model, matmul_peak
from spach.bench.mixers import format_mixer_table, mixer_sweep
from spach.bench.optimize import tune_cpu_allocator
from spach.device import parse_device
from spach.errors import SpachError
from spach.files import atomic_write_text, check_writable
from spach.models.mixers import canonical_mixer
from spach.models.zoo import create_model, list_models
from spach.terminal import track


def run(models: Iterable[str], settings: BenchSettings | None = None, progress: bool = True,
        **options: Any) -> list[dict[str, Any]]:
    """Benchmark each model in one setting (a `BenchSettings`, or its fields as keywords); returns one
    record (dict) per model. The matmul peak is measured before and after the models and the higher
    value is used for every record."""
    st = settings or BenchSettings(**options)
    models = list(models)
    _check_models(models)
    dev = parse_device(st.device)
    if dev.type == "cpu":
        tune_cpu_allocator()  # training and the peak measurement get the same allocator as inference
    peak = matmul_peak(dev, st.dtype, st.quick)
    records = [bench_model(name, st, peak)
               for name in track(models, "spach bench", mode="auto" if progress else "none", name=str)]
    peak = max(peak, matmul_peak(dev, st.dtype, st.quick))
    return [_with_peak(r, peak).as_dict() for r in records]


def sweep(
    models: Iterable[str],
    batch_sizes: Iterable[int] = (1, 8, 32),
    img_sizes: Iterable[int] = (128, 224, 320),
    img_size: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    quick: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Inference throughput against batch size (at `img_size`, default the model's) and against image
    size; each record has `extra["sweep"]` = 'batch' or 'img'. The image-size sweep runs at the
    largest of `batch_sizes` that is <= 8, so that large images stay affordable on a CPU (as does
    `spach bench --sweep`'s mixer sweep, `spach.bench.mixers`)."""
    models, batch_sizes, img_sizes = list(models), list(batch_sizes), list(img_sizes)
    _check_models(models)
    dev = parse_device(device)
    peak = matmul_peak(dev, dtype, quick=True)
    img_batch = _img_batch(batch_sizes)
    jobs = [(m, "batch", b, img_size) for m in models for b in batch_sizes]
    jobs += [(m, "img", img_batch, s) for m in models for s in img_sizes]
    records = []
    for name, kind, b, s in track(jobs, "spach bench sweep", mode="auto" if progress else "none",
                                  name=lambda job: f"{job[0]}, {job[1]} sweep, batch {job[2]}, {job[3] or 'own'} px"):
        rec = bench_model(name, BenchSettings(str(dev), dtype, batch_size=b, img_size=s, quick=True, latency=False), peak)
        rec.extra["sweep"] = kind
        records.append(rec.as_dict())
    return records


def _img_batch(batch_sizes: list[int]) -> int:
    return max([b for b in batch_sizes if b <= 8] or [min(batch_sizes)])


def _with_peak(rec: BenchRecord, peak: float) -> BenchRecord:
    rec.matmul_peak_gflops = round(peak, 1)
    if rec.infer_gflops is not None:
        rec.infer_peak_frac = rec.infer_gflops / peak
    if rec.train_gflops is not None:
        rec.train_peak_frac = rec.train_gflops / peak
    return rec


def _check_models(models: list[str]) -> None:
    if not models:
        raise SpachError("no model to benchmark; name one or more, e.g. spach_ms_s_patch4_224_conv (see `spach models`)")
    known = set(list_models())
    for m in models:
        if m not in known:
            create_model(m)  # raises the zoo's error with close-name suggestions


# --- output ------------------------------------------------------------------------------------
def _spread(central: float | None, low: float | None, high: float | None, fmt: str = "{:.1f}") -> str:
    if central is None:
        return "-"
    return f"{fmt.format(central)} [{fmt.format(low)}-{fmt.format(high)}]"


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.0f}%"


def format_table(records: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per record, median [min-max] for the timings."""
    head = ["model", "params M", "GMACs", "infer img/s", "GFLOP/s", "%peak", "lat ms (b=1)",
            "train img/s", "%peak", "mem MB inf/train"]
    rows = []
    for r in records:
        mem = "/".join("-" if v is None else f"{v:.0f}" for v in (r["infer_mem_mb"], r["train_mem_mb"]))
        rows.append([
            r["model"], f"{r['params'] / 1e6:.1f}", f"{r['macs'] / 1e9:.2f}",
            _spread(r["infer_img_s"], r["infer_img_s_low"], r["infer_img_s_high"]),
            "-" if r["infer_gflops"] is None else f"{r['infer_gflops']:.0f}", _pct(r["infer_peak_frac"]),
            _spread(r["latency_ms"], r["latency_ms_low"], r["latency_ms_high"], "{:.0f}"),
            _spread(r["train_img_s"], r["train_img_s_low"], r["train_img_s_high"], "{:.2f}"), _pct(r["train_peak_frac"]),
            mem,
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    if records:
        r = records[0]
        weights = " (weights in " + r["dtype"] + ")" if r["extra"].get("precision") == "weights" else ""
        lines.insert(0, f"{r['device_name']} | {r['dtype']}{weights}{' compiled' if r['compiled'] else ' eager'}"
                        f"{' channels-last' if r['channels_last'] else ''} | batch {r['batch_size']}, {r['img_size']}px"
                        f" | matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def write_json(records: list[dict[str, Any]], path: str, sweep_records: list[dict[str, Any]] | None = None) -> None:
    atomic_write_text(path, json.dumps({"records": records, "sweep": sweep_records or []}, indent=1))


def write_csv(records: list[dict[str, Any]], path: str) -> None:
    if not records:
        raise SpachError(f"nothing to write to {path}: no benchmark records")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "extra": json.dumps(r["extra"])})
    atomic_write_text(path, text.getvalue())


def busy_warning() -> str | None:
    """A warning when other work loads this machine's CPUs (the 1-minute load average from a quarter of
    the cores, at least 1): CPU timings then vary several-fold from run to run."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < max(1.0, cores / 4):
        return None
    return (f"load average {load:.1f} on {cores} core(s): other processes share the CPU, so times measured now "
            "can be several times off; measure on an idle machine")


def command(
    models: list[str],
    settings: BenchSettings,
    json_path: str | None = None,
    csv_path: str | None = None,
    plot_dir: str | None = None,
    with_sweep: bool = False,
    sweep_batch_sizes: Iterable[int] | None = None,
    sweep_img_sizes: Iterable[int] | None = None,
    threads: int | None = None,
    sweep_mixers: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """`spach bench`: run, print the table, write JSON/CSV/plots; returns the records."""
    for path, flag, kind in ((json_path, "--json", "file"), (csv_path, "--csv", "file"), (plot_dir, "--plots", "folder")):
        if path:  # before the measurements, which may take minutes
            check_writable(path, flag, kind)
    if threads is not None:
        if threads < 1:
            raise SpachError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    for mixer in sweep_mixers or ():  # bad input fails before any measurement
        canonical_mixer(mixer)
    records = run(models, settings)
    print(format_table(records))
    busy = busy_warning() if parse_device(settings.device).type == "cpu" else None
    if busy:  # after the measurement (bad input is one line): the load it ran under
        print(f"spach bench: warning: {busy}", file=sys.stderr)
    sweep_records = []
    if with_sweep:
        quick = settings.quick
        batch_sizes = list(sweep_batch_sizes or ((1, 8) if quick else (1, 8, 32)))
        sweep_records = sweep(
            models, batch_sizes, sweep_img_sizes or ((128, 224) if quick else (128, 224, 320)), settings.img_size,
            settings.device, settings.dtype, quick,
        )
        mixers = mixer_sweep(models, BenchSettings(settings.device, settings.dtype, batch_size=_img_batch(batch_sizes),
                                                   img_size=settings.img_size, mode=settings.mode, quick=True, latency=False),
                             mixers=sweep_mixers)
        if mixers:
            print(format_mixer_table(mixers))
        sweep_records += mixers
    if json_path:
        write_json(records, json_path, sweep_records)
    if csv_path:
        write_csv(records + sweep_records, csv_path)
    if plot_dir:
        from spach.bench.plots import write_plots  # matplotlib: only when plots are asked for
        for path in write_plots(records, plot_dir, sweep_records):
            print(f"wrote {path}")
    return records

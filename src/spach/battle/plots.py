"""The report's figures (matplotlib, Agg backend, PNG): cost/accuracy Pareto fronts, test accuracy vs
training loss per family (the paper's over-fitting / complementarity figure), learning curves, and
paired contestants (single vs multi-stage, with vs without CPE)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from spach.battle.findings import Finding  # noqa: E402
from spach.battle.results import ContestantResult  # noqa: E402
from spach.bench.plots import color, spread_labels  # noqa: E402
from spach.files import atomic_write_bytes, make_dirs  # noqa: E402


def _style(e: ContestantResult) -> dict:
    return dict(color=color(e.family), marker="o" if e.layout == "multi" else "s",
                linestyle="-" if e.cpe else "--")


def _save(fig: plt.Figure, path: Path) -> Path:
    """The figure as a PNG, written atomically (a read-only or full disk is a one-line SpachError)."""
    try:
        fig.tight_layout()
        spread_labels(fig)
        png = io.BytesIO()
        fig.savefig(png, dpi=110, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_note(ax: plt.Axes) -> None:
    ax.text(0.99, 0.01, "circle: multi-stage, square: single-stage; dashed: no CPE", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="0.4")


def pareto_front(points: list[tuple[float, float]], higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (x) and accuracy (y), sorted by x."""
    sign = -1 if higher_x_better else 1
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _log_x(ax: Any) -> None:
    """A log x axis labelled in plain numbers (4, 6, 10; not 4x10^0): the contestants span less than a decade."""
    ax.set_xscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)


def accuracy_vs_cost(entries: list[ContestantResult], path: Path, cost: str) -> Path:
    """Top-1 (mean ± std over seeds) against MACs or throughput, the Pareto front dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = [(e, (e.macs / 1e6 if cost == "macs" else e.throughput), e.mean("final_top1")) for e in entries]
    pts = [(e, x, y) for e, x, y in pts if x and math.isfinite(x) and math.isfinite(y)]
    if not pts:
        _empty(ax, "no finished runs with a measured cost")
        return _save(fig, path)
    for e, x, y in pts:
        st = _style(e)
        ax.errorbar(x, y, yerr=e.std("final_top1") if len(e.done) > 1 else None, color=st["color"], marker=st["marker"],
                    mfc="none" if not e.cpe else st["color"], capsize=3, ms=7)
        ax.annotate(e.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front([(x, y) for _, x, y in pts], higher_x_better=cost != "macs")
    ax.plot([pts[i][1] for i in front], [pts[i][2] for i in front], ":", color="0.3", zorder=0)
    ax.scatter([pts[i][1] for i in front], [pts[i][2] for i in front], s=260, facecolors="none", edgecolors="0.3",
               linestyle=":", label="Pareto front")
    _log_x(ax)
    ax.set_xlabel("MMACs per image (log)" if cost == "macs" else "inference images/s on this machine (log)")
    ax.set_ylabel("test top-1 % (mean ± std over seeds)")
    ax.set_title("Accuracy vs " + ("compute" if cost == "macs" else "measured throughput"))
    for fam in dict.fromkeys(e.family for e, _, _ in pts):
        ax.plot([], [], "o", color=color(fam), label=fam)
    ax.legend(fontsize=8, loc="best")
    _legend_note(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _mean_curve(e: ContestantResult, key_x: str, key_y: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch means over the finished seeds (up to the shortest run), at the epochs where both values
    were recorded (an epoch the recipe did not score has no test top-1). `fit`: the training loss as the
    findings read it (`RunResult.curve`)."""
    runs = [r for r in e.done if r.epochs] or [r for r in e.runs if r.epochs]
    if not runs:
        return np.array([]), np.array([])
    n = min(len(r.epochs) for r in runs)

    def value(r: Any, rec: dict, key: str) -> float:
        if key == "fit":
            key = "train_eval_loss" if any("train_eval_loss" in x for x in r.epochs) else "train_loss"
            if "top1" not in rec:
                return math.nan
        v = rec.get(key, math.nan)
        return float(v) if isinstance(v, (int, float)) else math.nan

    def col(key: str) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.array([np.mean([value(r, r.epochs[i], key) for r in runs]) for i in range(n)])

    x, y = col(key_x), col(key_y)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def accuracy_vs_loss(entries: list[ContestantResult], path: Path) -> Path:
    """Test top-1 against training loss along training, one panel per family and one with all."""
    fams = list(dict.fromkeys(e.family for e in entries if e.runs and any(r.epochs for r in e.runs)))
    fig, axes = plt.subplots(1, len(fams) + 1, figsize=(3.4 * (len(fams) + 1), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    if not fams:
        _empty(axes[0], "no epochs recorded yet")
        return _save(fig, path)
    for e in entries:
        x, y = _mean_curve(e, "fit", "top1")
        if not len(x):
            continue
        st = _style(e)
        for ax in (axes[0], axes[1 + fams.index(e.family)]):
            ax.plot(x, y, linestyle=st["linestyle"], marker=st["marker"], color=st["color"], ms=4,
                    label=e.name if ax is not axes[0] else None)
    axes[0].set_title("all families")
    for fam, ax in zip(fams, axes[1:]):
        ax.set_title(fam)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.set_xlabel("training loss (lower: further trained)")
    axes[0].set_ylabel("test top-1 %")
    for fam in fams:
        axes[0].plot([], [], color=color(fam), label=fam)
    axes[0].legend(fontsize=7)
    fig.suptitle("Test accuracy vs training loss over training (higher at equal loss: generalises better)", fontsize=10)
    return _save(fig, path)


def learning_curves(entries: list[ContestantResult], path: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    any_curve = False
    for e in entries:
        ep, top1 = _mean_curve(e, "epoch", "top1")
        ep_loss, loss = _mean_curve(e, "epoch", "train_loss")
        if not len(ep_loss):
            continue
        any_curve = True
        st = _style(e)
        a1.plot(ep, top1, linestyle=st["linestyle"], marker=st["marker"], color=st["color"], ms=4, label=e.name)
        a2.plot(ep_loss, loss, linestyle=st["linestyle"], marker=st["marker"], color=st["color"], ms=4, label=e.name)
    if not any_curve:
        _empty(a1, "no epochs recorded yet")
        return _save(fig, path)
    a1.set_ylabel("test top-1 %")
    a2.set_ylabel("training loss (with the recipe's regularisation)")
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    a2.legend(fontsize=7, ncol=2)
    fig.suptitle("Learning curves (mean over seeds)", fontsize=10)
    return _save(fig, path)


def pairs(entries: list[ContestantResult], findings: list[Finding], path: Path) -> Path:
    """The contestant pairs of findings 1 (multi vs single-stage) and 2 (CPE vs none): top-1 bars with
    the seeds as dots."""
    by_name = {e.name: e for e in entries}
    groups = [(c.a, c.b, f.number) for f in findings if f.number in (1, 2) for c in f.comparisons]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(groups) + 1), 3.8))
    if not groups:
        _empty(ax, "no single/multi-stage or CPE pair in this study")
        return _save(fig, path)
    names, xs = [], []
    for g, (a, b, num) in enumerate(groups):
        for k, name in enumerate((a, b)):
            e = by_name[name]
            x = g * 3 + k
            vals = e.values("final_top1")
            ax.bar(x, np.mean(vals) if vals else 0, color=color(e.family), alpha=0.85 if k == 0 else 0.45,
                   edgecolor="black", hatch="" if e.cpe else "//")
            ax.plot([x] * len(vals), vals, "k.", ms=5)
            names.append(name)
            xs.append(x)
    vals = [v for e in entries for v in e.values("final_top1") if e.name in names]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0, lo - max(2, (hi - lo) * 0.5)), min(100, hi + max(1, (hi - lo) * 0.3)))
    ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 % (bar: mean, dots: seeds)")
    ax.set_title("Paired contestants: multi vs single-stage, CPE vs none (hatched)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def accuracy_vs_params(entries: list[ContestantResult], path: Path) -> Path:
    """Test top-1 (mean over seeds) against parameters, one line per family through its sizes: where the
    lines cross is where the best family changes as models grow."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for fam in dict.fromkeys(e.family for e in entries):
        pts = sorted((e.params, e.mean("final_top1"), e.std("final_top1")) for e in entries
                     if e.family == fam and e.params and e.cpe and not e.shared and math.isfinite(e.mean("final_top1")))
        if not pts:
            continue
        drawn = True
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(v) else v for v in es], marker="o", color=color(fam), capsize=3, label=fam)
    if not drawn:
        _empty(ax, "no finished runs")
        return _save(fig, path)
    _log_x(ax)
    ax.set_xlabel("parameters (log)")
    ax.set_ylabel("test top-1 % (mean ± std over seeds)")
    ax.set_title("Accuracy vs size per family")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


ALL_FIGURES = ("accuracy_vs_macs", "accuracy_vs_throughput", "accuracy_vs_params", "accuracy_vs_training_loss",
               "learning_curves", "pairs")


def make_all(entries: list[ContestantResult], findings: list[Finding], folder: Path) -> dict[str, Path]:
    """Every figure, in `folder`; returns {name: path} in reading order. Cost and size plots show the
    main arm (the other arms train under another regime); the accuracy-vs-loss figure shows the arm that
    judges generalisation or over-fitting (finding 4, the curves it compares, else 3) when there is one."""
    make_dirs(folder)
    main = [e for e in entries if e.arm == "main"] or entries
    fit_arm = next((f.arm for n in (4, 3) for f in findings if f.number == n and f.comparisons), "main")
    fit = [e for e in entries if e.arm == fit_arm] or entries
    figures = {
        "accuracy_vs_macs": accuracy_vs_cost(main, folder / "accuracy_vs_macs.png", "macs"),
        "accuracy_vs_throughput": accuracy_vs_cost(main, folder / "accuracy_vs_throughput.png", "throughput"),
        "accuracy_vs_params": accuracy_vs_params(main, folder / "accuracy_vs_params.png"),
    }
    if any(sum("top1" in rec for rec in r.epochs) > 1 for e in fit for r in e.runs):  # curves were scored
        figures["accuracy_vs_training_loss"] = accuracy_vs_loss(fit, folder / "accuracy_vs_training_loss.png")
    figures["learning_curves"] = learning_curves(main, folder / "learning_curves.png")
    if any(f.number in (1, 2) and f.comparisons for f in findings):
        figures["pairs"] = pairs(entries, findings, folder / "pairs.png")
    for stale in set(ALL_FIGURES) - set(figures):  # a figure this study does not draw: none left from before
        (folder / f"{stale}.png").unlink(missing_ok=True)
    return figures

"""PNG plots of `spach bench` records: cost against throughput, accuracy against cost, cost growth."""
from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

FAMILY_COLORS = {"conv": "tab:blue", "attn": "tab:orange", "mlp": "tab:green", "hybrid": "tab:red", "outside": "tab:gray"}
_EXTRA = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def color(family: str) -> str:
    """One colour per family, in every plot spach draws (a custom mixer gets a stable extra one)."""
    return FAMILY_COLORS.get(family, _EXTRA[sum(map(ord, family)) % len(_EXTRA)])


def spread_labels(fig: plt.Figure) -> None:
    """Move each point label that would cover another label up or down, a line at a time; call it once the
    layout is final (matplotlib puts each label where it is told, so close points get unreadable ones)."""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if isinstance(t, Annotation) and t.anncoords == "offset points"]
        placed: list[Any] = []
        for label in sorted(labels, key=lambda a: tuple(ax.transData.transform(a.xy))[::-1]):
            dx, dy = label.xyann
            line = label.get_fontsize() + 1.5
            for k in (0, 1, -1, 2, -2, 3, -3, 4, -4):
                label.xyann = (dx, dy + k * line)
                box = label.get_window_extent(renderer)
                if not any(box.overlaps(b) for b in placed):
                    break
            else:  # crowded all around: leave it where it was asked to be
                label.xyann = (dx, dy)
                box = label.get_window_extent(renderer)
            placed.append(box)


def _scatter(ax, records: list[dict[str, Any]], x_key: str, y_key: str, x_scale: float = 1.0) -> None:
    for r in records:
        if r.get(x_key) is None or r.get(y_key) is None:
            continue
        x = r[x_key] / x_scale
        ax.scatter(x, r[y_key], color=color(r["family"]), label=r["family"])
        ax.annotate(r["model"].removeprefix("spach_").replace("_patch4_224", "").replace("_patch16_224", ""),
                    (x, r[y_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.grid(alpha=0.3)


def _setting(r: dict[str, Any]) -> str:
    mode = "compiled" if r["compiled"] else "eager"
    return f"{r['device_name']}, {r['dtype']} {mode}, batch {r['batch_size']}"


def write_plots(records: list[dict[str, Any]], out_dir: str, sweep_records: list[dict[str, Any]] | None = None) -> list[str]:
    """Write the plots that the records allow into `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        spread_labels(fig)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    timed = [r for r in records if r.get("infer_img_s") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 5))
        _scatter(ax, timed, "macs", "infer_img_s", 1e9)
        ax.set(xlabel="GMACs per image", ylabel="inference images/s", title=f"Throughput vs MACs\n{_setting(timed[0])}")
        save(fig, "throughput_vs_macs.png")
    ranked = [r for r in records if r.get("top1") is not None]
    if ranked:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        _scatter(axes[0], ranked, "macs", "top1", 1e9)
        axes[0].set(xlabel="GMACs per image", ylabel="official ImageNet top-1 (%)", title="Top-1 vs MACs")
        _scatter(axes[1], [r for r in ranked if r.get("infer_img_s")], "infer_img_s", "top1")
        axes[1].set(xlabel="measured inference images/s", ylabel="official ImageNet top-1 (%)",
                    title=f"Top-1 vs throughput\n{_setting(ranked[0])}")
        save(fig, "top1_vs_cost.png")
    for kind, key, label in (("batch", "batch_size", "batch size"), ("img", "img_size", "image size (px)")):
        rows = [r for r in sweep_records or [] if r["extra"].get("sweep") == kind]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r[key], r["infer_img_s"]) for r in rows if r["model"] == model)
            family = next(r["family"] for r in rows if r["model"] == model)
            ax.plot(*zip(*pts), marker="o", color=color(family), label=model.removeprefix("spach_"))
        ax.set(xlabel=label, ylabel="inference images/s", title=f"Throughput vs {label}\n{_setting(rows[0])}")
        if kind == "img":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, f"throughput_vs_{kind}.png")
    mixers = [r for r in sweep_records or [] if r["extra"].get("sweep") == "mixer" and r.get("infer_img_s")]
    for model in dict.fromkeys(r["model"] for r in mixers):
        rows = [{**r, "model": r["extra"]["mixer"]} for r in mixers if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 5))
        _scatter(ax, rows, "macs", "infer_img_s", 1e9)
        ax.set(xlabel="GMACs per image", ylabel="inference images/s",
               title=f"Each spatial mixer in {model}'s layout and width\n{_setting(rows[0])}")
        save(fig, f"throughput_vs_mixer_{model}.png" if len(set(r["model"] for r in mixers)) > 1 else "throughput_vs_mixer.png")
    return paths

"""The battle report: `report.md` and a self-contained `report.html` (figures embedded as base64 PNG)
in the study folder, rebuilt from the folder's files at any time (`spach report DIR`).

Both formats render one list of blocks (headings, paragraphs, tables, figures), so they always agree.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from spach.battle.findings import Comparison, Finding, judge
from spach.battle.plan import data_shape
from spach.battle.plots import make_all
from spach.battle.results import ContestantResult, load_results, load_study_folder
from spach.battle.study import Study
from spach.files import atomic_write_text
from spach.humanize import count, hms
from spach.train.datasets import DATASETS, canonical_dataset

# What the paper trained: 300 epochs of ImageNet-1k (1.28M images) at 224x224, models of 4-63M params.
PAPER_IMAGES = 300 * 1_281_167
PAPER_PIXELS = 224 * 224
REFERENCE_TOP1 = {  # typical test top-1 (%) on these sets, to judge whether a result is sane
    "fashion-mnist": "logistic regression ~84%, a 2-layer MLP ~88%, a small CNN trained to convergence ~91-93%, "
                     "the best published models ~96%",
    "cifar10": "a small CNN ~80%, ResNet-18 trained to convergence ~95%",
}
VERDICT_MARK = {"supported": "supported", "contradicted": "CONTRADICTED", "inconclusive": "inconclusive",
                "untested": "not testable here"}

Block = tuple[str, Any]  # (kind, payload): h1/h2/h3/p: text; table: (headers, rows); img: (name, path)


# ------------------------------------------------------------------------------------------- numbers
def _f(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "-" if not math.isfinite(p) else ("<0.001" if p < 1e-3 else f"{p:.3f}")


def evidence(c: Comparison) -> str:
    """One comparison in a line: means, difference with its 95% interval, p-value."""
    if not c.a_values or not c.b_values:
        return f"{c.claim}: no values ({c.note or 'no finished runs'})"
    line = (f"{c.a} {_f(c.mean_a)} vs {c.b} {_f(c.mean_b)}: {_f(c.diff, signed=True)} "
            f"[{_f(c.ci[0], signed=True)}, {_f(c.ci[1], signed=True)}], p {_p(c.p)}")
    return line + (f" ({c.note})" if c.note else "")


# -------------------------------------------------------------------------------------------- blocks
def _study_facts(study: Study, entries: list[ContestantResult], elapsed: float) -> list[Block]:
    cfg = study.config()
    runs = [r for e in entries for r in e.runs]
    done = sum(r.status == "done" for r in runs)
    failed = sum(r.status == "failed" for r in runs)
    data = cfg.dataset + (f" ({cfg.train_subset} training images)" if cfg.train_subset else "")
    head = (f"{len(entries)} contestants x {len(study.seeds)} seeds ({', '.join(map(str, study.seeds))}) on {data}, "
            f"{cfg.epochs} epochs each; {done} of {len(runs)} runs finished"
            + (f", {failed} failed" if failed else "") + f". Training time {hms(elapsed)} in all.")
    machine = (f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
               + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only")
               + f"; report built {time.strftime('%Y-%m-%d %H:%M')}.")
    return [("p", study.description), ("p", head), ("p", machine)] if study.description else [("p", head), ("p", machine)]


def _scale_note(study: Study, entries: list[ContestantResult]) -> list[Block]:
    cfg = study.config()
    name = canonical_dataset(cfg.dataset)
    size = data_shape(study)[2] or 224
    n_train = cfg.train_subset or DATASETS[name][3]
    seen = cfg.epochs * n_train
    params = [e.params for e in entries if e.params]
    blocks: list[Block] = [("h2", "How far this is from the paper")]
    if study.notes:
        blocks.append(("p", study.notes))
    if name != "imagefolder":
        blocks.append(("p", f"Each run here sees {seen:,} training images ({cfg.epochs} epochs x {n_train:,}) at "
                            f"{size}x{size}; the paper's runs see {PAPER_IMAGES:,} ImageNet images (300 epochs x 1.28M) at "
                            f"224x224: {PAPER_IMAGES / seen:,.0f}x more images, each with {PAPER_PIXELS / size ** 2:.0f}x "
                            f"more pixels, on models of 4-63M parameters"
                            + (f" (here: {count(min(params))}-{count(max(params))})" if params else "") + ". "
                            "Results at this scale say how the families behave early in training on small images; "
                            "they do not reproduce the paper's numbers."))
    best = max((e.mean("final_top1") for e in entries if e.done), default=math.nan)
    if name in REFERENCE_TOP1 and math.isfinite(best):
        blocks.append(("p", f"Sanity check: the best contestant reaches {best:.1f}% test top-1; for reference on "
                            f"{name}: {REFERENCE_TOP1[name]}."))
    return blocks


def _findings_blocks(findings: list[Finding]) -> list[Block]:
    rows = [[str(f.number), f.title, VERDICT_MARK[f.verdict],
             "; ".join(evidence(c) for c in f.comparisons) if f.comparisons else f.summary] for f in findings]
    blocks: list[Block] = [
        ("h2", "Findings"),
        ("p", "Each finding of the paper the study can test, judged on the final test top-1 (or the stated metric) "
              "over seeds: difference of means with its 95% Welch interval and the two-sided p-value of Welch's "
              "t-test. A comparison counts when p < 0.05; with 2-3 seeds per contestant only large, consistent "
              "differences can reach that, so 'inconclusive' often means 'too few seeds', not 'no effect'."),
        ("table", (["#", "finding (paper)", "verdict", "evidence: a vs b, difference [95% CI], p"], rows)),
    ]
    for f in findings:
        blocks.append(("h3", f"{f.number}. {f.title}: {VERDICT_MARK[f.verdict]}"))
        blocks.append(("p", f.summary))
        if f.comparisons:
            blocks.append(("table", (["claim", "metric", "a (seeds)", "b (seeds)", "a - b", "95% CI", "p", "verdict", "note"],
                                     [[c.claim, c.metric, ", ".join(_f(v) for v in c.a_values),
                                       ", ".join(_f(v) for v in c.b_values), _f(c.diff, signed=True),
                                       f"[{_f(c.ci[0], signed=True)}, {_f(c.ci[1], signed=True)}]", _p(c.p), c.verdict,
                                       c.note] for c in f.comparisons])))
        if f.not_tested:
            blocks.append(("p", "Not tested by this study: " + "; ".join(f.not_tested) + "."))
    return blocks


def _contestant_table(entries: list[ContestantResult]) -> Block:
    rows = []
    for e in entries:
        n = len(e.done)
        top1 = f"{_f(e.mean('final_top1'))} ± {_f(e.std('final_top1'))} (n={n})" if n else "-"
        rows.append([e.name, e.family, e.layout + ("" if e.cpe else ", no CPE") + (", shared" if e.shared else ""),
                     count(e.params) if e.params else "-", _f(e.macs / 1e6, 1) if e.macs else "-", _f(e.throughput, 0),
                     top1, _f(e.mean("best_top1")), _f(e.mean("final_train_loss"), 3), _f(e.mean("gap"), 2, signed=True),
                     hms(e.mean("wall_time_s"))])
    return ("table", (["contestant", "family", "layout", "params", "MMACs", "img/s", "top-1 % (mean ± std)",
                       "best top-1", "final train loss", "gap (pts)", "time/run"], rows))


def _failures(entries: list[ContestantResult]) -> list[Block]:
    failed = [r for e in entries for r in e.runs if r.status == "failed"]
    pending = [r for e in entries for r in e.runs if r.status in ("partial", "pending")]
    blocks: list[Block] = []
    if failed:
        blocks += [("h2", "Failed runs"), ("table", (["run", "error"], [[f"{r.contestant} seed {r.seed}", r.error or ""]
                                                                         for r in failed]))]
    if pending:
        blocks.append(("p", "Not finished yet (rerun the same battle command to resume): "
                       + ", ".join(f"{r.contestant} seed {r.seed} ({len(r.epochs)} epochs)" for r in pending) + "."))
    return blocks


FIGURE_CAPTIONS = {
    "accuracy_vs_macs": "Test top-1 vs MACs per image; the dotted line is the Pareto front (no contestant is both cheaper and better).",
    "accuracy_vs_throughput": "Test top-1 vs inference throughput measured on this machine; dotted: Pareto front.",
    "accuracy_vs_training_loss": "Test top-1 against training loss as training goes on (x axis reversed), per family: "
                                 "a curve above another at equal training loss generalises better (the paper's figure on "
                                 "over-fitting and conv/attention complementarity).",
    "learning_curves": "Test top-1 and training loss per epoch, mean over seeds.",
    "pairs": "The pairs behind findings 1 and 2: bars are means over seeds, dots single seeds.",
}


def build_blocks(study: Study, entries: list[ContestantResult], findings: list[Finding],
                 figures: dict[str, Path]) -> list[Block]:
    elapsed = sum(r.wall_time_s for e in entries for r in e.runs if r.epochs)
    blocks: list[Block] = [("h1", f"Battle report: {study.name}")]
    blocks += _study_facts(study, entries, elapsed)
    blocks += _findings_blocks(findings)
    blocks += [("h2", "Contestants"), _contestant_table(entries),
               ("p", "top-1: final-epoch test accuracy; best top-1: the best epoch (optimistic: chosen on the test set); "
                     "gap: top-1 on a training subset minus test top-1 at the end (un-augmented; larger = more over-fitting); "
                     "img/s: inference, batch 64, on this machine.")]
    blocks += _failures(entries)
    blocks += _scale_note(study, entries)
    blocks.append(("h2", "Figures"))
    for name, path in figures.items():
        blocks += [("img", (name, path)), ("p", FIGURE_CAPTIONS[name])]
    blocks.append(("p", "Regenerate this report with `spach report DIR`; resume or extend the battle with "
                        "`spach battle --output DIR`. Per-run files: runs/<contestant>/seed<k>/."))
    return blocks


# ------------------------------------------------------------------------------------------- render
def _md_text(text: str) -> str:
    """Text for Markdown: HTML in it (a study's description or names) is shown, never rendered; `code`
    spans are kept as they are."""
    parts = str(text).split("`")
    return "`".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_text(x))
        elif kind == "p":
            out.append(_md_text(x))
        elif kind == "table":
            headers, rows = x
            out.append("\n".join(["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]))
        elif kind == "img":
            name, path = x
            out.append(f"![{name}]({Path(path).relative_to(base).as_posix()})")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}
.supported{color:#1a7f37;font-weight:600}.CONTRADICTED{color:#cf222e;font-weight:600}.inconclusive{color:#9a6700}"""


def _html_text(text: str) -> str:
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_cell(text: str) -> str:
    cls = str(text).split(" ")[0] if str(text).split(" ")[0] in ("supported", "CONTRADICTED", "inconclusive") else ""
    return f'<td class="{cls}">{_html_text(text)}</td>' if cls else f"<td>{_html_text(text)}</td>"


def render_html(blocks: list[Block], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_html_text(x)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_html_text(x)}</p>")
        elif kind == "table":
            headers, rows = x
            out.append("<table><tr>" + "".join(f"<th>{_html_text(h)}</th>" for h in headers) + "</tr>"
                       + "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows) + "</table>")
        elif kind == "img":
            name, path = x
            data = base64.b64encode(Path(path).read_bytes()).decode()
            out.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    return "\n".join(out + ["</body></html>"]) + "\n"


# -------------------------------------------------------------------------------------------- entry
def write_report(study_dir: str | Path) -> Path:
    """Build the figures, `report.md` and `report.html` in `study_dir`; returns the HTML path."""
    study_dir = Path(study_dir)
    study = load_study_folder(study_dir)
    entries = load_results(study_dir, [c.name for c in study.contestants], study.seeds)
    findings = judge(entries, study.questions or None)
    figures = make_all(entries, findings, study_dir / "plots")
    blocks = build_blocks(study, entries, findings, figures)
    atomic_write_text(study_dir / "report.md", render_markdown(blocks, study_dir))
    atomic_write_text(study_dir / "report.html", render_html(blocks, f"spach battle: {study.name}"))
    atomic_write_text(study_dir / "findings.json", json.dumps([_finding_dict(f) for f in findings], indent=1) + "\n")
    return study_dir / "report.html"


def _finding_dict(f: Finding) -> dict[str, Any]:
    d = {k: getattr(f, k) for k in ("number", "key", "title", "verdict", "summary", "not_tested")}
    d["comparisons"] = [{**{k: getattr(c, k) for k in ("claim", "a", "b", "metric", "a_values", "b_values", "diff", "p", "verdict", "note")},
                         "ci": list(c.ci)} for c in f.comparisons]
    return _no_nan(d)


def _no_nan(x: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x

"""The battle report: `report.md` and a self-contained `report.html` (figures embedded as base64 PNG)
in the study folder, rebuilt from the folder's files at any time (`spach report DIR`).

Both formats render one list of blocks (headings, paragraphs, tables, figures), so they always agree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from spach.battle.afford import read_plan
from spach.battle.findings import Comparison, Finding, judge, method
from spach.battle.looks import read_looks
from spach.battle.plan import data_shape
from spach.battle.plots import make_all
from spach.battle.render import Block, render_html, render_markdown
from spach.battle.report_looks import looks_blocks, plan_blocks, read_prediction
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
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
VERDICT_MARK = {"supported": "supported", "contradicted": "CONTRADICTED", "equivalent": "equivalent", "mixed": "mixed",
                "inconclusive": "inconclusive", "untested": "not testable here", "elsewhere": "tested in another preset",
                "unafforded": "not afforded by the budget here"}



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
    n_train, _ = data_sizes(study)
    data = cfg.dataset + (f" ({n_train:,} training images)" if cfg.train_subset else "")
    seeds = f"up to {len(study.seeds)} seeds" if study.sequential else f"{len(study.seeds)} seeds"
    head = (f"{len(entries)} contestants x {seeds} ({', '.join(map(str, study.seeds))}) on {data}, "
            f"{cfg.epochs} epochs each; {done} of {len(runs)} runs {'the looks asked for ' * study.sequential}finished"
            + (f", {failed} failed" if failed else "") + f". Training time {hms(elapsed)} in all.")
    machine = (f"Machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
               + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only")
               + f"; report built {time.strftime('%Y-%m-%d %H:%M')}.")
    return [("p", study.description), ("p", head), ("p", machine)] if study.description else [("p", head), ("p", machine)]


def _scale_note(study: Study, entries: list[ContestantResult]) -> list[Block]:
    cfg = study.config()
    name = canonical_dataset(cfg.dataset)
    size = data_shape(study)[2] or 224
    n_train, _ = data_sizes(study)
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


def _findings_blocks(study: Study, findings: list[Finding]) -> list[Block]:
    asked = [f for f in findings if f.verdict not in ("elsewhere", "untested", "unafforded")]
    paper, beyond = [f for f in asked if f.number <= 5], [f for f in asked if f.number > 5]
    tally = f"{sum(f.decided for f in paper)} of the {len(paper)} findings of the paper this study tests are decided"
    if beyond and not paper:
        tally = f"{sum(f.decided for f in beyond)} of the {len(beyond)} questions beyond the paper this study asks are decided"
    elif beyond:
        tally += f", and {sum(f.decided for f in beyond)} of its {len(beyond)} further question(s)"
    rows = [[str(f.number), f.title, f.arm if f.verdict != "elsewhere" else "-", VERDICT_MARK[f.verdict] + _when(study, f),
             "; ".join(evidence(c) for c in f.comparisons) if f.comparisons else f.summary] for f in findings]
    blocks: list[Block] = [
        ("h2", "Findings"),
        ("p", method_paragraph(study, tally)),
        ("table", (["#", "finding (paper)", "arm", "verdict", "evidence: a vs b, difference [95% CI], " + _p_name(study)], rows)),
    ]
    for f in findings:
        blocks.append(("h3", f"{f.number}. {f.title}: {VERDICT_MARK[f.verdict]}"))
        blocks.append(("p", f.summary))
        if f.comparisons:
            blocks.append(("table", (["claim", "metric", "a (seeds)", "b (seeds)", "a - b", "95% CI", _p_name(study), "verdict",
                                      "could detect / would decide", "note"],
                                     [[c.claim, c.metric, _seeds(c.a_values), _seeds(c.b_values), _f(c.diff, signed=True),
                                       f"[{_f(c.ci[0], signed=True)}, {_f(c.ci[1], signed=True)}]", _p(c.p),
                                       c.verdict + (f" (look {c.decision.look})" if study.sequential and c.decision
                                                    and c.verdict != "inconclusive" else ""),
                                       _plan(c), c.note] for c in f.comparisons])))
        if f.not_tested:
            blocks.append(("p", "Not tested by this study: " + "; ".join(f.not_tested) + "."))
    return blocks


def _p_name(study: Study) -> str:
    return "p (Holm and looks)" if study.sequential else "Holm p"


def _when(study: Study, f: Finding) -> str:
    """A sequential battle's decided finding: the look that decided its last comparison."""
    if not study.sequential or not f.decided:
        return ""
    return f" (look {max(c.decision.look for c in f.comparisons if c.decision)})"


def method_paragraph(study: Study, tally: str) -> str:
    """How the verdicts were reached, with this study's seeds and test-set size (what ran, not a template)."""
    seeds = study.first_wave if study.sequential else len(study.seeds)
    _, n_test = data_sizes(study)
    return (f"{tally} (every comparison supported, contradicted or equivalent). Method: " + method(study) + f". Margin "
            f"{study.margin:g} points, alpha {study.alpha:g}, both fixed in the study file before it ran (sha256 "
            f"{study.sha256[:16] or '-'}). Why: {NUMBERS.get(seeds, str(seeds))} seed{'s' * (seeds != 1)} alone "
            f"({seeds - 1} df) cannot tell a point from noise; moderating each pair's noise toward the noise pooled over "
            "its arm's contestants gives the tests real degrees of freedom without trusting that every pair is equally "
            "noisy, the shared test set's own noise is added so that a difference that holds "
            f"only on these {n_test:,} test images is not called real, and equivalence makes 'no difference that "
            "matters' a decision rather than a shrug.")


def data_sizes(study: Study, arm: str = "main") -> tuple[int, int]:
    """(training, test) images of a run of `arm`: as the battle found them in the data, else as the study file says."""
    recorded = study.data_sizes.get(arm)
    if recorded:
        return recorded["train"], recorded["test"]
    cfg = study.config(next((c for c in study.contestants if c.arm == arm), None))
    n_train, n_test = DATASETS[canonical_dataset(cfg.dataset)][3:]
    return min(cfg.train_subset or n_train, n_train), min(cfg.val_subset or n_test, n_test)


def _seeds(values: list[float]) -> str:
    while values and math.isnan(values[-1]):  # seeds not (yet) run: a sequential battle's later seeds
        values = values[:-1]
    return ", ".join(_f(v) for v in values)


def _plan(c: Comparison) -> str:
    """For an inconclusive comparison: the difference it could have detected, and the seeds to decide it."""
    d = c.decision
    if d is None or d.verdict != "inconclusive":
        return ""
    seeds = f"{d.seeds_needed} seeds" if d.seeds_needed else d.plan or "-"
    return f"MDD {_f(d.mdd)}; {seeds}"


def _arms(study: Study) -> list[Block]:
    if not study.arms:
        return []
    rows = [["main", "the study's [data] and [recipe]", ", ".join(study.questions_of("main")) or "-"]]
    rows += [[a.name, a.description or ", ".join(f"{k} = {v}" for k, v in {**a.data, **a.recipe}.items()),
              ", ".join(a.questions) or "-"] for a in study.arms.values()]
    return [("p", "Contestants are compared only within their arm (same data, same recipe)."),
            ("table", (["arm", "regime", "findings judged on it"], rows))]


def _contestant_table(entries: list[ContestantResult]) -> Block:
    rows = []
    for e in entries:
        n = len(e.done)
        top1 = f"{_f(e.mean('final_top1'))} ± {_f(e.std('final_top1'))} (n={n})" if n else "-"
        rows.append([e.name + (f" ({e.label})" if e.label else ""), e.arm, e.family, e.layout + ("" if e.cpe else ", no CPE") + (", shared" if e.shared else ""),
                     count(e.params) if e.params else "-", _f(e.macs / 1e6, 1) if e.macs else "-", _f(e.throughput, 0),
                     top1, _f(e.mean("best_top1")), _f(e.mean("final_train_loss"), 3), _f(e.mean("fit_loss"), 3),
                     _f(e.mean("gap"), 2, signed=True), hms(e.mean("wall_time_s")), _width(e)])
    return ("table", (["contestant", "arm", "family", "layout", "params", "MMACs", "img/s", "top-1 % (mean ± std)",
                       "best top-1", "training loss while training", "clean training loss", "gap (pts)", "time/run", "width"], rows))


def _width(e: ContestantResult) -> str:
    """hidden_dim, and for a contestant matched in cost what it was matched to (study's `match`)."""
    if not e.width:
        return "-"
    by = "macs" if "macs" in e.match else "params" if "params" in e.match else ""
    if not by or "error" not in e.match:
        return str(e.width)
    unit = "MACs" if by == "macs" else "params"
    target = f"{unit} of {e.match[by]}" if isinstance(e.match[by], str) else f"{count(e.match['target'])} {unit}"
    return f"{e.width} ({target} {e.match['error']:+.1%})"


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
    "accuracy_vs_macs": "Test top-1 vs MACs per image (main arm); the dotted line is the Pareto front (no contestant is "
                        "both cheaper and better).",
    "accuracy_vs_throughput": "Test top-1 vs inference throughput measured on this machine (main arm); dotted: Pareto front.",
    "accuracy_vs_params": "Test top-1 vs parameters, one line per family through its sizes (main arm; CPE, unshared): "
                          "where the lines cross, the best family changes as models grow.",
    "accuracy_vs_training_loss": "Test top-1 against training loss as training goes on (x axis reversed), per family, on "
                                 "the arm that judges over-fitting: a curve above another at equal training loss "
                                 "generalises better (the paper's figure on over-fitting and conv/attention "
                                 "complementarity).",
    "learning_curves": "Test top-1 and training loss per epoch, mean over seeds (main arm).",
    "pairs": "The pairs behind findings 1 and 2: bars are means over seeds, dots single seeds.",
}


def build_blocks(study: Study, entries: list[ContestantResult], findings: list[Finding],
                 figures: dict[str, Path], looks: list[dict[str, Any]] | None = None,
                 history: list[dict[str, str]] | None = None, plan: Any = None,
                 prediction: dict[str, Any] | None = None) -> list[Block]:
    elapsed = sum(r.wall_time_s for e in entries for r in e.runs if r.epochs)
    if study.sequential:  # the runs the looks asked for: the others were never meant to run
        asked = {**looks[-1]["seeds"], **looks[-1].get("next", {})} if looks else {}
        entries = [dataclasses.replace(e, runs=e.runs[:asked.get(e.name, study.first_wave)]) for e in entries]
    blocks: list[Block] = [("h1", f"Battle report: {study.name}")]
    blocks += _study_facts(study, entries, elapsed)
    blocks += _arms(study)
    blocks += _findings_blocks(study, findings)
    blocks += plan_blocks(study, plan, findings, prediction)
    blocks += looks_blocks(study, looks or [], history or [], plan)
    blocks += [("h2", "Contestants"), _contestant_table(entries),
               ("p", "top-1: final-epoch test accuracy; best top-1: the best scored epoch (optimistic: chosen on the test "
                     "set); training loss while training: the last epoch's running loss over its augmented, regularised "
                     "batches; clean training loss: the model at the end, in eval mode, on the scored training subset "
                     "(the running loss when none is scored); gap: top-1 on that training subset minus test top-1 at the "
                     "end (larger = more over-fitting); img/s: evaluation on this machine, at the recipe's evaluation batch "
                     "size and one battle job's threads.")]
    blocks += _failures(entries)
    blocks += _scale_note(study, entries)
    blocks.append(("h2", "Figures"))
    for name, path in figures.items():
        blocks += [("img", (name, path)), ("p", FIGURE_CAPTIONS[name])]
    blocks.append(("p", "Regenerate this report with `spach report DIR`; resume or extend the battle with "
                        "`spach battle --output DIR`. Per-run files: `runs/<contestant>/seed<k>/` (a timm model folder of "
                        "one: `spach export DIR/runs/<contestant>/seed<k> --format timm --output FOLDER`)."))
    return blocks


# -------------------------------------------------------------------------------------------- entry
def write_report(study_dir: str | Path) -> Path:
    """Build the figures, `report.md` and `report.html` in `study_dir`; returns the HTML path."""
    study_dir = Path(study_dir)
    study = load_study_folder(study_dir)
    entries = load_results(study_dir, study)
    looks = read_looks(study_dir, entries)
    plan = read_plan(study_dir) if study.sequential else None
    history: list[dict[str, str]] = []
    findings = judge(entries, study, looks, plan, history)
    figures = make_all(entries, findings, study_dir / "plots")
    blocks = build_blocks(study, entries, findings, figures, looks, history, plan, read_prediction(study_dir))
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

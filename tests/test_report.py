"""The report on a hand-made study folder (no training): tables, findings, figures, both formats."""
import json
import re

import pytest

from spach.battle.plots import pareto_front
from spach.battle.report import render_markdown, write_report
from spach.battle.results import run_dir
from spach.battle.study import parse_study
from spach.errors import SpachError

STUDY = """
[study]
name = "fake"
seeds = [0, 1, 2]
notes = "Made by hand."

[data]
dataset = "tiny"
eval_train_subset = 32

[recipe]
epochs = 3

[[contestant]]
name = "conv-ss"
arch = { net_arch = [["conv", 2]], hidden_dim = 8, patch_size = 4 }

[[contestant]]
name = "conv-ms"
arch = { net_arch = [[["conv", 1]], [["conv", 1]]], hidden_dim = 8, patch_size = 2 }

[[contestant]]
name = "attn-ms"
arch = { net_arch = [[["conv", 1]], [["attn", 1]]], hidden_dim = 8, patch_size = 2 }

[[contestant]]
name = "attn-ms-nocpe"
arch = { net_arch = [[["conv", 1]], [["attn", 1]]], hidden_dim = 8, patch_size = 2, cpe = false }
"""
# final top-1 per seed: conv-ms clearly beats conv-ss; attn-ms vs its no-CPE twin is a coin toss
TOP1 = {"conv-ss": [80.0, 80.4, 80.2], "conv-ms": [90.0, 90.3, 90.1], "attn-ms": [85.0, 88.0, 83.0],
        "attn-ms-nocpe": [86.0, 84.0, 87.0]}
FACTS = {"conv-ss": ("conv", "single", True, "A"), "conv-ms": ("conv", "multi", True, "B"),
         "attn-ms": ("attn", "multi", True, "C"), "attn-ms-nocpe": ("attn", "multi", False, "C")}


def make_folder(tmp_path, failed=(), pending=(), study_text=STUDY):
    study = parse_study(study_text)
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps(study.to_dict()))
    costs = {n: {"params": 1000 * (i + 1), "macs": 100_000 * (i + 1), "throughput": 500.0 - 50 * i, "family": f,
                 "layout": lay, "cpe": cpe, "shared": False, "arch_key": key, "model": "spach"}
             for i, (n, (f, lay, cpe, key)) in enumerate(FACTS.items())}
    (out / "costs.json").write_text(json.dumps(costs))
    for name, finals in TOP1.items():
        for seed, final in enumerate(finals):
            folder = run_dir(out, name, seed)
            folder.mkdir(parents=True)
            if (name, seed) in failed:
                (folder.parent / f"seed{seed}.error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
                continue
            epochs = [{"epoch": e, "train_loss": 2.0 - 0.4 * e, "train_eval_loss": 1.9 - 0.4 * e, "val_loss": 1.0,
                       "top1": final - 10 + 5 * (e - 1), "train_eval_top1": final - 9 + 5 * (e - 1), "epoch_time": 2.0}
                      for e in (1, 2, 3)]
            if (name, seed) in pending:
                epochs = epochs[:1]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
            if (name, seed) not in pending:
                (folder / "summary.json").write_text(json.dumps({"final_top1": final, "best_top1": final, "epochs": 3,
                                                                 "final_train_loss": 0.8, "wall_time_s": 6.0}))
    return out


def test_report_tables_findings_and_figures(tmp_path):
    out = make_folder(tmp_path)
    html_path = write_report(out)
    md = (out / "report.md").read_text()
    assert "| conv-ms | main | conv | multi | 2.00k | 0.2 | 450 | 90.13 ± 0.15 (n=3) |" in md
    assert "| attn-ms-nocpe | main | attn | multi, no CPE |" in md
    assert "| 1 | Multi-stage layouts beat single-stage ones at equal cost | main | supported | conv-ms 90.13 vs conv-ss 80.20: +9.93" in md
    assert "| 2 | Local modeling (the CPE depthwise-conv bypass) lifts attention and MLP models | main | inconclusive |" in md
    assert "| 5 | Hybrids (conv early, attention late) beat each pure family | main | not testable here | Not testable" in md
    assert "Made by hand." in md and "How far this is from the paper" in md
    assert "1 of the 3 findings of the paper this study tests are decided" in md and "Holm's correction within each finding" in md
    assert "MDD" in md  # the inconclusive comparisons say what they could have detected
    assert "## Failed runs" not in md
    html = html_path.read_text()
    assert html.startswith("<!doctype html>") and html.count("<img") == 6 and 'class="supported"' in html
    findings = json.loads((out / "findings.json").read_text())
    assert [f["verdict"] for f in findings] == ["supported", "inconclusive", "untested", "inconclusive", "untested"]


def test_report_lists_failed_and_unfinished_runs(tmp_path):
    out = make_folder(tmp_path, failed=[("attn-ms", 2)], pending=[("conv-ss", 1)])
    write_report(out)
    md = (out / "report.md").read_text()
    assert "| attn-ms seed 2 | RuntimeError: out of memory |" in md
    assert "conv-ss seed 1 (1 epochs)" in md
    assert "| conv-ss | main | conv | single | 1.00k | 0.1 | 500 | 80.10 ± 0.14 (n=2) |" in md


def test_report_needs_a_battle_folder(tmp_path):
    with pytest.raises(SpachError, match="not a battle folder"):
        write_report(tmp_path)


def test_markdown_escapes_table_cells(tmp_path):
    md = render_markdown([("table", (["a|b"], [["x|y"]]))], tmp_path)
    assert "a\\|b" in md and "x\\|y" in md


def test_pareto_front():
    # (cost, accuracy): the 3rd is dominated by the 2nd (cheaper and better)
    points = [(1.0, 80.0), (2.0, 85.0), (3.0, 84.0), (4.0, 90.0)]
    assert pareto_front(points, higher_x_better=False) == [0, 1, 3]
    assert pareto_front([(10.0, 80.0), (5.0, 85.0)], higher_x_better=True) == [1, 0]


def test_labels_of_close_points_do_not_cover_each_other():
    import matplotlib.pyplot as plt

    from spach.bench.plots import spread_labels

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = [(3.4, 79.0), (3.5, 78.95), (3.45, 79.1), (8.0, 79.2), (4.0, 70.0)]  # the first three crowd
    ax.scatter(*zip(*points))
    labels = [ax.annotate(f"mlp-ss-label-{i}", p, textcoords="offset points", xytext=(5, 4), fontsize=8)
              for i, p in enumerate(points)]
    ax.set_xscale("log")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()

    def overlaps() -> int:
        boxes = [t.get_window_extent(renderer) for t in labels]
        return sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])

    assert overlaps() > 0  # the test can fail: as placed, the crowded labels cover each other
    spread_labels(fig)
    assert overlaps() == 0
    assert labels[3].xyann == (5, 4) and labels[4].xyann == (5, 4)  # a label alone stays where it was put
    plt.close(fig)


def test_the_tally_counts_the_paper_findings_and_the_further_questions_apart(tmp_path, monkeypatch):
    """A study that also asks the `beyond` question: the paper's five are counted apart from it."""
    monkeypatch.setitem(TOP1, "shift-ms", [90.1, 90.2, 90.0])
    monkeypatch.setitem(FACTS, "shift-ms", ("shift", "multi", True, "D"))
    text = STUDY.replace('notes = "Made by hand."', 'notes = "Made by hand."\nquestions = ["local-modeling", "beyond"]')
    text += '\n[[contestant]]\nname = "shift-ms"\narch = { net_arch = [[["conv", 1]], [["shift", 1]]], hidden_dim = 8, patch_size = 2 }\n'
    out = make_folder(tmp_path, study_text=text)
    write_report(out)
    md = (out / "report.md").read_text()
    assert "0 of the 1 findings of the paper this study tests are decided, and 0 of its 1 further question(s)" in md, md
    (tmp_path / "beyond-only").mkdir()
    out = make_folder(tmp_path / "beyond-only", study_text=text.replace('questions = ["local-modeling", "beyond"]',
                                                                          'questions = ["beyond"]'))
    write_report(out)  # a study that asks no finding of the paper (the modern preset) counts only its own questions
    md = (out / "report.md").read_text()
    assert "0 of the 1 questions beyond the paper this study asks are decided" in md and "0 of the 0" not in md, md


def test_a_pair_noisier_than_the_pooled_noise_is_judged_by_its_own(tmp_path):
    """attn-ms vs its no-CPE twin swing by points from seed to seed while the conv pair moves by tenths:
    the pooled noise understates that pair's, so its noise is moderated toward its own (stats.pair_test)
    and its interval is wider than the pooled noise alone would make it."""
    from spach.battle import stats
    from spach.battle.findings import judge
    from spach.battle.results import load_results, load_study_folder
    out = make_folder(tmp_path)
    study = load_study_folder(out)
    entries = load_results(out, study)
    comps = {c.claim: c for f in judge(entries, study) for c in f.comparisons}
    attn = comps["attn-ms (CPE) > attn-ms-nocpe (no CPE)"]
    table = [[r.final_top1 for r in e.runs] for e in entries if e.arm == "main"]
    pooled = stats.compare(attn.a_values, attn.b_values, stats.seed_noise(table))
    assert attn.test.se > 1.2 * pooled.se and attn.test.noise.prior_df == stats.PRIOR_DF
    write_report(out)
    assert f"[{attn.ci[0]:+.2f}, {attn.ci[1]:+.2f}]" in (out / "report.md").read_text()


def test_control_characters_and_markdown_links_are_shown_not_rendered(tmp_path):
    from spach.battle.render import render_html
    text = "red\x1b[31m bell\x07 nul\x00 del\x7f csi\x9b [x](javascript:alert(1)) ![i](file:x) [r]: javascript:y"
    blocks = [("h1", text), ("p", text), ("table", ([text], [[text]]))]
    for out in (render_markdown(blocks, tmp_path), render_html(blocks, text)):
        assert not any(ord(ch) < 32 and ch not in "\n\t" or 0x7f <= ord(ch) < 0xa0 for ch in out)
        assert "red\u241b[31m bell\u2407 nul\u2400 del\u2421 csi\\x9b" in out
    md = render_markdown(blocks, tmp_path)
    assert not re.search(r"(?<!\\)\][(\[:]", md)  # no link, image or link definition left
    assert "[x\\](javascript:alert(1))" in md and "+0.68 [-0.27, +1.64]" in render_markdown([("p", "+0.68 [-0.27, +1.64]")], tmp_path)


def test_bidi_controls_and_lone_surrogates_are_shown_as_escapes(tmp_path):
    """A label from a hand-edited study.json holding U+202E would show reversed (and a JSON "\\ud800" is
    not even UTF-8): every text of the report is escaped (render.visible)."""
    from spach.battle.render import render_html
    label = "conv \u202eredlof\u2066 \u2028 \ud800"
    blocks = [("h1", label), ("p", label), ("table", ([label], [[label]])), ("img", (label, tmp_path / "x.png"))]
    (tmp_path / "x.png").write_bytes(b"png")
    for out in (render_markdown(blocks, tmp_path), render_html(blocks, label)):
        assert not set(out) & {"\u202e", "\u2066", "\u2028", "\ud800"}
        assert "conv \\u202eredlof\\u2066 \\u2028 \\ud800" in out
        out.encode("utf-8")


def test_the_report_says_what_ran_not_what_the_study_file_says(tmp_path):
    from spach.battle.plan import check_data
    text = STUDY.replace('dataset = "tiny"', 'dataset = "tiny"\ntrain_subset = 5000')
    with pytest.raises(SpachError, match=r"^study: data.train_subset = 5,000 but the training set of tiny holds 256 "
                                         r"images; lower it \(0: all\)$"):
        check_data(parse_study(text))
    with pytest.raises(SpachError, match="data.val_subset = 100 but the test set of tiny holds 64 images"):
        check_data(parse_study(STUDY.replace('dataset = "tiny"', 'dataset = "tiny"\nval_subset = 100')))
    study = parse_study(STUDY.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    check_data(study)  # what the battle records in study.json before its runs
    assert study.data_sizes == {"main": {"train": 256, "test": 64}}
    out = make_folder(tmp_path, study_text=STUDY.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    (out / "study.json").write_text(json.dumps(study.to_dict()))
    write_report(out)
    md = (out / "report.md").read_text()
    assert "Each run here sees 768 training images (3 epochs x 256)" in md
    assert "two seeds alone (1 df)" in md and "only on these 64 test images" in md
    assert "three seeds" not in md and "10k" not in md


def test_the_accuracy_vs_loss_figure_shows_the_arm_with_curves(tmp_path):
    """Finding 4 on an arm scored every epoch and finding 3 on one scored once (the medium preset): the
    figure shows finding 4's curves, not the arm that has none."""
    from types import SimpleNamespace

    from spach.battle.plots import make_all
    from test_findings import entry

    curves = [(1.2, 60.0), (0.9, 70.0), (0.7, 74.0)]
    entries = [entry("conv-ss-scarce", "conv", "single", [74.0, 74.5], losses=[curves, curves], arm="curves"),
               entry("attn-ss-scarce", "attn", "single", [73.0, 73.5], losses=[curves, curves], arm="curves"),
               entry("mlp-ss-scarce", "mlp", "single", [80.0, 80.5], arm="scarce"),
               entry("mlp-ss-wide-scarce", "mlp", "single", [79.0, 79.5], arm="scarce")]
    found = [SimpleNamespace(number=3, arm="scarce", comparisons=[1]), SimpleNamespace(number=4, arm="curves", comparisons=[1])]
    figures = make_all(entries, found, tmp_path)
    assert "accuracy_vs_training_loss" in figures and figures["accuracy_vs_training_loss"].is_file()

"""Cost matching: `spach.models.match` against a brute-force search, `spach models match`, and battle
contestants that state `match = {...}` instead of a width (resolved when the study is read, recorded,
shown in the report); the new mixers train an epoch in that tiny battle."""
import io
import json

import pytest
from conftest import cli_error
from test_battle import tiny

from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.cli import main
from spach.errors import SpachError
from spach.models.match import match_width, spec_cost

SHAPE = dict(img_size=32, in_chans=1, num_classes=10)
ATTN = {"net_arch": [["attn", 2]], "patch_size": 4, "num_heads": 3}


def brute_force(spec, target, by, widths):
    best = None
    for w in widths:
        try:
            cost = spec_cost("spach", {**spec, "hidden_dim": w}, by, **SHAPE)
        except SpachError:
            continue
        if best is None or abs(cost / target - 1) < abs(best[1] / target - 1):
            best = (w, cost)
    return best


@pytest.mark.parametrize("by, target", [("macs", 1.9e6), ("macs", 2e4), ("params", 4e4), ("macs", "just above width 12")])
def test_the_closest_valid_width_as_a_brute_force_search_finds_it(by, target):
    if target == "just above width 12":  # the closest is the valid width below the target, not the one above
        target = 1.01 * spec_cost("spach", {**ATTN, "hidden_dim": 12}, by, **SHAPE)
    m = match_width("spach", ATTN, target, by, **SHAPE, tolerance=None)
    assert m.width % 3 == 0  # num_heads divides it
    assert (m.width, m.cost) == brute_force(ATTN, target, by, range(1, 61))
    assert m.error == pytest.approx(m.cost / target - 1)


def test_a_target_no_width_meets_is_refused_in_one_line():
    with pytest.raises(SpachError) as e:
        match_width("spach", ATTN, 2.2e5, "macs", **SHAPE, tolerance=0.01)
    msg = str(e.value)
    assert "no hidden_dim of" in msg and "within 1%: the closest, hidden_dim" in msg and "\n" not in msg
    with pytest.raises(SpachError, match="leave it out of the spec"):
        match_width("spach", {**ATTN, "hidden_dim": 12}, 1e6, **SHAPE)
    with pytest.raises(SpachError, match="'smlpnet_tiny' is not a SPACH model"):
        match_width("smlpnet_tiny", {}, 1e6, **SHAPE)
    with pytest.raises(SpachError, match="builds with no hidden_dim from 1 to 64: unknown spatial mixer 'nope'"):
        match_width("spach", {"net_arch": [["nope", 2]]}, 1e6, **SHAPE)


def test_models_match_command(capsys):
    spec = json.dumps({"net_arch": [["scan", 2]], "patch_size": 4})
    main(["models", "match", "--macs", "1.5M", "--img-size", "32", "--in-chans", "1", "--num-classes", "10",
          "--arch", spec, "--arch", json.dumps(ATTN)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "target: 1.50M MACs at 1x32x32, 10 classes; tolerance 10%"
    widths = {line.split()[-4]: line for line in out[2:]}
    assert len(out) == 4 and all(line.startswith("{") for line in out[2:]) and len(widths) == 2
    like = json.dumps({"net_arch": [["conv", 2]], "patch_size": 4, "hidden_dim": 24})
    main(["models", "match", "--like", like, "--by", "params", "--img-size", "32", "--in-chans", "1",
          "--num-classes", "10", "--arch", spec, "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["target"] == spec_cost("spach", json.loads(like), "params", **SHAPE) and abs(row["error"]) <= 0.1
    assert row["params"] == spec_cost("spach", {**json.loads(spec), "hidden_dim": row["hidden_dim"]}, "params", **SHAPE)
    assert "give one target" in cli_error(["models", "match", "--arch", spec], capsys)
    assert "--macs '5x' is not a count" in cli_error(["models", "match", "--macs", "5x", "--arch", spec], capsys)
    assert "belong to 'spach models match'" in cli_error(["models", "--macs", "5M"], capsys)
    assert "within 0.1%" in cli_error(["models", "match", "--macs", "5M", "--arch", spec, "--tolerance", "0.001",
                                       "--img-size", "32"], capsys)


# the tiny battle of test_battle, one seed of one epoch, with contestants matched in cost
STUDY = tiny(epochs=1).split("[[contestant]]")[0].replace("seeds = [0, 1]", "seeds = [0]") + """
[[contestant]]
name = "conv"
arch = { net_arch = [["conv", 2]], hidden_dim = 16, patch_size = 4 }

[[contestant]]
name = "scan"
arch = { net_arch = [["scan", 2]], patch_size = 4 }
match = { macs = "conv", tolerance = 0.1 }

[[contestant]]
name = "gated"
arch = { net_arch = [[["conv", 1]], [["gatedconv", 1]]], patch_size = 4 }
match = { params = 3000 }
"""


def test_a_matched_study_picks_records_and_reports_the_width_and_both_new_mixers_train(tmp_path):
    study = parse_study(STUDY)
    scan, gated = study.contestants[1], study.contestants[2]
    conv_macs = spec_cost("spach", study.contestants[0].arch, "macs", 32, 1, 4)  # the tiny set: 4 classes, 1x32x32
    expected = match_width("spach", {"net_arch": [["scan", 2]], "patch_size": 4}, conv_macs, "macs", 32, 1, 4)
    assert scan.arch["hidden_dim"] == expected.width and scan.match["target"] == conv_macs
    assert scan.match["macs_matched"] == expected.cost and abs(scan.match["error"]) <= 0.1
    assert gated.arch["hidden_dim"] > 0 and abs(gated.match["params_matched"] / 3000 - 1) <= 0.1

    out = tmp_path / "b"
    run_battle(study, out, stream=io.StringIO())
    recorded = {c["name"]: c for c in json.loads((out / "study.json").read_text())["contestants"]}
    assert recorded["scan"]["arch"]["hidden_dim"] == expected.width and recorded["scan"]["match"]["macs"] == "conv"
    config = json.loads((out / "runs" / "scan" / "seed0" / "config.json").read_text())
    assert config["model_kwargs"]["hidden_dim"] == expected.width
    costs = json.loads((out / "costs.json").read_text())
    assert costs["scan"]["macs"] == expected.cost and costs["scan"]["family"] == "scan"
    assert costs["gated"]["family"] == "gatedconv"
    assert all(json.loads((out / "runs" / c / "seed0" / "summary.json").read_text())["epochs"] == 1 for c in recorded)
    md = (out / "report.md").read_text()
    assert f"| {expected.width} (MACs of conv {expected.error:+.1%}) |" in md and "| 16 |" in md


def test_a_match_no_width_meets_or_that_names_no_contestant_is_refused_naming_the_contestant():
    with pytest.raises(SpachError) as e:
        parse_study(STUDY.replace('macs = "conv", tolerance = 0.1', 'macs = "conv", tolerance = 0.001'))
    assert str(e.value).startswith("study: contestant 'scan'.match: no hidden_dim of") and "within 0.1%" in str(e.value)
    assert "\n" not in str(e.value)
    cases = {
        'macs = "conv", tolerance = 0.1': ('macs = "nobody"', "contestant 'scan'.match.macs: 'nobody' is not another contestant"),
        "match = { params = 3000 }": ('match = { params = "gated" }', "contestant 'gated'.match.params: 'gated' is not another"),
    }
    for old, (new, msg) in cases.items():
        with pytest.raises(SpachError, match=msg):
            parse_study(STUDY.replace(old, new))
    with pytest.raises(SpachError, match="contestant 'scan'.match: picks arch.hidden_dim; remove hidden_dim"):
        parse_study(STUDY.replace('[["scan", 2]], patch_size = 4', '[["scan", 2]], patch_size = 4, hidden_dim = 8'))
    with pytest.raises(SpachError, match="contestant 'gated'.match: give one target: macs or params"):
        parse_study(STUDY.replace("match = { params = 3000 }", "match = { params = 3000, macs = 1e5 }"))
    with pytest.raises(SpachError, match="go round in a circle"):
        parse_study(STUDY.replace("match = { params = 3000 }", 'match = { params = "scan" }')
                    .replace('macs = "conv", tolerance = 0.1', 'params = "gated"'))

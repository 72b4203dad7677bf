"""Study files: the presets parse, and every mistake gets one clear line naming the field."""
import sys
import textwrap

import pytest
from conftest import run_process

from spach.battle.study import list_presets, load_study, parse_study
from spach.errors import SpachError

GOOD = """
[study]
name = "t"
seeds = [0, 1]

[data]
dataset = "tiny"

[recipe]
epochs = 1
lr = 1e-3

[[contestant]]
name = "conv"
arch = { net_arch = [["conv", 1]], hidden_dim = 16, patch_size = 4 }

[[contestant]]
name = "attn-ms"
arch = { net_arch = [[["conv", 1]], [["attn", 1]]], hidden_dim = 16, patch_size = 2, num_heads = 2 }
recipe = { lr = 5e-4 }
"""


def test_good_study_parses():
    s = parse_study(GOOD)
    assert s.name == "t" and s.seeds == [0, 1] and [c.name for c in s.contestants] == ["conv", "attn-ms"]
    cfg = s.config(s.contestants[1], 1, "out")
    assert cfg.lr == 5e-4 and cfg.epochs == 1 and cfg.dataset == "tiny" and cfg.seed == 1 and cfg.output == "out"
    assert cfg.model == "spach" and cfg.model_kwargs["hidden_dim"] == 16


@pytest.mark.parametrize("name", ["default", "medium", "medium-cifar10", "paper", "tiny", "beyond", "modern"])
def test_presets_parse(name):
    assert name in list_presets()
    s = load_study(preset=name)
    assert s.contestants and len(s.seeds) >= 1


def test_default_preset_covers_the_design():
    s = load_study()
    assert len(s.seeds) >= 2 and s.data["dataset"] == "fashion-mnist"
    kinds = {(c.arch["net_arch"][0][0] if isinstance(c.arch["net_arch"][0][0], str) else "ms") for c in s.contestants}
    assert "ms" in kinds and kinds & {"conv", "attn", "mlp"}
    assert any(c.arch.get("cpe") is False for c in s.contestants)


def test_beyond_trains_as_the_medium_main_arm():
    """The beyond preset's contestants train as the medium's main arm does (same data and recipe, two
    epochs instead of five, scored on their own schedule; same margin), and its conv / attn / mlp
    contestants are the medium's."""
    m, b = load_study(preset="medium"), load_study(preset="beyond")
    scoring = {"eval_train_subset", "eval_every"}  # what is scored and when: no part of training
    trains = lambda table: {k: v for k, v in table.items() if k not in scoring}  # noqa: E731
    assert trains(b.data) == trains(m.data) and trains({**b.recipe, "epochs": 5}) == trains(m.recipe)
    assert b.margin == m.margin
    main = {c.name: c.arch for c in m.contestants if c.arm == "main"}
    assert all(main[n] == c.arch for c in b.contestants if (n := c.name) in ("conv-ms", "attn-ms", "mlp-ms"))


def _mutate(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize("text, expected", [
    ("not toml [", "not valid TOML"),
    (GOOD + "\n[extra]\nx = 1\n", "extra: unknown table"),
    (_mutate('name = "t"', 'name = "t"\nseed = [0]'), "study.seed: unknown key; did you mean 'seeds'?"),
    (_mutate("seeds = [0, 1]", "seeds = []"), "study.seeds: expected a non-empty list of integers"),
    (_mutate("seeds = [0, 1]", "seeds = [1, 1]"), "study.seeds: seeds repeat"),
    (_mutate("seeds = [0, 1]", 'seeds = [0]\nquestions = ["hybrids"]'), "study.questions: unknown question 'hybrids'"),
    (_mutate("lr = 1e-3", "lr = 1e-3\nlrr = 2"), "recipe.lrr: unknown key; did you mean 'lr'?"),
    (_mutate("lr = 1e-3", "seed = 3"), "recipe.seed: is set by the battle itself"),
    (_mutate("lr = 1e-3", 'dataset = "tiny"'), "recipe.dataset: belongs in [data]"),
    (_mutate("epochs = 1", 'epochs = "ten"'), "recipe.epochs: expected an integer"),
    (_mutate("recipe = { lr = 5e-4 }", "recipe = { smoothing = 0.2 }"), "contestant 'attn-ms'.recipe.smoothing: a contestant may only override"),
    (_mutate('name = "conv"', 'name = "attn-ms"'), "contestant.name: 'attn-ms' is used by more than one contestant"),
    (_mutate('name = "conv"', 'name = "a b"'), "contestant[0].name: expected a folder-safe name"),
    (_mutate("hidden_dim = 16, patch_size = 4", "hidden_dim = 16, patch_size = 4, hiden = 3"), "contestant 'conv'.arch.hiden: unknown key"),
    (_mutate("hidden_dim = 16, patch_size = 4", "hidden_dim = 16, patch_size = 4, img_size = 32"), "contestant 'conv'.arch.img_size: is set by the training engine; set [data].img_size"),
    (_mutate('[["conv", 1]]', '[["convolution", 1]]'), "contestant 'conv'.arch.net_arch: unknown spatial mixer 'convolution'"),
    (_mutate('arch = { net_arch = [["conv", 1]], hidden_dim = 16, patch_size = 4 }', ""), "contestant 'conv'.arch.net_arch: model 'spach' is built from arch alone"),
    (_mutate('name = "conv"', 'name = "conv"\nmodel = "resnet-18"'), "contestant 'conv'.model: 'resnet-18' is neither"),
    (_mutate('name = "conv"', 'name = "conv"\ncolour = 1'), "contestant 'conv'.colour: unknown key"),
])
def test_mistakes_name_the_field(text, expected):
    with pytest.raises(SpachError) as e:
        parse_study(text, source="s.toml")
    msg = str(e.value)
    assert msg.startswith("s.toml: ") and expected in msg and "\n" not in msg


@pytest.mark.parametrize("table, expected", [
    ("recipe = 5", "recipe: must be a table ([recipe]), not a int"),
    ('data = "abc"', "data: must be a table ([data]), not a str"),
    ("arm = 3", "arm: must be a table ([arm]), not a int"),
    ("contestant = 5", "contestant: must be a [[contestant]] table with a name, got 5"),
    ('contestant = ["x"]', "contestant[0]: must be a [[contestant]] table with a name, got 'x'"),
])
def test_tables_next_to_a_base_are_tables(table, expected):
    text = f'{table}\n[study]\nname = "t"\nbase = "tiny"\n'
    with pytest.raises(SpachError) as e:
        parse_study(text, source="s.toml")
    assert str(e.value) == f"s.toml: {expected}"


def test_a_plugin_named_like_an_installed_module_is_refused(tmp_path):
    for name in ("matplotlib.py", "json.py", "bad.py"):
        (tmp_path / name).write_text("raise ValueError('first line\\nsecond line')\n")
    text = GOOD.replace('name = "t"', 'name = "t"\nimports = ["matplotlib.py", "bad.py", "json.py"]')
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(SpachError) as e:
        load_study(tmp_path / "s.toml")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 's.toml'}: study.imports: a plugin file is imported under its file name, and "
                          "these names are taken by installed modules: matplotlib (/") and ", json (/" in msg
    assert "bad" not in msg and "\n" not in msg
    import matplotlib
    assert sys.modules["matplotlib"] is matplotlib and not hasattr(matplotlib, "__plugin__")
    (tmp_path / "s.toml").write_text(GOOD.replace('name = "t"', 'name = "t"\nimports = ["bad.py"]'))
    with pytest.raises(SpachError) as e:  # a message of two lines stays one line
        load_study(tmp_path / "s.toml")
    assert str(e.value).endswith("cannot import '" + str(tmp_path / "bad.py") + "' (ValueError: first line second line)")


def test_no_contestants():
    with pytest.raises(SpachError, match="no contestants"):
        parse_study('[study]\nname = "x"\n')


def test_zoo_and_timm_models_are_accepted():
    text = GOOD.replace('name = "conv"', 'name = "conv"\nmodel = "resnet18"').replace(
        'arch = { net_arch = [["conv", 1]], hidden_dim = 16, patch_size = 4 }', "")
    assert parse_study(text).contestants[0].model == "resnet18"


def test_custom_mixer_from_a_study_import(tmp_path):
    (tmp_path / "my_mixer.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        import spach

        @spach.register_mixer("studyshift")
        class Shift(nn.Module):
            def forward(self, x):
                return x.roll(1, dims=1) - x
    """))
    study_file = tmp_path / "s.toml"
    study_file.write_text(GOOD.replace('name = "t"', 'name = "t"\nimports = ["my_mixer.py"]').replace(
        '[["conv", 1]]', '[["studyshift", 1]]'))
    s = load_study(study_file)
    assert s.imports == [str(tmp_path / "my_mixer.py")]
    load_study(study_file)  # importing twice in one process is fine


def test_missing_file_and_unknown_preset():
    with pytest.raises(SpachError, match="does not exist"):
        load_study("/nonexistent/study.toml")
    with pytest.raises(SpachError, match="unknown preset 'nope'; choose one of"):
        load_study(preset="nope")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("lr = 1e-3", "lrr = 1"))
    r = run_process([sys.executable, "-m", "spach", "battle", str(bad), "--output", str(tmp_path / "o")],
                    capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"spach battle: error: {bad}: recipe.lrr: unknown key; did you mean 'lr'?"


def test_modern_preset_matches_every_new_mixer_to_conv_in_macs():
    """Issue 28's preset: every 2021-2025 mixer and SPACH's three families, one layout, MACs within 10% of conv-ms."""
    from spach.battle.pairs import base_family
    from spach.battle.questions import MODERN

    s = load_study(preset="modern")
    mixers = {base_family(c.arch["net_arch"][1][0][0]) for c in s.contestants}
    assert mixers == {"conv", "attn", "mlp", *MODERN}
    matched = [c for c in s.contestants if c.match]
    assert len(matched) == len(s.contestants) - 1 and all(abs(c.match["error"]) <= 0.1 for c in matched)
    assert s.budget and set(s.rank) == {"modern", "gate", "large-kernel"} and s.prior and not {400, 401} & set(s.seeds)

"""Plugins (custom mixers from a study's or a run's `imports`) are recorded by the run, so eval, export and
a resume of it import them again (issue 26.6); `--imports` replaces them."""
import json
import sys
import zlib

import pytest
from conftest import cli_error

from spach import plugins
from spach.battle.study import parse_study
from spach.cli import main
from spach.models import mixers

PLUGIN = """
import torch.nn as nn
import spach

@spach.register_mixer("{name}")
class MaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):  # (B, H, W, C) tokens
        return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) - x
"""


@pytest.fixture
def plugin(tmp_path, request):
    """A plugin file registering a mixer of its own name; `forget()` makes the process new to it again (as
    a later `spach eval` or `spach export` would be)."""
    name = f"maxpool{zlib.crc32(request.node.name.encode())}"  # one per test: a mixer registers once per process
    path = tmp_path / "plugin_dir" / f"{name}_plugin.py"
    path.parent.mkdir()
    path.write_text(PLUGIN.format(name=name))

    def forget():
        mixers._MIXERS.pop(name, None)
        plugins._IMPORTED.discard(str(path))
        sys.modules.pop(path.stem, None)

    yield name, path, forget
    forget()


def kwargs(mixer):
    return json.dumps({"net_arch": [[["conv", 1]], [[mixer, 1]]], "hidden_dim": 8, "patch_size": 4, "num_heads": 1})


def test_a_run_records_its_plugins_and_eval_export_and_resume_import_them(tmp_path, capsys, monkeypatch, plugin):
    name, path, forget = plugin
    run = tmp_path / "run"
    monkeypatch.chdir(path.parent)  # given relative, recorded absolute
    main(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", kwargs(name), "--imports", path.name,
          "--epochs", "1", "--output", str(run), "--progress", "none"])
    monkeypatch.chdir(tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["imports"] == [str(path)]
    capsys.readouterr()

    forget()
    main(["eval", "--pretrained", str(run / "best.pth"), "--dataset", "tiny"])
    out = capsys.readouterr()
    assert out.out.startswith("spach on tiny (64 images): top1")
    assert f"imported the plugin(s) the run of {run / 'best.pth'} recorded: {path} (--imports overrides)" in out.err

    forget()
    main(["export", str(run), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
    assert capsys.readouterr().out.startswith(f"exported spach ({run / 'best.pth'}) to {tmp_path / 'm.pt'} (torchscript")

    forget()
    main(["train", "--config", str(run / "config.json"), "--epochs", "2", "--resume", "auto", "--progress", "none"])
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2

    forget()  # --imports with nothing after it: none imported, so the mixer is unknown
    err = cli_error(["eval", "--pretrained", str(run / "best.pth"), "--dataset", "tiny", "--imports"], capsys)
    assert f"unknown spatial mixer '{name}'" in err

    forget()  # given: used instead, without the notice
    main(["export", str(run), "--format", "timm", "--output", str(tmp_path / "t"), "--imports", str(path)])
    out = capsys.readouterr()
    assert out.out.startswith("exported spach") and "imported the plugin" not in out.err
    card = (tmp_path / "t" / "README.md").read_text()
    assert f"Its mixers come from the plugin(s) its run imported (`{path.name}`): import them before" in card

    forget()  # a recorded plugin that moved: one line naming where the name came from and the fix
    path.rename(path.with_name("elsewhere.py"))
    err = cli_error(["eval", "--pretrained", str(run / "best.pth"), "--dataset", "tiny"], capsys)
    assert err.startswith(f"spach eval: error: checkpoint {run / 'best.pth'}: imports (recorded by its run; pass "
                          f"--imports to name them anew): cannot import '{path}' (FileNotFoundError")


def test_a_battle_run_records_the_study_imports(tmp_path, plugin):
    name, path, _ = plugin
    study = parse_study(f"""
[study]
name = "p"
imports = ["plugin_dir/{path.name}"]
[data]
dataset = "tiny"
[[contestant]]
name = "pool"
model = "spach"
arch = {{ net_arch = [[["conv", 1]], [["{name}", 1]]], hidden_dim = 8, patch_size = 4, num_heads = 1 }}
""", source=str(tmp_path / "s.toml"), base=tmp_path)
    assert study.config(study.contestants[0]).imports == [str(path)]


def test_a_study_recipe_may_not_set_imports():
    with pytest.raises(Exception, match=r"recipe\.imports: plugins are the study's: move it to \[study\] imports"):
        parse_study('[study]\nname = "p"\n[recipe]\nimports = ["x.py"]\n[[contestant]]\nname = "c"\n')

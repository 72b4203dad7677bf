"""Text that reaches a terminal or a report: the CLI's one sanitiser (`spach.text`), plugins that fail or
call sys.exit(), and control / bidi characters in a study's free text."""
import pytest

from conftest import cli_error
from spach.battle.study import parse_study
from spach.cli import main
from spach.errors import SpachError, first_line
from spach.text import one_line, unsafe_char

STUDY = """
[study]
name = "t"
seeds = [0, 1]
{extra}

[data]
dataset = "tiny"

[recipe]
epochs = 1

[[contestant]]
name = "conv"
arch = {{ net_arch = [["conv", 1]], hidden_dim = 16, patch_size = 4 }}
{contestant}
"""


def test_one_line_escapes_controls_and_bidi_and_joins_lines():
    assert one_line("a\nb\r\n  c\t d\x1b[31m e\u202ef\x07\x9b\ud800") == "a b c  d\\x1b[31m e\\u202ef\\x07\\x9b\\ud800"
    assert one_line("plain text, é and 中文 and an emoji \U0001f600") == "plain text, é and 中文 and an emoji \U0001f600"
    assert first_line(ValueError("red \x1b[31m\nsecond")) == "red \\x1b[31m"
    assert unsafe_char("ok\ttab", allow="\t") is None
    assert unsafe_char("x\u202ey") == "U+202E RIGHT-TO-LEFT OVERRIDE" and unsafe_char("\x1b") == "U+001B control character"


def test_every_error_line_of_the_cli_is_sanitised(tmp_path, capsys):
    """Messages quote what the user gave (a file name with ESC and U+202E here): the CLI prints them escaped."""
    name = str(tmp_path / "s\x1b[2J\u202e.toml")
    err = cli_error(["battle", name], capsys)
    assert err == f"spach battle: error: study file {tmp_path}/s\\x1b[2J\\u202e.toml does not exist"
    with pytest.raises(SystemExit):  # argparse's own errors too (after its usage line)
        main(["models", "--bogus\x1b[2J"])
    assert capsys.readouterr().err.endswith("spach: error: unrecognized arguments: --bogus\\x1b[2J\n")


def _battle(tmp_path, plugin: str, capsys) -> str:
    (tmp_path / "plug.py").write_text(plugin)
    study = tmp_path / "s.toml"
    study.write_text(STUDY.format(extra='imports = ["plug.py"]', contestant=""))
    return cli_error(["battle", str(study), "--dry-run", "--output", str(tmp_path / "b")], capsys)


def test_a_plugin_error_with_an_escape_is_printed_escaped(tmp_path, capsys):
    err = _battle(tmp_path, "raise RuntimeError('red \\x1b[31m text\\u202e')\n", capsys)
    assert "\x1b" not in err and "\u202e" not in err
    assert err.startswith("spach battle: error: ") and err.endswith(
        f"study.imports: cannot import '{tmp_path / 'plug.py'}' (RuntimeError: red \\x1b[31m text\\u202e)")


@pytest.mark.parametrize("code, shown", [("import sys\nsys.exit('a\\nb')", "a b"), ("raise SystemExit(3)", "3"),
                                         ("raise SystemExit", "no message")])  # (wandb, once used, makes sys.exit() 0)
def test_a_plugin_calling_sys_exit_is_one_line_naming_the_plugin(tmp_path, capsys, code, shown):
    err = _battle(tmp_path, code + "\n", capsys)
    assert err == (f"spach battle: error: {tmp_path / 's.toml'}: study.imports: cannot import '{tmp_path / 'plug.py'}' "
                   f"(SystemExit: {shown})")


def test_sys_exit_with_text_while_a_command_runs_is_one_safe_line(tmp_path, capsys, monkeypatch):
    """sys.exit("...") from code a command runs (a plugin's mixer, called during the run): the CLI's error
    line, the text sanitised, and where it was called; exit 1, as Python's own."""
    def plugin_code(*args, **kwargs):
        raise SystemExit("first \x1b[2J\nsecond")

    monkeypatch.setattr("spach.models.table.print_models", plugin_code)
    with pytest.raises(SystemExit) as e:
        main(["models"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "\x1b" not in err
    assert err.startswith("spach models: error: first \\x1b[2J second (sys.exit() called by ") and __file__ in err


@pytest.mark.parametrize("extra, contestant, where", [
    ("", 'label = "conv \u202eredlof"', "contestant 'conv'.label: holds U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("", 'label = "a\\nb"', "contestant 'conv'.label: holds U+000A control character"),
    ('description = "x \u2066y"', "", "study.description: holds U+2066 LEFT-TO-RIGHT ISOLATE"),
    ('notes = "x \\u001b[31m"', "", "study.notes: holds U+001B control character"),
])
def test_control_and_bidi_characters_in_a_studys_text_are_refused(extra, contestant, where):
    with pytest.raises(SpachError) as e:
        parse_study(STUDY.format(extra=extra, contestant=contestant), source="s.toml")
    assert str(e.value) == (f"s.toml: {where}, a control character that would reorder or hide text in the report and "
                            "on the terminal; remove it")


def test_line_breaks_and_tabs_stay_allowed_in_descriptions():
    text = 'description = """two\nlines\tand a tab"""\nnotes = "é 中文"'
    study = parse_study(STUDY.format(extra=text, contestant='label = "conv (ü)"'))
    assert study.description == "two\nlines\tand a tab" and study.contestants[0].label == "conv (ü)"

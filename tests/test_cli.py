"""`spach models` and the CLI's error contract (one line, exit 2, no traceback)."""
import json
import sys

import pytest
from conftest import run_process

from spach.cli import main
from spach.errors import SpachError
from conftest import cli_error


def test_models_table_and_json(capsys):
    main(["models", "spach_ms_s*"])
    out = capsys.readouterr().out
    assert "spach_ms_s_plus_patch4_224_hybrid" in out and "83.9" in out and "63.14" in out and "12.18" in out
    main(["models", "*xxs_patch16*", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {f"spach_xxs_patch16_224_{m}" for m in ("conv", "attn", "mlp")}
    assert {r["params"] for r in rows} == {7828840, 3931048, 8307184}
    assert all(r["layout"] == "single-stage" and r["top1"] is None for r in rows)


def test_user_error_is_one_line_without_traceback():
    r = run_process([sys.executable, "-m", "spach", "models", "nothing_like_this"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "no model matches" in r.stderr


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "models" in capsys.readouterr().out


def test_models_table_lists_smlpnet_and_shiftvit_with_their_family(capsys):
    main(["models", "s[mh]*", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 12
    assert {r["family"] for n, r in rows.items() if n.startswith("smlpnet")} == {"smlp"}
    assert {r["family"] for n, r in rows.items() if n.startswith("shiftvit")} == {"shift"}
    assert rows["smlpnet_tiny"]["params"] == 24123584 and rows["smlpnet_tiny"]["top1"] == 81.9
    assert rows["shiftvit_r2_small"]["macs"] == 8743434240 and rows["shiftvit_r4_base"]["top1"] is None
    assert all(r["layout"] == "multi-stage" for r in rows.values())


XXS = "spach_ms_xxs_patch4_224_conv"


@pytest.mark.parametrize("argv, flag", [
    (["battle", "--preset", "tiny", "--dry-run", "--output", "{sub}"], "--output"),
    (["train", "--preset", "tiny", "--epochs", "1", "--output", "{sub}"], "--output"),
    (["export", XXS, "--format", "onnx", "--output", "{sub}/m.onnx"], "--output"),
    (["bench", XXS, "--quick", "--json", "{sub}/b.json"], "--json"),
    (["bench", XXS, "--quick", "--csv", "{sub}/b.csv"], "--csv"),
    (["bench", XXS, "--quick", "--plots", "{sub}"], "--plots"),
    (["eval", "--model", XXS, "--pretrained", "w.pth", "--json", "{sub}/r.json"], "--json"),
])
def test_an_output_under_a_file_is_one_line_naming_the_flag_before_any_work(tmp_path, capsys, argv, flag):
    (tmp_path / "mk.json").write_text("{}")
    sub = tmp_path / "mk.json" / "sub"
    err = cli_error([a.format(sub=sub) for a in argv], capsys)
    assert f": error: {flag} {sub}" in err and f"{tmp_path / 'mk.json'} is a file, not a folder; " in err, err


def test_a_file_written_under_a_file_names_the_file_in_the_way(tmp_path):
    from spach.files import atomic_write_text, read_json, read_jsonl
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpachError, match=f"^cannot create the folder {tmp_path}/f/a: {tmp_path}/f is a file, not a "
                                         "folder; choose another path$"):
        atomic_write_text(tmp_path / "f" / "a" / "b.json", "{}")
    assert read_json(tmp_path / "f" / "a.json") is None and read_jsonl(tmp_path / "f" / "a.jsonl") == []

"""`spach export`: one model of each family at a tiny config, both formats, each exported file run on
its own runtime against the PyTorch model; and the one-line errors."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, spawn

import spach
from spach.cli import main
from spach.errors import SpachError
from spach.export import TOLERANCE, export
from spach.train.checkpoint import save_weights

TINY = dict(hidden_dim=16, num_heads=2, img_size=64, num_classes=7)
FAMILIES = {
    "conv": "spach_ms_xxs_patch4_224_conv",
    "attn": "spach_xxs_patch16_224_attn",  # single-stage: the other layout
    "mlp": "spach_ms_xxs_patch4_224_mlp",
    "hybrid": "spach_ms_xs_patch4_224_hybrid",
}


def random_weights(tmp_path, name, **kw):
    """A checkpoint of random weights everywhere (the default init's zero head would make any export 'exact')."""
    model = randomize_(spach.create_model(name, **{**TINY, **kw})).eval()
    path = save_weights(model.state_dict(), {}, tmp_path / "weights", "safetensors")
    return model, path


def run_exported(path, fmt, x):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return torch.jit.load(str(path))(x)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_each_family(tmp_path, family, fmt):
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export needs pip install 'spach[onnx]'")
    name = FAMILIES[family]
    model, weights = random_weights(tmp_path, name)
    assert model.family == family
    out = tmp_path / f"model.{fmt}"
    r = export(name, out, fmt, pretrained=str(weights), model_kwargs=TINY)
    print(f"{family} {fmt}: max abs error {r['max_abs_error']:.2e}")
    assert r["max_abs_error"] <= TOLERANCE and r["input_shape"] == ["batch", 3, 64, 64] and out.stat().st_size == r["bytes"]
    x = torch.randn(5, 3, 64, 64)  # a batch size the export never saw: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1  # a real check, not zeros against zeros
    torch.testing.assert_close(run_exported(out, fmt, x), expected, atol=TOLERANCE, rtol=0)


# the mixers that came after SPACH (spach.models.window, dwconv, gmlp, focal), in a pyramid on 16, 8, 4, 2 grids
MODERN = {m: dict(TINY, patch_size=4, net_arch=[[["conv", 1]], [[m, 2]], [[m, 1]], [[m, 1]]])
          for m in ("window4", "dwconv7", "gmlp", "focal2")}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("mixer", sorted(MODERN))
def test_export_each_modern_mixer(tmp_path, mixer, fmt):
    """Window attention's roll and mask, the large depthwise kernels, gMLP's token map and focal
    modulation's levels all export to both formats and run there as in PyTorch."""
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export needs pip install 'spach[onnx]'")
    model, weights = random_weights(tmp_path, "spach", **MODERN[mixer])
    out = tmp_path / f"model.{fmt}"
    r = export("spach", out, fmt, pretrained=str(weights), model_kwargs=MODERN[mixer])
    print(f"{mixer} {fmt}: max abs error {r['max_abs_error']:.2e}")
    assert r["max_abs_error"] <= TOLERANCE
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(run_exported(out, fmt, x), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("mixer", ["gatedconv", "scan"])
def test_export_the_mixers_after_spach(tmp_path, mixer, fmt):
    """One block on a 2x2 grid keeps the ONNX export of the scan's chunk loops short (the trace unrolls them)."""
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export needs pip install 'spach[onnx]'")
    kw = dict(TINY, img_size=32, net_arch=[(mixer, 1)])
    name = FAMILIES["attn"]
    model, weights = random_weights(tmp_path, name, **kw)
    r = export(name, tmp_path / f"model.{fmt}", fmt, pretrained=str(weights), model_kwargs=kw)
    print(f"{mixer} {fmt}: max abs error {r['max_abs_error']:.2e}")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1 and r["max_abs_error"] <= TOLERANCE
    torch.testing.assert_close(run_exported(tmp_path / f"model.{fmt}", fmt, x), expected, atol=TOLERANCE, rtol=0)


def test_export_cli_from_a_checkpoint_at_another_resolution(tmp_path, capsys):
    _, weights = random_weights(tmp_path, FAMILIES["conv"])
    out = tmp_path / "sub" / "conv.pt"
    main(["export", FAMILIES["conv"], "--pretrained", str(weights), "--model-kwargs", json.dumps(TINY),
          "--img-size", "96", "--format", "torchscript", "--output", str(out)])
    line = capsys.readouterr().out
    # issue 26.6: the line names the checkpoint it exported, as --format timm's does
    assert line.startswith(f"exported {FAMILIES['conv']} ({weights}) to {out} (torchscript") and "3x96x96, dynamic batch" in line
    assert torch.jit.load(str(out))(torch.randn(2, 3, 96, 96)).shape == (2, 7)


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main(["export", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_export_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.onnx"
    mlp = ["--model-kwargs", json.dumps(TINY)]
    assert "unknown export format 'tflite'; choose onnx, torchscript or timm" in cli_error(
        capsys, FAMILIES["conv"], "--format", "tflite", "--output", str(out))
    err = cli_error(capsys, FAMILIES["mlp"], *mlp, "--img-size", "32", "--format", "torchscript", "--output", str(out))
    assert "is tied to 64x64 by its weights" in err and "--img-size 64" in err
    assert "name the model to export" in cli_error(capsys, "--format", "onnx", "--output", str(out))
    assert "does not run at 2x2" in cli_error(capsys, FAMILIES["conv"], *mlp, "--img-size", "2", "--format",
                                                "torchscript", "--output", str(out))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert "ONNX export needs onnxscript: pip install 'spach[onnx]'" in cli_error(
        capsys, FAMILIES["conv"], "--format", "onnx", "--output", str(out))
    assert not out.exists()


def test_a_failed_check_writes_no_file(tmp_path, monkeypatch):
    from spach import export as export_module

    monkeypatch.setitem(export_module._RUNNERS, "torchscript", lambda path: lambda x: torch.full((len(x), 7), 1.0))
    _, weights = random_weights(tmp_path, FAMILIES["conv"])
    out = tmp_path / "x.pt"
    with pytest.raises(SpachError, match="differs from PyTorch by .* was not written"):
        export(FAMILIES["conv"], out, "torchscript", pretrained=str(weights), model_kwargs=TINY)
    assert not out.exists()


def scratch_left(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".spach-export-tmp-"))


SLOW_EXPORT = """
import sys, time
import spach.export as e
real = e._EXPORTERS["torchscript"]
def slow(net, example, path):
    path.write_bytes(b"half a file")
    print("exporting", flush=True)
    time.sleep(60)
    real(net, example, path)
e._EXPORTERS["torchscript"] = slow
from spach.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT to an export started in the background"])
def test_sigterm_mid_export_leaves_nothing(stop, tmp_path):
    """The export works beside its output (not in /tmp) and a SIGTERM there removes its scratch folder; so
    does SIGINT, also to an export started with SIGINT ignored (as a shell starts a background job)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out" / "conv.pt"
    src = str(Path(spach.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    proc = spawn([sys.executable, "-c", SLOW_EXPORT, "export", FAMILIES["conv"], "--model-kwargs", json.dumps(TINY),
                  "--format", "torchscript", "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, env=env, background=stop != "SIGTERM")
    assert proc.stdout.readline() == "exporting\n"
    assert len(scratch_left(out.parent)) == 1  # beside the output, holding the half-written file
    proc.send_signal(signal.SIGTERM if stop == "SIGTERM" else signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err == "spach export: interrupted\n"
    assert not out.exists() and scratch_left(out.parent) == []


def test_ctrl_c_and_a_killed_export_leave_nothing(tmp_path, monkeypatch):
    from spach import export as export_module
    from spach.files import FolderLock

    out = tmp_path / "conv.pt"
    # a scratch folder of an export killed with SIGKILL (nobody holds its lock) and one of a running export
    dead = tmp_path / ".spach-export-tmp-999999-dead"
    dead.mkdir()
    (dead / "model.torchscript").write_bytes(b"x" * 100)
    running = FolderLock(tmp_path / ".spach-export-tmp-1-running").acquire()

    def interrupted(net, example, path):
        path.write_bytes(b"half")
        assert scratch_left(tmp_path) == [".spach-export-tmp-1-running", path.parent.name]  # the dead one is gone
        raise KeyboardInterrupt

    monkeypatch.setitem(export_module._EXPORTERS, "torchscript", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(FAMILIES["conv"], out, "torchscript", model_kwargs=TINY)
    assert scratch_left(tmp_path) == [".spach-export-tmp-1-running"] and not out.exists()
    running.release()


def test_bad_output_and_sizes_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from spach import export as export_module

    def no_work(*a, **k):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(export_module, "build", no_work)
    conv = [FAMILIES["conv"], "--format"]
    assert f"--output {tmp_path} is a folder; pass the path of the file to write, e.g. {tmp_path / 'model.torchscript'}" \
        in cli_error(capsys, *conv, "torchscript", "--output", str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    assert f"--output {tmp_path} already holds files; the timm format writes a folder of its own" in cli_error(
        capsys, *conv, "timm", "--output", str(tmp_path))
    assert "notes.txt is a file; the timm format writes a folder: pass a new or empty folder" in cli_error(
        capsys, *conv, "timm", "--output", str(tmp_path / "notes.txt"))
    assert "is a file, not a folder" in cli_error(capsys, *conv, "torchscript", "--output", str(tmp_path / "notes.txt" / "m.pt"))
    assert "--img-size must lie in 1..4096 (0: the model's own), got 100000" in cli_error(
        capsys, *conv, "torchscript", "--img-size", "100000", "--output", str(tmp_path / "m.pt"))
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    # crafted settings stored in a checkpoint: one line naming the file and the value
    weights = tmp_path / "w.safetensors"
    for key, value in (("img_size", "big"), ("model_kwargs", 5), ("img_size", 100000), ("model", ["x"])):
        args = {"model": FAMILIES["conv"], key: value}
        save_file({"head.weight": torch.zeros(7, 8)}, str(weights), {"format": "pt", "args": json.dumps(args)})
        err = cli_error(capsys, "--pretrained", str(weights), "--format", "torchscript", "--output", str(tmp_path / "m.pt"))
        assert f"checkpoint {weights} stores" in err and key in err and "re-save it" in err  # one line (cli_error)
    err = cli_error(capsys, FAMILIES["conv"], "--model-kwargs", '{"hidden_dim": "wide"}', "--format", "torchscript",
                    "--output", str(tmp_path / "m.pt"))
    assert "hidden_dim must be an integer" in err

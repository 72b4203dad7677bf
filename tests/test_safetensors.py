"""Model weights as safetensors: `spach train --save-format safetensors`, read back by the one loader
(`read_checkpoint`: `spach eval`, `spach.create_model(pretrained=...)`, timm), told by content."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_process
from test_engine import TINY, tiny_cfg

import spach
from spach.errors import CheckpointError
from spach.files import is_safetensors, read_safetensors
from spach.models.convert import read_checkpoint
from spach.train import checkpoint, engine
from spach.train.config import ConfigError, TrainConfig
from spach.train.evaluate import evaluate_checkpoint


def test_train_saves_best_and_final_weights_as_safetensors(tmp_path):
    run = tmp_path / "run"
    summary = engine.train(tiny_cfg(run, save_format="safetensors", log="none", amp="off"))  # eval below is fp32
    names = {p.name for p in run.iterdir()}
    assert {"best.safetensors", "final.safetensors", "checkpoint.pth"} <= names and "best.pth" not in names
    final, meta = read_safetensors(run / "final.safetensors")
    assert meta["args"]["model_kwargs"] == TINY and meta["epoch"] == 2 and meta["format"] == "pt"
    resume_ckpt = torch.load(run / "checkpoint.pth", weights_only=True)  # the resume checkpoint stays torch
    assert resume_ckpt.keys() >= {"model", "optimizer"} and all(torch.equal(final[k], v) for k, v in resume_ckpt["model"].items())
    # the one loader reads it, so eval brings the model from the metadata, and create_model loads it
    r = evaluate_checkpoint(None, str(run / "final.safetensors"), None, "tiny")
    assert r["model"] == "spach" and abs(r["top1"] - summary["final_top1"]) < 1e-6
    model = spach.create_model("spach", pretrained=str(run / "best.safetensors"), num_classes=4, in_chans=1, img_size=32, **TINY)
    assert torch.equal(model.state_dict()["head.weight"], read_checkpoint(run / "best.safetensors")["head.weight"])


def test_cli_eval_of_a_safetensors_checkpoint(tmp_path):
    engine.train(tiny_cfg(tmp_path / "run", epochs=1, save_format="safetensors", log="none"))
    env = {**os.environ, "PYTHONPATH": str(Path(spach.__file__).parents[1])}  # the spach under test, wherever cwd is
    p = run_process([sys.executable, "-m", "spach", "eval", "--pretrained", "run/best.safetensors", "--dataset", "tiny"],
                    capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.startswith("spach on tiny (64 images): top1"), p.stderr


def test_format_told_by_content_and_shared_weights(tmp_path):
    # a shared spatial mixer puts one tensor under several names: saved as copies, loaded back as one model
    model = spach.create_model("spach", net_arch=[[("mlp", 3)]], shared_spatial_func=True, hidden_dim=8, img_size=32, patch_size=8)
    path = checkpoint.save_weights(model.state_dict(), {"note": "x"}, tmp_path / "w", "safetensors")
    renamed = path.rename(tmp_path / "weights.pth")  # the name does not matter, the content does
    assert is_safetensors(renamed) and not is_safetensors(checkpoint.save_weights(model.state_dict(), {}, tmp_path / "t", "torch"))
    again = spach.create_model("spach", pretrained=str(renamed), net_arch=[[("mlp", 3)]], shared_spatial_func=True,
                               hidden_dim=8, img_size=32, patch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert checkpoint.read_args(renamed) == {}


def test_timm_loads_safetensors(tmp_path):
    import timm

    model = spach.create_model("spach_ms_xxs_patch4_224_conv", hidden_dim=8, num_heads=1)
    path = checkpoint.save_weights(model.state_dict(), {}, tmp_path / "w", "safetensors")
    again = timm.create_model("spach_ms_xxs_patch4_224_conv", pretrained=True, hidden_dim=8, num_heads=1,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_bad_files_and_values(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="cut.safetensors: its safetensors header is missing or corrupt"):
        read_checkpoint(tmp_path / "cut.safetensors")
    model = spach.create_model("spach", net_arch=[("conv", 1)], hidden_dim=8, img_size=32, patch_size=8)
    data = checkpoint.save_weights(model.state_dict(), {}, tmp_path / "w", "safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])  # header intact, tensor data cut short
    with pytest.raises(CheckpointError, match="cannot read .*short.safetensors"):
        read_checkpoint(tmp_path / "short.safetensors")
    with pytest.raises(ConfigError, match="must be one of torch, safetensors"):
        TrainConfig(save_format="pickle")
    assert json.dumps(TrainConfig(save_format="safetensors").save_format) == '"safetensors"'


def _small_weights(tmp_path, tensors=None, **meta) -> tuple[Path, dict]:
    arch = dict(net_arch=[("conv", 1)], hidden_dim=8, patch_size=8)
    kw = dict(arch, img_size=32, in_chans=1, num_classes=4)  # as the tiny data set
    sd = spach.create_model("spach", **kw).state_dict()
    path = checkpoint.save_weights(tensors(sd) if tensors else sd, {"args": {"model": "spach", "model_kwargs": arch}, **meta},
                                   tmp_path / "w", "safetensors")
    return path, kw


def test_integer_tensors_for_float_weights_are_refused_in_one_line(tmp_path):
    # the float32 bytes relabelled as int32: the same shapes and sizes, so only the dtype tells
    path, kw = _small_weights(tmp_path, lambda sd: {k: v.view(torch.int32) if v.is_floating_point() else v
                                                    for k, v in sd.items()})
    expected = r"not floating point: stem\.proj\.weight is int32, expected floating point \(float32\), .*re-save it"
    for load in (lambda: spach.create_model("spach", pretrained=str(path), **kw),
                 lambda: evaluate_checkpoint(None, str(path), None, "tiny")):
        with pytest.raises(CheckpointError, match=expected) as e:
            load()
        assert "\n" not in str(e.value)
    import timm
    zoo = dict(hidden_dim=8, num_heads=1)
    sd = spach.create_model("spach_ms_xxs_patch4_224_conv", **zoo).state_dict()
    relabelled = checkpoint.save_weights({k: v.view(torch.int32) for k, v in sd.items()}, {}, tmp_path / "zoo", "safetensors")
    with pytest.raises(CheckpointError, match=expected):
        timm.create_model("spach_ms_xxs_patch4_224_conv", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(relabelled)), **zoo)
    # half precision is a floating point: loaded (cast) as before
    half, _ = _small_weights(tmp_path, lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    spach.create_model("spach", pretrained=str(half), **kw)


@pytest.mark.parametrize("stored, problem", [
    ({"img_size": "big"}, "img_size (it must be int, got 'big')"),
    ({"img_size": [32, "x"]}, "img_size (it must be int, got [32, 'x'])"),
    ({"mean": "x"}, "mean (it must be list, got 'x')"),
    ({"model": 5}, "model (it must be str, got 5)"),
])
def test_crafted_metadata_is_one_line(tmp_path, stored, problem):
    path, kw = _small_weights(tmp_path)
    meta = read_safetensors(path)[1]
    checkpoint.save_weights(read_checkpoint(path), {"args": {**meta["args"], **stored}}, path.with_suffix(""), "safetensors")
    with pytest.raises(CheckpointError) as e:
        evaluate_checkpoint(None, str(path), None, "tiny")
    assert str(e.value) == (f"checkpoint {path} stores an invalid {problem}: the file was altered or not written by spach; "
                            "re-save it from the trained model")


def test_a_torch_file_named_safetensors_says_so(tmp_path):
    path, kw = _small_weights(tmp_path)
    torch.save({"model": read_checkpoint(path)}, tmp_path / "t.safetensors")
    misnamed = tmp_path / "t.safetensors"
    message = f"cannot read checkpoint {misnamed}: it is a PyTorch checkpoint named .safetensors; rename it to .pth"
    for load in (lambda: read_checkpoint(misnamed), lambda: evaluate_checkpoint(None, str(misnamed), None, "tiny")):
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(e.value) == message

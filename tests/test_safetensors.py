"""Model weights as safetensors: `spach train --save-format safetensors`, read back by the one loader
(`read_checkpoint`: `spach eval`, `spach.create_model(pretrained=...)`, timm), told by content."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    p = subprocess.run([sys.executable, "-m", "spach", "eval", "--pretrained", "run/best.safetensors", "--dataset", "tiny"],
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

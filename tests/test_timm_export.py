"""`spach export --format timm`: a zoo model and battle contestants (custom `net_arch`, trained by the
engine in a battle's run-folder layout) written in timm's Hub layout and loaded back with
`timm.create_model("local-dir:...", pretrained=True)`, outputs compared with the original."""
import json

import pytest
import timm
import torch
from conftest import cli_error, memory_cap, randomize_

import spach
from spach.cli import main
from spach.errors import SpachError
from spach.export import export
from spach.train import engine
from spach.train.checkpoint import save_weights
from spach.train.config import config_dict
from spach.train.datasets import TINY_CLASSES
from spach.train.presets import resolve

ZOO = "spach_ms_xxs_patch4_224_conv"
# the default study's contestants, scaled down further
HYBRID_MS = dict(net_arch=[[["conv", 1]], [["conv", 1]], [["attn", 1]]], hidden_dim=8, patch_size=2, num_heads=2)
MLP_SHARED = dict(net_arch=[["mlp", 2]], hidden_dim=8, patch_size=4, num_heads=2, shared_spatial_func=True)


def load_back(folder):
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def same_outputs(a, b, in_chans, size):
    x = torch.randn(3, in_chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = a(x)
        assert expected.abs().max() > 0.01  # a real comparison, not zeros against zeros
        torch.testing.assert_close(b(x), expected, atol=1e-5, rtol=0)


def test_zoo_model_round_trips_through_local_dir(tmp_path):
    model = randomize_(spach.create_model(ZOO, num_classes=10, img_size=32, in_chans=1)).eval()
    weights = save_weights(model.state_dict(), {}, tmp_path / "weights", "safetensors")
    out = tmp_path / "hub"
    r = export(ZOO, out, "timm", pretrained=str(weights), model_kwargs={"img_size": 32})
    assert r["max_abs_error"] <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ZOO and config["num_classes"] == 10 and config["num_features"] == model.num_features
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["img_size"] == [32, 32]
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and "top1" not in config["pretrained_cfg"]
    # issue 26.6: the zoo entry's official notes and source describe the official checkpoint, not these weights
    assert not {"notes", "origin_url", "license"} & set(config["pretrained_cfg"])
    assert "official" not in (out / "README.md").read_text()
    loaded = load_back(out)
    assert type(loaded) is type(model) and loaded.config == model.config
    same_outputs(model, loaded, 1, 32)
    # without pretrained=True timm builds the same architecture (fresh weights), as for any timm name
    fresh = timm.create_model(f"local-dir:{out}")
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_trained_battle_contestant_exports_from_its_run_folder(tmp_path, capsys):
    """A contestant with its own net_arch, trained by the engine where a battle keeps its runs."""
    run = tmp_path / "battles" / "default" / "runs" / "hybrid-ms" / "seed0"
    cfg = resolve("tiny", model="spach", model_kwargs=HYBRID_MS, output=str(run), progress="none", epochs=1)
    summary = engine.train(cfg)
    out = tmp_path / "hybrid-ms-timm"
    main(["export", str(run), "--format", "timm", "--output", str(out)])
    line = capsys.readouterr().out
    assert line.startswith(f"exported spach ({run / 'best.pth'}) to {out}/ (timm: config.json, model.safetensors, README.md")
    assert "timm.create_model('local-dir:" in line and line.count("\n") == 1
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "spach" and config["model_args"]["net_arch"] == HYBRID_MS["net_arch"]
    assert config["label_names"] == TINY_CLASSES
    pcfg = config["pretrained_cfg"]
    assert (pcfg["mean"], pcfg["std"], pcfg["interpolation"], pcfg["crop_pct"]) == ([0.2], [0.3], "bilinear", 1.0)
    assert pcfg["input_size"] == [1, 32, 32] and pcfg["num_classes"] == 4
    card = (out / "README.md").read_text()
    assert f"Top-1 {summary['best_top1']:.2f}%" in card and "Trained with spach on tiny for 1 epoch(s)" in card
    assert "epoch(s) (of 1), batch 32, lr 0.003125, seed 0." in card  # the lr as used: 5e-2 x 32 / 512
    arch = json.dumps(HYBRID_MS["net_arch"])
    assert f"A custom SPACH model (`net_arch` {arch}), battle contestant `hybrid-ms` (seed0)" in card
    original = spach.create_model("spach", **HYBRID_MS, num_classes=4, in_chans=1, img_size=32, pretrained=run / "best.pth")
    original.eval()
    same_outputs(original, load_back(out), 1, 32)
    # the contestant's folder holds one run per seed: it says which to pass
    with pytest.raises(SpachError, match=r"holds the runs seed0: pass one, e\.g\. .*seed0"):
        export(str(run.parent), tmp_path / "x", "timm")


def test_shared_weights_contestant_round_trips(tmp_path):
    """One spatial MLP shared by all blocks: tensors sharing memory, which safetensors refuses as they are."""
    cfg = resolve("tiny", model="spach", model_kwargs=MLP_SHARED, output=str(tmp_path / "run"), img_size=32)
    model = randomize_(spach.create_model("spach", **MLP_SHARED, num_classes=4, in_chans=1, img_size=32)).eval()
    info = {"args": {**config_dict(cfg), "lr": "[x](javascript:alert(1))\x1b[2J"}, "epoch": 3, "top1": 61.5}
    weights = save_weights(model.state_dict(), info, tmp_path / "run" / "best", "torch")
    out = tmp_path / "hub"
    export(None, out, "timm", pretrained=str(weights))
    assert json.loads((out / "config.json").read_text())["model_args"]["shared_spatial_func"] is True
    card = (out / "README.md").read_text()
    assert "Top-1 61.50% on the validation split of tiny (these weights, epoch 3)" in card
    assert "](" not in card and "\x1b" not in card  # text read from a file stays plain text
    same_outputs(model, load_back(out), 1, 32)


def test_the_folder_loads_as_a_hub_repository(tmp_path, monkeypatch):
    """Uploaded as it is, the folder loads with `hf-hub:`: here from the Hub client's cache layout, offline,
    with the network blocked (what `hf_hub_download` finds after an upload and a first download)."""
    import shutil
    import socket

    import huggingface_hub.constants

    def no_network(*a, **k):
        raise OSError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = randomize_(spach.create_model("spach", **HYBRID_MS, num_classes=4, in_chans=1, img_size=32)).eval()
    weights = save_weights(model.state_dict(), {}, tmp_path / "weights", "safetensors")
    export("spach", tmp_path / "hub", "timm", pretrained=str(weights), model_kwargs={**HYBRID_MS, "img_size": 32})
    repo = tmp_path / "cache" / "models--someone--spach-hybrid"
    shutil.copytree(tmp_path / "hub", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    loaded = timm.create_model("hf-hub:someone/spach-hybrid", pretrained=True, cache_dir=str(tmp_path / "cache")).eval()
    assert loaded.pretrained_cfg["hf_hub_id"] == "someone/spach-hybrid"
    same_outputs(model, loaded, 1, 32)


def test_a_timm_baseline_round_trips(tmp_path):
    """A battle may pit a timm model against SPACH: timm's factory recorded its arguments."""
    cfg = resolve("tiny", model="test_vit", output=str(tmp_path / "run"), img_size=32)
    model = randomize_(timm.create_model("test_vit", num_classes=4, in_chans=1, img_size=32)).eval()
    weights = save_weights(model.state_dict(), {"args": config_dict(cfg)}, tmp_path / "run" / "best", "safetensors")
    export(str(tmp_path / "run"), tmp_path / "hub", "timm")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["model_args"]["img_size"] == [32, 32] and weights.is_file()
    same_outputs(model, load_back(tmp_path / "hub"), 1, 32)


def test_an_image_folder_run_keeps_the_models_preprocessing_and_its_class_folders(tmp_path):
    data = tmp_path / "data"
    for name in ("dog", "cat", "ant"):
        (data / "train" / name).mkdir(parents=True)
    small = dict(hidden_dim=16, num_heads=2)
    cfg = resolve(None, model=ZOO, model_kwargs=small, data_path=str(data), img_size=64, output=str(tmp_path / "run"))
    model = randomize_(spach.create_model(ZOO, num_classes=3, img_size=64, **small)).eval()
    weights = save_weights(model.state_dict(), {"args": config_dict(cfg)}, tmp_path / "run" / "best", "safetensors")
    export(None, tmp_path / "hub", "timm", pretrained=str(weights))
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    assert config["label_names"] == ["ant", "cat", "dog"] and pcfg["input_size"] == [3, 64, 64]
    assert (pcfg["interpolation"], pcfg["crop_pct"], pcfg["mean"]) == ("bicubic", 0.875, list(model.pretrained_cfg["mean"]))
    same_outputs(model, load_back(tmp_path / "hub"), 3, 64)


# issue 26.2: a config.json is data; what it asks for gets the limits every other way of building a model gets
@pytest.mark.parametrize("args, match", [
    (dict(img_size=100000), r"^spach_xxs_patch16_224_mlp: img_size 100000 is larger than 4096 pixels, the most spach builds"),
    (dict(img_size=[4096, 4096], net_arch=[[["mlp", 8]]]),
     r"^spach_xxs_patch16_224_mlp with these settings would have 34\.4G parameters \(137 GB of float32 weights; "
     r"stages\.0\.blocks\.0\.mixer\.fc1\.weight alone 8\.6 GB\), more than the 2\.1G spach builds; lower img_size"),
])
def test_a_local_dir_config_asking_for_a_huge_model_is_refused_before_any_memory_is_taken(tmp_path, args, match):
    config = {"architecture": "spach_xxs_patch16_224_mlp", "num_classes": 10, "model_args": {"num_classes": 10, **args},
              "pretrained_cfg": {"input_size": [3, 224, 224], "num_classes": 10}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for pretrained in (True, False):
        with pytest.raises(SpachError, match=match) as e, memory_cap():
            timm.create_model(f"local-dir:{tmp_path}", pretrained=pretrained)
        assert len(str(e.value).splitlines()) == 1


def test_the_size_limit_holds_for_every_way_of_building(tmp_path, capsys):
    kw = json.dumps({"net_arch": [["mlp", 1]], "hidden_dim": 8, "patch_size": 4, "num_heads": 1})
    with memory_cap():
        err = cli_error(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", kw, "--img-size", "4096",
                         "--output", str(tmp_path / "r")], capsys)
    assert "spach with these settings would have 1099.5G parameters (4,398 GB" in err and not (tmp_path / "r" / "checkpoint.pth").exists()
    with pytest.raises(SpachError, match="smlpnet_tiny: img_size 8192 is larger than 4096"):
        spach.create_model("smlpnet_tiny", img_size=8192)
    with torch.device("meta"):  # a probe on the meta device takes no memory: not refused
        assert spach.create_model("spach", net_arch=[["mlp", 1]], hidden_dim=8, patch_size=4, img_size=4096) is not None

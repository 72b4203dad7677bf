"""The training data path under bad or hostile input (issues 19 and 20): one line and exit 2, never a
traceback, never code run from a data file, never silently wrong data."""
import json

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_KW, cli_error
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy

import spach
from spach.cli import main
from spach.errors import SpachError
from spach.train import data as data_mod
from spach.train import engine
from spach.train.checkpoint import save_weights
from spach.train.config import TrainConfig
from spach.train.datasets import load_folders
from spach.train.engine import step_loss
from spach.train.evaluate import checked
from spach.train.factory import build_model
from spach.train.runtime import default_workers

def folders(root, classes=("a", "b"), n=4, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def tiny_train(tmp_path, *flags):
    return ["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", TINY_KW, "--output", str(tmp_path / "run"),
            *flags]


# -- 19.1: an error in a data-loader worker is one line naming the image ---------------------------------------------
def failing(img):
    raise ValueError("bits must be between or equal to 1 and 8")


def test_a_worker_error_names_the_image(tmp_path):
    train, _ = load_folders(folders(tmp_path), False)
    cfg = data_mod.TrainConfig(workers=1, batch_size=2)
    loader = data_mod._image_loader(data_mod._with_transform(data_mod.Subset(train, [3, 1]), failing), [0, 1], cfg, 2, False)
    with pytest.raises(SpachError) as e:
        list(checked(loader))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "bits must be between" in msg and "ValueError" in msg
    assert str(tmp_path / "train" / "a" / "3.png") in msg


def test_a_worker_error_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_mod, "pil_train_transform", lambda *a: failing)
    err = cli_error(tiny_train(tmp_path, "--dataset", "imagefolder", "--data-path", str(folders(tmp_path / "d")),
                               "--img-size", "16", "--batch-size", "2", "--workers", "1", "--epochs", "1"), capsys)
    assert "bits must be between" in err and str(tmp_path / "d" / "train") in err


# -- 19.4: smaller defects ----------------------------------------------------------------------------------------------
def test_an_unknown_model_fails_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_mod, "build_data", lambda *a, **k: pytest.fail("data read before the model name was checked"))
    monkeypatch.setattr("spach.train.engine.build_data", data_mod.build_data)
    err = cli_error(["train", "--model", "nosuchmodel", "--data-path", str(tmp_path), "--output", str(tmp_path / "r")], capsys)
    assert "unknown model 'nosuchmodel'" in err
    err = cli_error(["train", "--model", "spach_ms_xxs_patch4_224_cnv", "--data-path", str(tmp_path),
                     "--output", str(tmp_path / "r")], capsys)
    assert "did you mean spach_ms_xxs_patch4_224_conv" in err


def test_default_workers_fit_the_machine(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes share the CPUs
    assert default_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 4
    monkeypatch.undo()
    assert TrainConfig().workers == default_workers()


def test_the_training_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(8, 10), torch.randn(16, 8), torch.randint(0, 10, (16,))
    loss = step_loss(model, LabelSmoothingCrossEntropy(0.1), x, y, torch.device("cpu"), torch.bfloat16)
    assert loss.dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(x)
    assert loss.item() == LabelSmoothingCrossEntropy(0.1)(logits.float(), y).item()


def test_resume_auto_on_a_finished_run_says_so(tmp_path, capsys):
    run = tiny_train(tmp_path, "--epochs", "1", "--train-subset", "32", "--val-subset", "16")
    main(run)
    capsys.readouterr()
    main([*run, "--resume", "auto"])
    assert "already finished its 1 epoch(s)" in capsys.readouterr().err


def test_fine_tuning_to_another_class_count_says_the_head_is_fresh(tmp_path, capsys):
    kw = json.loads(TINY_KW)
    torch.save(spach.create_model("spach", num_classes=3, in_chans=1, img_size=32, **kw).state_dict(), tmp_path / "w.pth")
    cfg = TrainConfig(model="spach", model_kwargs=kw, pretrained=str(tmp_path / "w.pth"))
    build_model(cfg, 3, 1, 32)
    assert capsys.readouterr().err == ""
    build_model(cfg, 4, 1, 32)
    assert "has a 3-class head; head starts freshly initialised for 4 classes" in capsys.readouterr().err


def test_a_timm_baseline_keeps_a_fitting_head(tmp_path):
    own = timm.create_model("resnet18", num_classes=10)
    torch.save(own.state_dict(), tmp_path / "r.pth")
    net = build_model(TrainConfig(model="resnet18", pretrained=str(tmp_path / "r.pth"), drop_path=0.0), 10, 3)
    assert torch.equal(net.fc.weight, own.fc.weight)  # timm alone would re-initialise it (num_classes != 1000)


# -- 20.1: stored settings do not widen what a file can do; flags are not bypassed ---------------------------------------
@pytest.mark.parametrize("extra, match", [
    ({"num_classes": 3}, "--model-kwargs may not set num_classes (it comes from the dataset)"),
    ({"in_chans": 3}, "--model-kwargs may not set in_chans (it comes from the dataset)"),
    ({"img_size": 64}, "--model-kwargs may not set img_size (use --img-size)"),
    ({"img_size": [32, "x"]}, "--model-kwargs may not set img_size (use --img-size)"),
    ({"drop_path_rate": 7}, "--model-kwargs may not set drop_path_rate (use --drop-path)"),
    ({"drop_rate": 0.1}, "--model-kwargs may not set drop_rate (use --drop)"),
    ({"pretrained": True}, "--model-kwargs may not set pretrained: it would make building the model load"),
    ({"pretrained_cfg_overlay": {"file": "x.pth"}}, "--model-kwargs may not set pretrained_cfg_overlay"),
    ({"features_only": True}, "--model-kwargs may not set features_only"),
])
def test_model_kwargs_that_collide_with_flags_or_widen_loading(tmp_path, capsys, extra, match):
    kw = json.dumps({**json.loads(TINY_KW), **extra})
    err = cli_error(["train", "--preset", "tiny", "--model", "spach", "--model-kwargs", kw, "--output", str(tmp_path / "r")],
                    capsys)
    assert match in err


STORED = {"pretrained_cfg_overlay": {"file": "other.pth"}, "pretrained": True, "checkpoint_path": "x",
          # issue 26.2: keys with a flag of their own were silently ignored (eval) or used (export's img_size)
          "img_size": 64, "num_classes": 7, "in_chans": 1, "drop_path_rate": 0.1, "drop_rate": 0.1}


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("key", list(STORED))
def test_stored_model_kwargs_cannot_widen_loading(tmp_path, capsys, fmt, key):
    kw = json.loads(TINY_KW)
    state = spach.create_model("spach", num_classes=4, in_chans=1, img_size=32, **kw).state_dict()
    value = STORED[key]
    args = {"model": "spach", "model_kwargs": {**kw, key: value}, "img_size": 32}
    path = save_weights(state, {"args": args}, tmp_path / "w", fmt)
    err = cli_error(["eval", "--pretrained", str(path), "--dataset", "tiny"], capsys)
    assert f"checkpoint {path} stores model_kwargs that may not set {key}" in err
    err = cli_error(["export", "--pretrained", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.pt")],
                    capsys)
    assert f"may not set {key}" in err and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_model_kwargs_must_be_a_json_object(tmp_path, capsys, command):
    args = {"train": ["train", "--preset", "tiny", "--model", "spach", "--output", str(tmp_path / "r")],
            "eval": ["eval", "--model", "spach", "--pretrained", str(tmp_path / "w.pth"), "--dataset", "tiny"],
            "export": ["export", "spach", "--format", "torchscript", "--output", str(tmp_path / "m.pt")]}[command]
    err = cli_error(args + ["--model-kwargs", "[1]"], capsys)
    assert "--model-kwargs must be a JSON object of model arguments, not '[1]'; e.g. --model-kwargs" in err


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_stored_model_kwargs_must_be_a_json_object(tmp_path, capsys, fmt):
    kw = json.loads(TINY_KW)
    state = spach.create_model("spach", num_classes=4, in_chans=1, img_size=32, **kw).state_dict()
    path = save_weights(state, {"args": {"model": "spach", "model_kwargs": [1, 2], "img_size": 32}}, tmp_path / "w", fmt)
    expected = f"checkpoint {path} stores model_kwargs = [1, 2], not a JSON object: the file was altered"
    assert expected in cli_error(["eval", "--pretrained", str(path), "--dataset", "tiny"], capsys)
    assert expected in cli_error(["export", "--pretrained", str(path), "--format", "torchscript", "--output",
                                  str(tmp_path / "m.pt")], capsys)


# -- 20.2: silent wrong data -------------------------------------------------------------------------------------------
def test_16_bit_pngs_are_scaled_not_saturated(tmp_path):
    root = folders(tmp_path)
    wide = np.full((8, 8), 40000, np.uint16)
    wide[0, 0] = 65535
    Image.fromarray(wide).save(root / "train" / "a" / "0.png")  # a 16-bit greyscale PNG
    train, _ = load_folders(root, False)
    assert Image.open(root / "train" / "a" / "0.png").mode in ("I;16", "I")
    img = np.asarray(train[0][0])
    assert img.shape == (8, 8, 3) and img[0, 0].tolist() == [255] * 3 and (img[1:, 1:] == 156).all()  # 40000 / 257


@pytest.mark.parametrize("target", [".", "../../b", "../.."])
def test_a_folder_reached_twice_is_refused(tmp_path, target):
    root = folders(tmp_path)
    (root / "train" / "a" / "sub").mkdir()
    (root / "train" / "a" / "sub" / "loop").symlink_to(target, target_is_directory=True)
    with pytest.raises(SpachError, match=r"loop leads to .*, a folder already read .*remove the link") as e:
        load_folders(root, False)
    assert len(str(e.value).splitlines()) == 1


def test_symlinked_class_folders_still_work(tmp_path):
    real = folders(tmp_path / "real")
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").symlink_to(real / "val")
    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).symlink_to(real / "train" / c)
    train, val = load_folders(tmp_path / "d", False)
    assert len(train) == len(val) == 8


def test_a_one_class_folder_is_refused(tmp_path, capsys):
    root = folders(tmp_path, classes=("only",))
    err = cli_error(tiny_train(tmp_path, "--dataset", "imagefolder", "--data-path", str(root)), capsys)
    assert "holds 1 class folder (only): training a classifier needs >= 2 classes" in err


@pytest.mark.parametrize("flag, value, match", [
    ("--train-subset", "257", "--train-subset 257 is more than the 256 training images of tiny"),
    ("--val-subset", "65", "--val-subset 65 is more than the 64 validation images of tiny"),
    ("--eval-train-subset", "300", "--eval-train-subset 300 is more than the 256 training images of tiny"),
])
def test_a_subset_larger_than_the_data(tmp_path, capsys, flag, value, match):
    assert match in cli_error(tiny_train(tmp_path, flag, value), capsys)


def test_a_nan_loss_in_the_first_epoch_claims_no_checkpoint(tmp_path, monkeypatch):
    build = engine.build_model

    def nan_model(*args, **kw):
        model = build(*args, **kw)
        model.register_forward_hook(lambda m, i, out: out * float("nan") if m.training else out)
        return model

    monkeypatch.setattr(engine, "build_model", nan_model)
    cfg = engine.TrainConfig(dataset="tiny", model="spach", model_kwargs=json.loads(TINY_KW), output=str(tmp_path / "r"),
                             progress="none", workers=0, batch_size=32, aa="none", mixup=0.0, cutmix=0.0, model_ema=False)
    with pytest.raises(SpachError) as e:
        engine.train(cfg)
    assert "no checkpoint had been written" in str(e.value) and "last good" not in str(e.value)
    assert not (tmp_path / "r" / "checkpoint.pth").exists()


# -- 20.4: one line, never a traceback ----------------------------------------------------------------------------------
def test_resume_from_weights_only_says_how_to_use_them(tmp_path, capsys):
    run = tiny_train(tmp_path, "--epochs", "1", "--train-subset", "32", "--val-subset", "16", "--save-format", "safetensors")
    main(run)
    best = tmp_path / "run" / "best.safetensors"
    torch.save(torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"], tmp_path / "bare.pth")
    for weights in (best, tmp_path / "run" / "final.safetensors", tmp_path / "bare.pth"):
        err = cli_error([*tiny_train(tmp_path / "new", "--epochs", "2"), "--resume", str(weights)], capsys)
        assert f"--resume {weights} is not a resumable training checkpoint" in err
        assert f"--pretrained {weights}" in err
    torch.save({"model": torch.load(tmp_path / "bare.pth"), "epoch": 1, "top1": 50.0}, tmp_path / "best.pth")  # best.pth's form
    err = cli_error([*tiny_train(tmp_path / "new", "--epochs", "2"), "--resume", str(tmp_path / "best.pth")], capsys)
    assert "is not a resumable training checkpoint" in err


@pytest.mark.parametrize("flags, match", [
    (["--seed", "99999999999999999999"], "--seed must be <= 4294967295, got 99999999999999999999"),
    (["--seed", "4294967296"], "--seed must be <= 4294967295"),
    (["--img-size", "100000"], "--img-size must be <= 4096, got 100000"),
])
def test_out_of_range_numbers(tmp_path, capsys, flags, match):
    assert match in cli_error(tiny_train(tmp_path, *flags), capsys)


def test_a_data_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for dataset in ("imagefolder", "cifar10", "fmnist"):
        err = cli_error(tiny_train(tmp_path, "--dataset", dataset, "--data-path", str(tmp_path / "f")), capsys)
        assert f"data path {tmp_path / 'f'} is a file, not a folder" in err


# -- 26.6: a checkpoint that does not fit the data's classes or channels blames the data, not the checkpoint --------
@pytest.mark.parametrize("classes, chans, match", [
    (7, 1, "classifies 7 classes but the tiny data holds 4: score it on the data it was trained on, or fine-tune it to "
           "these classes first: spach train --model spach --pretrained {w} --dataset tiny"),
    (4, 3, "takes 3-channel images but the tiny data holds 1-channel ones: score it on the data it was trained on"),
])
def test_eval_of_a_checkpoint_for_other_classes_or_channels_names_the_data(tmp_path, capsys, classes, chans, match):
    w = tmp_path / "w.pth"
    torch.save(spach.create_model("spach", num_classes=classes, in_chans=chans, img_size=32, **json.loads(TINY_KW)).state_dict(), w)
    err = cli_error(["eval", "--model", "spach", "--model-kwargs", TINY_KW, "--pretrained", str(w), "--dataset", "tiny"], capsys)
    assert err == f"spach eval: error: checkpoint {w} {match.format(w=w)}"


# -- 26.6: a run never stays in warm-up: the default is cut to fit (said, recorded), a given one too long refused -----
def test_a_default_warmup_is_cut_to_fit_the_run_and_a_given_one_must_fit(tmp_path, capsys):
    from spach.battle.study import parse_study
    from spach.train.config import warmup_note
    from spach.train.presets import PRESETS

    err = cli_error(tiny_train(tmp_path, "--epochs", "2", "--warmup-epochs", "2"), capsys)
    assert err == ("spach train: error: --warmup-epochs must be fewer than the run's epochs (2 >= 2): it would never "
                   "leave its warm-up; lower it (0: no warm-up)")
    assert TrainConfig(epochs=300).warmup_epochs == 20 and TrainConfig(epochs=21).warmup_epochs == 20  # DeiT's, as is
    assert TrainConfig(epochs=2, warmup_epochs=1.5).warmup_epochs == 1.5
    recipe = {k: v for k, v in PRESETS["tiny"].items() if k != "warmup_epochs"}  # 2 epochs, TrainConfig's warm-up
    cfg = TrainConfig(**recipe, model="spach", model_kwargs=json.loads(TINY_KW), output=str(tmp_path / "r"), progress="none")
    assert cfg.warmup_epochs == 0.1333  # 2 x 20 / 300
    engine.train(cfg)
    note = ("the default warm-up would last the whole run (2 epoch(s)): cut to 0.1333 epochs, DeiT's share (20 of 300); "
            "--warmup-epochs sets it")
    assert warmup_note(cfg) == note and capsys.readouterr().err == f"note: {note}\n"
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["warmup_epochs"] == 0.1333 and config["resolved"]["warmup_note"] == note
    # a preset's warm-up is a default too; a study's is given, and checked with the study
    assert TrainConfig(**{**PRESETS["fmnist"], "epochs": 1}).warmup_epochs == 0.0667
    study = """[study]\nname = "w"\n[data]\ndataset = "tiny"\n[recipe]\nepochs = 2\n{extra}
[[contestant]]\nname = "c"\narch = {{ net_arch = [["conv", 1]], hidden_dim = 8, patch_size = 4 }}\n"""
    s = parse_study(study.format(extra=""))
    assert s.config(s.contestants[0]).warmup_epochs == 0.1333
    with pytest.raises(SpachError, match=r"^study: recipe\.warmup_epochs: must be fewer than the run's epochs \(3 >= 2\)"):
        parse_study(study.format(extra="warmup_epochs = 3"))

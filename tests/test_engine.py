"""Training and evaluation on the built-in tiny set: files, resume == uninterrupted, crash safety,
non-finite loss, bad input, config files, the CLI."""
import json
import os
import signal
import sys

import pytest
import torch
from conftest import run_process

import spach
from spach import files
from spach.errors import CheckpointError, SpachError
from spach.train import checkpoint, engine
from spach.train.config import TrainConfig
from spach.train.evaluate import evaluate_checkpoint
from spach.train.presets import resolve

TINY = dict(net_arch=[[["conv", 1]], [["attn", 1]]], hidden_dim=16, num_heads=2, patch_size=4)
TIMING = {"images_per_s", "epoch_time", "max_mem_mb"}


def tiny_cfg(out, **kw):
    return resolve("tiny", **{"model": "spach", "model_kwargs": TINY, "output": str(out), "progress": "none", **kw})


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_train_writes_the_run_folder(tmp_path):
    seen = []
    summary = engine.train(tiny_cfg(tmp_path / "run", eval_train_subset=32), on_epoch_end=seen.append)
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "checkpoint.pth", "best.pth", "summary.json"} <= {p.name for p in run.iterdir()}
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2] and seen == recs
    for key in ("train_loss", "val_loss", "top1", "top5", "lr", "images_per_s", "epoch_time", "max_mem_mb",
                "train_eval_loss", "train_eval_top1"):
        assert key in recs[-1]
    for key in ("best_top1", "final_top1", "final_val_loss", "final_train_loss", "final_train_eval_loss", "epochs",
                "wall_time_s", "params"):
        assert key in summary
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "tiny" and config["resolved"]["num_classes"] == 4
    # the checkpoint is an official-style dict that spach.create_model loads
    model = spach.create_model("spach", pretrained=str(run / "checkpoint.pth"), num_classes=4, in_chans=1, img_size=32, **TINY)
    assert model.num_classes == 4
    # resume="auto" on a finished run returns its summary without training again
    assert engine.train(tiny_cfg(run, eval_train_subset=32, resume="auto")) == summary


def test_tiny_model_learns(tmp_path):
    summary = engine.train(tiny_cfg(tmp_path, epochs=6))
    recs = records(tmp_path)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] and summary["best_top1"] > 40


RICH = dict(epochs=3, drop_path=0.1, reprob=0.5, mixup=0.8, cutmix=1.0, model_ema=True, model_ema_decay=0.9)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run the resume tests compare with."""
    out = tmp_path_factory.mktemp("full")
    engine.train(tiny_cfg(out, **RICH))
    return out


def final_weights(out):
    return checkpoint.load(out / "checkpoint.pth")["model"]


def assert_same_run(a, b):
    assert without_timing(records(a)) == without_timing(records(b))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_epoch_equals_uninterrupted(tmp_path, full_run):

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_cfg(tmp_path / "cut", **RICH), on_epoch_end=stop_after_first)
    assert len(records(tmp_path / "cut")) == 1
    engine.train(tiny_cfg(tmp_path / "cut", resume="auto", **RICH))
    assert_same_run(full_run, tmp_path / "cut")


def test_sigterm_mid_epoch_saves_and_resume_equals_uninterrupted(tmp_path, monkeypatch, full_run):
    calls = {"n": 0}
    build = engine.build_model

    def build_with_sigterm(*args, **kw):
        model = build(*args, **kw)

        def hook(module, inputs):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 11:  # epoch 2, step 3 of 8
                    os.kill(os.getpid(), signal.SIGTERM)

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", build_with_sigterm)
    old_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_cfg(tmp_path / "cut", **RICH))
    assert signal.getsignal(signal.SIGTERM) is old_handler  # handlers restored
    saved = checkpoint.load(tmp_path / "cut" / "checkpoint.pth")
    assert (saved["epoch"], saved["step"]) == (1, 3)
    monkeypatch.setattr(engine, "build_model", build)
    engine.train(tiny_cfg(tmp_path / "cut", resume="auto", **RICH))
    assert_same_run(full_run, tmp_path / "cut")


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    files.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(fd):
        raise OSError("simulated crash")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(SpachError, match="simulated"):
        files.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left behind


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    build = engine.build_model
    calls = {"n": 0}

    def build_nan_later(*args, **kw):
        model = build(*args, **kw)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > 10:
                    return output * float("nan")

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", build_nan_later)
    with pytest.raises(SpachError, match=r"loss became nan at epoch 2 step 3.*last good checkpoint \(epoch 1\)"):
        engine.train(tiny_cfg(tmp_path))
    saved = checkpoint.load(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == 1 and saved["step"] == 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert len(records(tmp_path)) == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(SpachError, match="unknown model 'spach_nope'"):
        engine.train(tiny_cfg(tmp_path / "a", model="spach_nope"))
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(SpachError, match="unknown dataset"):
        engine.train(tiny_cfg(tmp_path / "a", dataset="mnist-ish"))
    with pytest.raises(SpachError, match="no --data-path"):
        engine.train(tiny_cfg(tmp_path / "a", dataset="imagefolder"))
    with pytest.raises(SpachError, match="data folder .* does not exist"):
        engine.train(tiny_cfg(tmp_path / "a", dataset="imagefolder", data_path=str(tmp_path / "none")))

    run = tmp_path / "run"
    engine.train(tiny_cfg(run, epochs=1))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != files.LOCK_FILE}
    with pytest.raises(SpachError, match="holds a different run .*model_kwargs"):
        engine.train(tiny_cfg(run, epochs=1, resume="auto", model_kwargs={**TINY, "hidden_dim": 32}))
    with pytest.raises(SpachError, match="already holds this run; pass --resume auto"):
        engine.train(tiny_cfg(run, epochs=1))
    with pytest.raises(SpachError, match="holds a different run .*lr"):
        engine.train(tiny_cfg(run, epochs=1, lr=0.5, resume="auto"))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != files.LOCK_FILE} == before  # nothing lost

    other = tmp_path / "other"
    with pytest.raises(CheckpointError, match="another model"):
        engine.train(tiny_cfg(other, model_kwargs={**TINY, "hidden_dim": 32}, resume=str(run / "checkpoint.pth")))
    with pytest.raises(CheckpointError, match="is of model 'spach', not 'spach_ms_xxs_patch4_224_conv'"):
        evaluate_checkpoint("spach_ms_xxs_patch4_224_conv", str(run / "best.pth"), None, "tiny")
    with pytest.raises(CheckpointError, match="does not fit model"):
        evaluate_checkpoint("spach", str(run / "best.pth"), None, "tiny", model_kwargs={**TINY, "hidden_dim": 32})


def test_evaluate_checkpoint_and_timm_baseline(tmp_path):
    run = tmp_path / "run"
    summary = engine.train(tiny_cfg(run, epochs=1))
    r = evaluate_checkpoint(None, str(run / "checkpoint.pth"), None, "tiny", batch_size=16)
    assert r["n"] == 64 and abs(r["top1"] - summary["final_top1"]) < 1e-6
    s = engine.train(tiny_cfg(tmp_path / "vit", epochs=1, model="test_vit", model_kwargs={}))
    assert s["params"] > 0 and s["epochs"] == 1


def test_config_file_and_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('preset = "tiny"\nepochs = 7\nlr = 0.01\n')
    (tmp_path / "c.yaml").write_text("batch-size: 16\nmodel_kwargs: {hidden_dim: 8}\n")
    cfg = resolve(None, str(tmp_path / "c.toml"), lr=0.02)
    assert (cfg.dataset, cfg.epochs, cfg.lr, cfg.preset) == ("tiny", 7, 0.02, "tiny")
    cfg = resolve("tiny", str(tmp_path / "c.yaml"))
    assert cfg.batch_size == 16 and cfg.model_kwargs == {"hidden_dim": 8}
    (tmp_path / "bad.toml").write_text("lr_typo = 1\n")
    with pytest.raises(SpachError, match="unknown training setting.*lr_typo"):
        resolve(None, str(tmp_path / "bad.toml"))
    with pytest.raises(SpachError, match="unknown preset"):
        resolve("imagenet-xl")
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs, cfg.mixup, cfg.cutmix, cfg.reprob, cfg.repeated_aug,
            cfg.drop_path, cfg.model_ema_decay, cfg.smoothing) == (5e-4, 0.05, 20, 300, 0.8, 1.0, 0.25, 3, 0.1, 0.99996, 0.1)


def run_cli(*args, cwd):
    return run_process([sys.executable, "-m", "spach", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_train_eval_and_errors(tmp_path):
    kw = json.dumps(TINY)
    p = run_cli("train", "--preset", "tiny", "--model", "spach", "--model-kwargs", kw, "--epochs", "1", "--output", "run",
                "--no-model-ema", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "epoch 1/1" in p.stdout and json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 1
    p = run_cli("eval", "--pretrained", "run/best.pth", "--dataset", "tiny", "--json", "e.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "top1" in p.stdout and json.loads((tmp_path / "e.json").read_text())["n"] == 64
    p = run_cli("train", "--preset", "tiny", "--model", "spach_nope", "--output", "x", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("spach train: error: unknown model") and p.stderr.count("\n") == 1


def test_per_image_path_with_randaugment(tmp_path):
    s = engine.train(tiny_cfg(tmp_path, epochs=1, aa="rand-m9-mstd0.5-inc1", mixup=0.8, reprob=0.25))
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["tensor_data_path"] is False
    assert s["epochs"] == 1


def image_folders(root, classes, n=8, bad=None):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3)).astype("uint8")
                img[..., c % 3] += 150
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    if bad:
        (root / "train" / classes[0] / bad).write_bytes(b"broken")
    return root


def folder_cfg(out, data, **kw):
    return tiny_cfg(out, **{"dataset": "imagefolder", "data_path": str(data), "img_size": 32, "batch_size": 8, **kw})


def test_image_folders_bad_image_skip_and_finetune(tmp_path):
    data = image_folders(tmp_path / "a", ["r", "g"], bad="zz.png")
    with pytest.raises(SpachError, match=r"cannot read image .*zz\.png"):
        engine.train(folder_cfg(tmp_path / "run", data, epochs=1))
    engine.train(folder_cfg(tmp_path / "run2", data, epochs=1, skip_bad_images=True))
    assert records(tmp_path / "run2")[0]["skipped_images"] == 1
    # fine-tune on 3 classes at another resolution: a new head, the rest from the checkpoint
    other = image_folders(tmp_path / "b", ["r", "g", "b"])
    s = engine.train(folder_cfg(tmp_path / "ft", other, epochs=1, img_size=64, pretrained=str(tmp_path / "run2" / "best.pth")))
    assert s["epochs"] == 1
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["resolved"]["num_classes"] == 3


def test_bf16_autocast_on_cpu(tmp_path):
    s = engine.train(tiny_cfg(tmp_path, epochs=1, amp="bf16"))
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["amp"] == "bfloat16" and s["epochs"] == 1
    with pytest.raises(SpachError, match="amp must be one of auto, bf16, fp16, off, got .fp8."):
        engine.train(tiny_cfg(tmp_path / "x", amp="fp8"))


def test_stop_signal_during_the_final_evaluation_is_not_lost(tmp_path):
    def stop_at_the_end(record):
        if record["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_cfg(tmp_path), on_epoch_end=stop_at_the_end)
    assert (tmp_path / "summary.json").is_file() and len(records(tmp_path)) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_amp_auto_trains_in_bf16_on_cpus_that_have_it_and_evaluates_in_fp32():
    from spach.device import amp_dtype, cpu_has_bf16

    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu, training=True) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu, training=True) is None


def test_a_resumed_run_keeps_the_kernels_it_measured(tmp_path, monkeypatch):
    from spach.models import choice, token_mlp

    mlp = dict(TINY, net_arch=[[["conv", 1]], [["mlp", 1]]])
    monkeypatch.setattr(token_mlp, "MIN_TOKENS", 16)  # the tiny model's 4x4 grid

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_cfg(tmp_path, model_kwargs=mlp), on_epoch_end=stop_after_first)
    saved = checkpoint.load(tmp_path / "checkpoint.pth")["kernels"]
    assert saved == choice.export_choices() and saved["token-MLP"]
    token_mlp.TOKEN_MLP.cache.clear()
    monkeypatch.setattr(token_mlp, "measure", lambda *a, **k: pytest.fail("a kernel measured before was measured again"))
    engine.train(tiny_cfg(tmp_path, model_kwargs=mlp, resume="auto"))
    assert len(records(tmp_path)) == 2


def test_training_on_cpu_keeps_freed_memory_in_the_heap(monkeypatch):
    from spach.train import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert runtime.setup("cpu").device.type == "cpu" and calls == [1]

"""Experiment logs: TensorBoard event files for `spach train` and every battle run (the same scalars
as metrics.jsonl, lr and images/s included), the `log` knob, and Weights & Biases offline."""
import io
import json

import pytest
from test_battle import tiny as tiny_study
from test_engine import records, tiny_cfg

from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.errors import SpachError
from spach.train import engine, logs
from spach.train.config import ConfigError, TrainConfig

tensorboard = pytest.importorskip("tensorboard", reason="TensorBoard logging needs pip install 'spach[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer


def scalars(folder):
    acc = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def numbers(rec):
    return {k: v for k, v in rec.items() if k != "epoch" and isinstance(v, (int, float))}


def test_the_log_knob():
    assert TrainConfig().log == "auto"
    for ok in ("tensorboard", "wandb", "tensorboard,wandb", "none", " TensorBoard , wandb "):
        TrainConfig(log=ok)
    for bad, problem in (("tb", "unknown logger 'tb'"), ("", "is empty"), ("none,tensorboard", "cannot combine")):
        with pytest.raises(ConfigError, match=problem) as e:
            TrainConfig(log=bad)
        assert e.value.field == "log"
    assert logs.resolve_log("auto") == "tensorboard" and logs.resolve_log("none") == "none"


def test_auto_and_missing_packages(monkeypatch):
    monkeypatch.setattr(logs, "installed", lambda package: False)
    assert logs.resolve_log("auto") == "none"
    with pytest.raises(SpachError, match=r"--log wandb needs the wandb package: pip install 'spach\[wandb\]'"):
        logs.resolve_log("wandb")


def test_train_writes_tensorboard_scalars_and_resumes_without_duplicates(tmp_path):
    run = tmp_path / "run"
    engine.train(tiny_cfg(run, epochs=1))  # log: auto
    assert json.loads((run / "config.json").read_text())["resolved"]["log"] == "tensorboard"
    engine.train(tiny_cfg(run, epochs=2, resume="auto"))  # a second event file, continuing at epoch 2
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    recs = records(run)
    logged = scalars(run)
    assert set(logged) == set(numbers(recs[-1])) >= {"train_loss", "val_loss", "top1", "top5", "lr", "images_per_s"}
    for tag, points in logged.items():
        assert points == [(r["epoch"], pytest.approx(r[tag], rel=1e-6)) for r in recs]


def test_log_none_writes_no_event_files(tmp_path):
    engine.train(tiny_cfg(tmp_path, epochs=1, log="none"))
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["log"] == "none"


def test_a_battle_gets_one_log_dir_per_run(tmp_path):
    """`tensorboard --logdir STUDY` finds every (contestant, seed) as its own run."""
    out = tmp_path / "study"
    run_battle(parse_study(tiny_study(epochs=1)), out, report=False, stream=io.StringIO())
    mux = EventMultiplexer().AddRunsFromDirectory(str(out)).Reload()
    assert sorted(mux.Runs()) == [f"runs/{c}/seed{s}" for c in ("attn", "conv") for s in (0, 1)]
    for name in mux.Runs():
        top1 = [e.value for e in mux.Scalars(name, "top1")]
        assert top1 == [pytest.approx(r["top1"]) for r in records(out / name)]


def wandb_history(path):
    """The history rows (one dict per `log` call) of an offline run's .wandb file: W&B's records are
    protobufs in LevelDB's log format (a 7-byte file header, 32 KiB blocks, records of checksum (4),
    length (2), type (1: full, 2: first, 3: middle, 4: last) and data)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, chunk, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, size, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = chunk + raw[pos + 7:pos + 7 + size], pos + 7 + size
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            chunk = b""
    return rows


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="W&B logging needs pip install 'spach[wandb]'")
    wandb.teardown()  # wandb keeps its set-up (and so its run folder) for the process: an earlier test's is not ours
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    run = tmp_path / "run"
    engine.train(tiny_cfg(run, epochs=2, log="tensorboard,wandb"))
    assert json.loads((run / "config.json").read_text())["resolved"]["log"] == "tensorboard,wandb"
    offline = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    rows = wandb_history(offline[0])
    recs = records(run)
    assert [row["_step"] for row in rows] == [1, 2]
    for row, rec in zip(rows, recs):
        assert {k: v for k, v in row.items() if not k.startswith("_")} == pytest.approx(numbers(rec))
    assert list(run.glob("events.out.tfevents.*"))

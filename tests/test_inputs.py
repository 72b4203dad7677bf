"""The training data path under bad or hostile input (issues 19 and 20): one line and exit 2, never a
traceback, never code run from a data file, never silently wrong data."""
import json

import numpy as np
import pytest
from PIL import Image

from spach.cli import main
from spach.errors import SpachError
from spach.train import data as data_mod
from spach.train.datasets import load_folders
from spach.train.evaluate import checked

TINY_KW = json.dumps({"net_arch": [["conv", 1]], "hidden_dim": 8, "patch_size": 4, "num_heads": 1})


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


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

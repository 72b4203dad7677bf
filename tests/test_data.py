"""Datasets, transforms and samplers: readers on files the tests write, and each bad input."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from spach.errors import SpachError
from spach.train.data import SkipSampler, TensorTransform, train_sampler
from spach.train.datasets import load_cifar, load_fashion_mnist, load_folders, make_tiny
from spach.train.presets import resolve


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    train, val = load_fashion_mnist(tmp_path, True), load_fashion_mnist(tmp_path, False)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert val.labels.tolist() == [0, 1, 2, 3, 4] and len(train.classes) == 10


def test_fashion_mnist_corrupt_and_missing(tmp_path):
    with pytest.raises(SpachError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nope", True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3), False)
    with pytest.raises(SpachError, match="cannot read IDX file .*train-images"):
        load_fashion_mnist(tmp_path, True)


def test_cifar_pickle(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    train = load_cifar(tmp_path, 10, True)
    assert train.images.shape == (20, 3, 32, 32) and train.classes[3] == "c3"
    assert len(load_cifar(root, 10, False)) == 4


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_files_of_every_pickle_protocol(tmp_path, protocol):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:  # as the real files: numpy arrays, lists, bytes, str, numbers
        batch = {b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), b"labels": [np.int64(1), 2],
                 b"batch_label": b"training batch", b"filenames": [b"a.png", "b.png"], b"n": 1.5}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}, protocol=protocol))
    assert load_cifar(tmp_path, 10, True).labels.tolist() == [1, 2] * 5


class TouchesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("content, match", [
    (lambda marker: {b"data": TouchesAFile(str(marker)), b"labels": [0]},
     "names (builtins|io).open, which a CIFAR file never holds"),
    (lambda marker: {b"images": np.zeros((1, 3072), np.uint8), b"labels": [0]}, "holds no data"),
    (lambda marker: [1, 2], "holds no data, labels .a list."),
    (lambda marker: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "holds 2 images but 1 labels"),
])
def test_a_crafted_cifar_file_runs_nothing(tmp_path, content, match):
    marker = tmp_path / "touched"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(content(marker)))
    with pytest.raises(SpachError, match=match) as e:
        load_cifar(tmp_path, 10, True)
    assert not marker.exists() and str(tmp_path / "data_batch_1") in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def cifar_folder(root, labels=None, names=None, data=None, n=4):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8) if data is None else data,
                 b"labels": [i % 10 for i in range(n)] if labels is None else labels}
        (root / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)] if names is None else names}
    (root / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


# issue 26.2: what an admitted file says is checked (type, dtype, shape, range) before any training
@pytest.mark.parametrize("content, field, match", [
    (dict(labels=[10**30] * 4), "labels", "must hold numbers, got values that are not machine numbers"),
    (dict(labels=np.array([10**30] * 4, dtype=object)), "labels", "must hold numbers"),
    (dict(labels=[float("inf")] * 4), "labels", r"must be whole numbers in 0\.\.9 \(class numbers\), found inf"),
    (dict(labels=[-5] * 4), "labels", "found -5"),
    (dict(labels=[1000] * 4), "labels", "found 1000"),
    (dict(labels=[0.5] * 4), "labels", "found 0.5"),
    (dict(labels=[[0, 1], [2, 3]]), "labels", r"got an array of shape \(2, 2\)"),
    (dict(labels=["a"] * 4), "labels", "must hold numbers, got <U1 values"),
    (dict(names=5), "label_names", "must be a list of 10 class names, got 5"),
    (dict(names=[b"a", b"b", b"c"]), "label_names", "holds 3 names for 10 classes"),
    (dict(names=[1] * 10), "label_names", "must hold printable names"),
    (dict(names=[b"\xff"] * 10), "label_names", "not UTF-8"),
    (dict(names=["a\x1b[31m"] * 10), "label_names", "must hold printable names"),
    (dict(data=np.full((4, 3072), np.nan)), "data", r"must be whole numbers in 0\.\.255 \(pixel values\), found nan"),
    (dict(data=np.full((4, 3072), 1e300)), "data", "found 1e\\+300"),
    (dict(data=np.full((4, 3072), 256)), "data", "found 256"),
    (dict(data=np.full((4, 3072), 0.5)), "data", "found 0.5"),
    (dict(data=np.zeros((4, 3000), np.uint8)), "data", r"must be an array of shape \(N, 3, 32, 32\) or \(N, 3072\), got \(4, 3000\)"),
    (dict(data=[[1, 2], [3]]), "data", "must hold numbers, got a ragged list"),
])
def test_a_cifar_file_whose_fields_are_wrong_is_refused_naming_file_and_field(tmp_path, content, field, match):
    cifar_folder(tmp_path, **content)
    with pytest.raises(SpachError, match=match) as e:
        load_cifar(tmp_path, 10, True)
    msg = str(e.value)
    file = "batches.meta" if field == "label_names" else "data_batch_1"
    assert msg.startswith(f"CIFAR file {tmp_path / file}: {field} ") and msg.endswith("re-extract the dataset")
    assert len(msg.splitlines()) == 1


def test_cifar_fields_of_other_numeric_types_are_used_as_the_same_values(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32))
    cifar_folder(tmp_path, labels=np.array([1.0, 2.0, 3.0, 9.0]), data=data.astype(np.float64), names=[f"c{i}" for i in range(10)])
    train = load_cifar(tmp_path, 10, True)
    assert train.images.dtype == torch.uint8 and torch.equal(train.images[:4], torch.from_numpy(data.astype(np.uint8)))
    assert train.labels.dtype == torch.int64 and train.labels[:4].tolist() == [1, 2, 3, 9] and train.classes[9] == "c9"


@pytest.mark.parametrize("case, match", [
    ("labels", r"IDX file .*train-labels-idx1-ubyte: labels must be whole numbers in 0\.\.9 \(class numbers\), found 200"),
    ("shape", r"IDX file .*train-images-idx3-ubyte: images must be an array of shape \(N, 28, 28\) or \(N, 784\), got \(3, 56, 14\)"),
    ("header", r"cannot read IDX file .*train-images-idx3-ubyte: its header gives sizes 4000000000x28x28 "
               r"\(3,136,000,000,000 values\) but it holds 2,352"),
])
def test_an_idx_file_whose_contents_are_wrong_is_refused(tmp_path, case, match):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 56, 14) if case == "shape" else (3, 28, 28)), False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(3, 200 if case == "labels" else 1), False)
    if case == "header":
        raw = bytearray((tmp_path / "train-images-idx3-ubyte").read_bytes())
        raw[4:8] = struct.pack(">I", 4_000_000_000)
        (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(SpachError, match=match) as e:
        load_fashion_mnist(tmp_path, True)
    assert len(str(e.value).splitlines()) == 1


def test_tiny_is_deterministic():
    a, b = make_tiny(True, seed=1), make_tiny(True, seed=1)
    assert torch.equal(a.images, b.images) and a.images.shape == (256, 1, 32, 32)
    assert sorted(set(a.labels.tolist())) == [0, 1, 2, 3]
    pil, label = a[5]
    assert pil.size == (32, 32) and label == int(a.labels[5])


def make_folders(root, train_classes=("a", "b"), val_classes=("a", "b"), n=3):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_folders(tmp_path):
    train, val = load_folders(make_folders(tmp_path), skip_bad=False)
    assert train.classes == ["a", "b"] and len(train) == 6 and len(val) == 6
    img, label = train[0]
    assert img.size == (24, 20) and label == 0


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("empty", "is empty"), ("noval", "has no val/ folder"), ("differ", "class folders differ"),
])
def test_folder_errors(tmp_path, case, match):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "noval":
        (root / "train" / "a").mkdir(parents=True)
    elif case == "differ":
        make_folders(root, val_classes=("a", "c"))
    with pytest.raises(SpachError, match=match):
        load_folders(root, skip_bad=False)


def test_bad_image_fails_naming_file_or_is_skipped(tmp_path):
    root = make_folders(tmp_path)
    (root / "train" / "a" / "9.png").write_bytes(b"not a png")
    train, _ = load_folders(root, skip_bad=False)
    bad = [i for i, (p, _) in enumerate(train.samples) if p.endswith("9.png")][0]
    with pytest.raises(SpachError, match=r"cannot read image .*9\.png.*--skip-bad-images"):
        train[bad]
    train, _ = load_folders(root, skip_bad=True)
    assert train[bad] is None


def test_tensor_transform_shapes_and_normalisation():
    x = torch.full((4, 1, 28, 28), 51, dtype=torch.uint8)
    ev = TensorTransform(32, (0.2,), (0.1,), torch.device("cpu"))(x)
    assert ev.shape == (4, 1, 32, 32) and torch.allclose(ev, torch.zeros_like(ev), atol=1e-4)
    tr = TensorTransform(28, (0.0,), (1.0,), torch.device("cpu"), train=True, re_prob=1.0)(x)
    assert tr.shape == (4, 1, 28, 28) and torch.isfinite(tr).all()


def test_samplers_shard_and_skip():
    cfg = resolve("tiny", repeated_aug=1)
    shards = [list(train_sampler(10, cfg, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    s = train_sampler(10, cfg, 0, 1)
    s.set_epoch(3)
    assert list(SkipSampler(s, 4)) == list(s)[4:] and len(SkipSampler(s, 4)) == 6
    ra = train_sampler(512, resolve("tiny", repeated_aug=3), 0, 2)
    assert len(ra) == 256

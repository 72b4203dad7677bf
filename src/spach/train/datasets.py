"""Image sets, read from local files (nothing is ever downloaded): in-memory sets (Fashion-MNIST from
its IDX files, CIFAR-10/100 from the python-pickle folders, the built-in `tiny` toy set) and
ImageNet-style image folders whose unreadable images fail naming the file (or are skipped)."""
from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from spach.errors import SpachError, first_line
from spach.train import contents

FMNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Known datasets: (classes, channels, native size, training images, test images); the image-folder row
# holds ImageNet-1k's numbers, used when the folder itself is not at hand (a dry run).
DATASETS = {"imagefolder": (1000, 3, 0, 1281167, 50000), "fashion-mnist": (10, 1, 28, 60000, 10000),
            "cifar10": (10, 3, 32, 50000, 10000), "cifar100": (100, 3, 32, 50000, 10000), "tiny": (4, 1, 32, 256, 64)}
_ALIASES = {"fmnist": "fashion-mnist", "imagenet": "imagefolder", "folder": "imagefolder"}


class BadImageError(SpachError):
    """An image file that cannot be decoded."""


# ---------------------------------------------------------------------------------------------- sets
@dataclass
class TensorImages(Dataset):
    """A whole image set in memory: `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        """A PIL image, for the per-image transform path."""
        img = self.images[i].numpy()
        pil = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
        return pil, int(self.labels[i])

    def subset(self, indices: torch.Tensor) -> "TensorImages":
        return TensorImages(self.images[indices], self.labels[indices], self.classes, self.mean, self.std)


def canonical_dataset(name: str) -> str:
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in DATASETS:
        raise SpachError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (or fmnist)")
    return name


def dataset_shape(data: dict[str, Any]) -> tuple[int, int, int]:
    """(classes, channels, image size) models are built for from a study's [data] table (`dataset`,
    `data_path`, `img_size`), without loading the data: an image folder's classes are its train/ folders."""
    name = canonical_dataset(data.get("dataset", "imagefolder"))
    classes, chans, native = DATASETS[name][:3]
    path = Path(data.get("data_path", "") or ".") / "train"
    if name == "imagefolder" and path.is_dir():
        classes = sum(1 for p in path.iterdir() if p.is_dir()) or classes
    return classes, chans, data.get("img_size", 0) or native


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST format), gzip'ed or not."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        held, said = len(raw) - 4 - 4 * ndim, math.prod(dims)
        if held != said:  # a header that lies about the sizes (or a cut file)
            raise ValueError(f"its header gives sizes {'x'.join(map(str, dims))} ({said:,} values) but it holds {max(held, 0):,}")
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, EOFError) as e:
        raise SpachError(f"cannot read IDX file {path}: {e}; re-install it (apt-get install --reinstall dataset-fashion-mnist)") from None


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise SpachError(f"{root} has no {stem}[.gz]; pass --data-path to the folder holding the four Fashion-MNIST IDX files")


def load_fashion_mnist(root: str | os.PathLike | None, train: bool) -> TensorImages:
    """Fashion-MNIST from its four IDX files (Debian's dataset-fashion-mnist location by default)."""
    root = Path(root or FMNIST_DEFAULT_PATH)
    _check_folder(root, hint="apt-get install dataset-fashion-mnist, or pass --data-path")
    prefix = "train" if train else "t10k"
    fix = "re-install it (apt-get install --reinstall dataset-fashion-mnist)"
    images_file, labels_file = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images = contents.check_fields(images_file, "IDX file", {"images": _read_idx(images_file)},
                                   {"images": contents.pixels((28, 28))}, fix)["images"]
    labels = contents.check_fields(labels_file, "IDX file", {"labels": _read_idx(labels_file)},
                                   {"labels": contents.labels(len(FMNIST_CLASSES))}, fix)["labels"]
    if len(images) != len(labels):
        raise SpachError(f"Fashion-MNIST files in {root} disagree ({images.shape} images, {labels.shape} labels); re-install them")
    return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), FMNIST_CLASSES, (0.2860,), (0.3530,))


def load_cifar(root: str | os.PathLike, num_classes: int, train: bool) -> TensorImages:
    """CIFAR-10/100 from a local folder in the usual python-pickle format (`cifar-10-batches-py` etc.);
    every file's fields are checked (`spach.train.contents`) as it is read."""
    root = Path(root)
    _check_folder(root, hint="pass --data-path to the extracted cifar-10-batches-py / cifar-100-python folder")
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        files, meta, names_key, labels_key = ["train" if train else "test"], "meta", "fine_label_names", "fine_labels"
    parts, labels = [], []
    for name in files:
        d = _read_cifar(root / name, {"data": contents.pixels((3, 32, 32)), labels_key: contents.labels(num_classes)})
        if len(d[labels_key]) != len(d["data"]):
            raise SpachError(f"CIFAR file {root / name} holds {len(d['data'])} images but {len(d[labels_key])} labels; "
                             "re-extract the dataset")
        parts.append(d["data"])
        labels.append(d[labels_key])
    classes = _read_cifar(root / meta, {names_key: contents.class_names(num_classes)})[names_key]
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if num_classes == 10 else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return TensorImages(torch.from_numpy(np.concatenate(parts)), torch.from_numpy(np.concatenate(labels)), classes, mean, std)


_NUMPY_GLOBALS = {  # what a pickled numpy array or scalar names (numpy 1 wrote numpy.core, numpy 2 numpy._core)
    "_reconstruct": np.zeros(1).__reduce__()[0], "scalar": np.float64(0).__reduce__()[0],
    "_frombuffer": np.zeros(1).__reduce_ex__(5)[0], "ndarray": np.ndarray, "dtype": np.dtype,
}
_ALLOWED_GLOBALS = {
    **{(m, n): _NUMPY_GLOBALS[n] for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")},
    **{(m, "_frombuffer"): _NUMPY_GLOBALS["_frombuffer"] for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol 2 (Python 2's files): encode(text, "latin1")
}


class _DataUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR file holds: dicts, lists, bytes, str, numbers and numpy arrays. Any other
    global (a class, a function: what a crafted `__reduce__` would call) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never holds")


def _read_cifar(path: Path, schema: dict[str, contents.Check]) -> dict[str, Any]:
    """The fields of `schema` from a CIFAR python-format file, read without running anything it names,
    each checked (type, dtype, shape, range) before it is used."""
    if not path.is_file():
        raise SpachError(f"{path} is missing; pass --data-path to a CIFAR folder in the python-pickle format")
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise SpachError(f"cannot read CIFAR file {path}: {first_line(e)}; it is not a CIFAR python-format file") from None
    missing = [k for k in schema if not isinstance(d, dict) or k.encode() not in d]
    if missing:
        raise SpachError(f"CIFAR file {path} holds no {', '.join(missing)} (a {type(d).__name__}); "
                         f"it is not a CIFAR python-format file")
    return contents.check_fields(path, "CIFAR file", {k: d[k.encode()] for k in schema}, schema, "re-extract the dataset")


TINY_CLASSES = ["bar", "column", "ring", "disk"]


def make_tiny(train: bool, seed: int = 0, size: int = 32) -> TensorImages:
    """A built-in toy set for tests: 32x32 grayscale shapes (bar, column, ring, disk) with random
    position, size and noise; 256 training and 64 validation images, generated, never downloaded."""
    rng = np.random.default_rng(seed + (0 if train else 1))
    n = 256 if train else 64
    labels = np.arange(n) % len(TINY_CLASSES)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, 1, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.15, size * 0.3)
        if c == 0:
            mask = (abs(yy - cy) < 2) & (abs(xx - cx) < r)
        elif c == 1:
            mask = (abs(xx - cx) < 2) & (abs(yy - cy) < r)
        else:
            d = np.hypot(yy - cy, xx - cx)
            mask = (abs(d - r) < 1.5) if c == 2 else (d < r)
        img = mask * 200.0 + rng.normal(30, 20, (size, size))
        images[i, 0] = np.clip(img, 0, 255).astype(np.uint8)
    return TensorImages(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), TINY_CLASSES, (0.2,), (0.3,))


def _check_folder(root: Path, hint: str) -> None:
    if root.exists() and not root.is_dir():
        raise SpachError(f"data path {root} is a file, not a folder; {hint}")
    if not root.is_dir():
        raise SpachError(f"data folder {root} does not exist; {hint}")
    if not any(root.iterdir()):
        raise SpachError(f"data folder {root} is empty; {hint}")


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB; 16-bit and 32-bit integer greyscale (a 16-bit PNG opens as I;16 or I) is
    scaled to 8 bits first (Pillow's convert would clip every value above 255 to white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


class CheckedImageFolder(ImageFolder):
    """ImageFolder whose unreadable images fail naming the file, or are skipped (returned as None)."""

    def __init__(self, root: Path, transform: Callable | None, skip_bad: bool):
        self.skip_bad = skip_bad
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:
            raise SpachError(f"{root}: {e}; expected class folders holding images") from None

    @staticmethod
    def make_dataset(directory: str | os.PathLike, class_to_idx: dict[str, int] | None = None,
                     extensions: tuple[str, ...] | None = None, is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's walk (symlinks followed), but a folder reached twice (a symlink loop, or a link to
        another class folder: images counted again, under another label) is refused, naming the link."""
        root = Path(directory)
        classes = sorted((class_to_idx or {}).items())
        seen = {os.path.realpath(root), *(os.path.realpath(root / c) for c, _ in classes)}
        valid = is_valid_file or (lambda p: has_file_allowed_extension(p, extensions or IMG_EXTENSIONS))
        samples, empty = [], []
        for name, index in classes:
            found = 0
            for folder, dirs, files in os.walk(root / name, followlinks=True):
                for d in sorted(dirs):
                    real = os.path.realpath(os.path.join(folder, d))
                    if real in seen:
                        raise SpachError(f"{os.path.join(folder, d)} leads to {real}, a folder already read (a symlink loop "
                                         "or a second copy would count its images again); remove the link")
                    seen.add(real)
                dirs.sort()
                for f in sorted(files):
                    if valid(os.path.join(folder, f)):
                        samples.append((os.path.join(folder, f), index))
                        found += 1
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"found no image in class folder(s) {', '.join(empty[:3])}")
        return samples

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = to_rgb(Image.open(f))
        except Exception as e:
            if self.skip_bad:
                return None
            raise BadImageError(f"cannot read image {path} ({type(e).__name__}); fix or remove it, or pass --skip-bad-images") from None
        return (self.transform(img) if self.transform else img), target


def collate_skip_bad(batch: list) -> Any:
    """Default collate without the images a CheckedImageFolder skipped (None entries)."""
    return torch.utils.data.default_collate([b for b in batch if b is not None])


def load_folders(root: str | os.PathLike | None, skip_bad: bool) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """`root/train` and `root/val` ImageNet-style class folders, untransformed (transforms set later)."""
    if not root:
        raise SpachError("no --data-path given; pass a folder holding train/ and val/ class folders (or --dataset fmnist/tiny)")
    root = Path(root)
    _check_folder(root, hint="pass --data-path to a folder holding train/ and val/ class folders")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise SpachError(f"{root} has no {split}/ folder; expected ImageNet-style train/ and val/ class folders")
    train, val = (CheckedImageFolder(root / s, None, skip_bad) for s in ("train", "val"))
    if len(train.classes) < 2:
        raise SpachError(f"{root}/train holds {len(train.classes)} class folder ({', '.join(train.classes)}): training "
                         "a classifier needs >= 2 classes; add a folder per class")
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))[:3]
        only_v = sorted(set(val.classes) - set(train.classes))[:3]
        raise SpachError(f"class folders differ between {root}/train and {root}/val (only in train: {only_t}, "
                         f"only in val: {only_v}); make both hold the same class folders")
    return train, val


def load_val_folder(root: str | os.PathLike | None, skip_bad: bool) -> CheckedImageFolder:
    """`root/val` class folders (or `root` itself when it has no val/), for evaluation alone."""
    if not root:
        raise SpachError("no --data-path given; pass a folder holding val/ class folders")
    root = Path(root)
    _check_folder(root, hint="pass --data-path to a folder holding val/ class folders")
    val = CheckedImageFolder(root / "val" if (root / "val").is_dir() else root, None, skip_bad)
    return val


def load_dataset(name: str, data_path: str | None, train: bool, seed: int = 0) -> TensorImages:
    """One split of an in-memory dataset."""
    name = canonical_dataset(name)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_path, train)
    if name in ("cifar10", "cifar100"):
        if not data_path:
            raise SpachError(f"{name} needs --data-path (a local folder in the python-pickle format; nothing is downloaded)")
        return load_cifar(data_path, 10 if name == "cifar10" else 100, train)
    if name == "tiny":
        return make_tiny(train, seed)
    raise SpachError(f"{name} is not an in-memory dataset")

"""Datasets, transforms and samplers for training and evaluation. Nothing is ever downloaded.

Two data paths:
- *in-memory* sets (Fashion-MNIST, CIFAR, the built-in `tiny` set) live as one uint8 tensor; batches are
  sliced from it and augmented as whole tensors on the training device (random-resized crop and flip
  as one batched affine resample, timm's RandomErasing), which is far cheaper than PIL per image;
- *image folders* (ImageNet layout) go through timm's `create_transform` per image in worker processes.
An in-memory set falls back to the per-image path when an augmentation only that path has is asked for
(RandAugment, colour jitter). Mixup/CutMix act on batches in the engine for both paths.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from spach.errors import SpachError

if TYPE_CHECKING:
    from spach.engine import TrainConfig

FMNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASETS = ("imagefolder", "fashion-mnist", "cifar10", "cifar100", "tiny")
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


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST format), gzip'ed or not."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
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
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or len(images) != len(labels):
        raise SpachError(f"Fashion-MNIST files in {root} disagree ({images.shape} images, {labels.shape} labels); re-install them")
    return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FMNIST_CLASSES, (0.2860,), (0.3530,))


def load_cifar(root: str | os.PathLike, num_classes: int, train: bool) -> TensorImages:
    """CIFAR-10/100 from a local folder in the usual python-pickle format (`cifar-10-batches-py` etc.)."""
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
        d = _unpickle(root / name)
        parts.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(d[labels_key.encode()])
    classes = [c.decode() for c in _unpickle(root / meta)[names_key.encode()]]
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if num_classes == 10 else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return TensorImages(torch.from_numpy(np.concatenate(parts)), torch.tensor(labels, dtype=torch.int64), classes, mean, std)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise SpachError(f"{path} is missing; pass --data-path to a CIFAR folder in the python-pickle format")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise SpachError(f"cannot read CIFAR file {path}: {e}") from None


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
    if not root.is_dir():
        raise SpachError(f"data folder {root} does not exist; {hint}")
    if not any(root.iterdir()):
        raise SpachError(f"data folder {root} is empty; {hint}")


class CheckedImageFolder(ImageFolder):
    """ImageFolder whose unreadable images fail naming the file, or are skipped (returned as None)."""

    def __init__(self, root: Path, transform: Callable | None, skip_bad: bool):
        self.skip_bad = skip_bad
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as e:
            raise SpachError(f"{root}: {e}; expected class folders holding images") from None

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")
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


# ------------------------------------------------------------------------------------ batch transforms
class TensorTransform:
    """uint8 (B, C, H, W) batch on the device -> normalised float batch of `size`; when training,
    a per-image random-resized crop (`scale`, `ratio`) and horizontal flip as one affine resample,
    then timm's RandomErasing."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 train: bool = False, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1):
        self.size, self.train, self.scale, self.ratio, self.hflip = size, train, scale, ratio, hflip
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=device) if train and re_prob > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if self.train:
            x = self._crop_flip(x)
        elif x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.erase(x) if self.erase is not None else x

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        log_r = torch.empty(b, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
        h = (area / log_r.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, device=dev) < self.hflip, -1.0, 1.0)
        zero = torch.zeros(b, device=dev)
        theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TensorLoader:
    """Batches sliced from an in-memory uint8 set by a sampler's indices, moved to `device` and
    transformed there; it yields `(images, labels)` like a DataLoader."""

    def __init__(self, data: TensorImages, sampler: Sampler | Sequence[int], batch_size: int,
                 transform: TensorTransform, device: torch.device, drop_last: bool = False):
        self.data, self.sampler, self.batch_size = data, sampler, batch_size
        self.transform, self.device, self.drop_last = transform, device, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = indices[start: start + self.batch_size]
            x = self.data.images[idx].to(self.device, non_blocking=True)
            yield self.transform(x), self.data.labels[idx].to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------ samplers
class SkipSampler(Sampler):
    """The indices of `sampler` after the first `skip` ones (a run resumed in the middle of an epoch)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator[int]:
        return iter(list(iter(self.sampler))[self.skip:])


def train_sampler(n: int, cfg: "TrainConfig", rank: int, world: int) -> Sampler:
    """Shuffled shard of `range(n)` for this rank, reshuffled by `set_epoch`; repeated augmentation
    (DeiT's RASampler, from timm) when `cfg.repeated_aug > 1`."""
    fake = range(n)  # the samplers only need len()
    if cfg.repeated_aug > 1:
        return RepeatAugSampler(fake, num_replicas=world, rank=rank, num_repeats=cfg.repeated_aug)
    return DistributedSampler(fake, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)


def shard(n: int, rank: int, world: int) -> list[int]:
    """An evaluation shard: every index exactly once over all ranks (no padding, so metrics are exact)."""
    return list(range(rank, n, world))


# ---------------------------------------------------------------------------------------- assembly
@dataclass
class Data:
    """What the engine needs; the training loader is made per epoch from its sampler: `train_loader(sampler)`."""

    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    train_size: int
    val_size: int
    tensor_path: bool
    train_loader: Callable[[Sampler], Any]
    val_loader: Any
    train_eval_loader: Any | None


def _fixed_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """The same `k` indices of `range(n)` on every call (and every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


def _needs_pil(cfg: "TrainConfig") -> bool:
    return bool(cfg.aa and cfg.aa != "none") or cfg.color_jitter > 0


def build_data(cfg: "TrainConfig", pretrained_cfg: dict[str, Any], device: torch.device, rank: int = 0, world: int = 1) -> Data:
    """Datasets, transforms and loaders for `cfg`; `pretrained_cfg` (the model's) gives the default
    resize/crop/mean/std for image folders."""
    name = canonical_dataset(cfg.dataset)
    if name == "imagefolder":
        train, val = load_folders(cfg.data_path, cfg.skip_bad_images)
        classes, in_chans = train.classes, 3
        mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
        native = pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    else:
        train, val = load_dataset(name, cfg.data_path, True, cfg.seed), load_dataset(name, cfg.data_path, False, cfg.seed)
        classes, in_chans, mean, std, native = train.classes, train.images.shape[1], train.mean, train.std, train.images.shape[-1]
    mean, std = tuple(cfg.mean or mean), tuple(cfg.std or std)
    size = cfg.img_size or native
    if len(train) == 0 or len(val) == 0:
        raise SpachError(f"dataset {name} at {cfg.data_path} holds no {'training' if len(train) == 0 else 'validation'} images")

    def pick(ds: Any, k: int, seed: int) -> Any:
        if not k:
            return ds
        idx = _fixed_subset(len(ds), k, seed)
        return ds.subset(idx) if isinstance(ds, TensorImages) else Subset(ds, idx.tolist())

    train_full = train
    train, val = pick(train, cfg.train_subset, cfg.seed), pick(val, cfg.val_subset, cfg.seed + 1)
    train_eval = pick(train, cfg.eval_train_subset, cfg.seed + 2) if cfg.eval_train_subset else None
    tensor_path = isinstance(train_full, TensorImages) and not _needs_pil(cfg)

    ebs = cfg.eval_batch_size or cfg.batch_size
    if isinstance(train_full, TensorImages):
        eval_tf = TensorTransform(size, mean, std, device)
        val_loader = TensorLoader(val, shard(len(val), rank, world), ebs, eval_tf, device)
        te_loader = TensorLoader(train_eval, shard(len(train_eval), rank, world), ebs, eval_tf, device) \
            if train_eval is not None else None
    else:
        data_cfg = resolve_data_config({"input_size": (in_chans, size, size), "mean": mean, "std": std}, pretrained_cfg=pretrained_cfg)
        eval_tf = create_transform(**data_cfg, is_training=False)
        val_loader = _image_loader(_with_transform(val, eval_tf), shard(len(val), rank, world), cfg, ebs, False)
        te_loader = _image_loader(_with_transform(train_eval, eval_tf), shard(len(train_eval), rank, world), cfg,
                                  ebs, False) if train_eval is not None else None

    if tensor_path:
        train_tf = TensorTransform(size, mean, std, device, train=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                   re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)

        def make(sampler: Sampler) -> Any:
            return TensorLoader(train, sampler, cfg.batch_size, train_tf, device, drop_last=True)
    else:
        train_tf = create_transform(
            (in_chans, size, size), is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.aa if cfg.aa and cfg.aa != "none" else None,
            interpolation=cfg.train_interpolation, mean=mean, std=std,
            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
        train_t = _with_transform(train, train_tf)

        def make(sampler: Sampler) -> Any:
            return _image_loader(train_t, sampler, cfg, cfg.batch_size, True)

    return Data(len(classes), in_chans, size, list(classes), len(train), len(val), tensor_path, make, val_loader, te_loader)


class _Transformed(Dataset):
    """`ds[i]` = (transform(image), label); None stays None (a skipped bad image)."""

    def __init__(self, ds: Dataset, transform: Callable):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        item = self.ds[i]
        return None if item is None else (self.transform(item[0]), item[1])


def _with_transform(ds: Dataset, transform: Callable) -> Dataset:
    return _Transformed(ds, transform)


def _image_loader(ds: Dataset, sampler: Any, cfg: "TrainConfig", batch_size: int, train: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=train,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_skip_bad,
                      persistent_workers=False)


def eval_loader_for(model: torch.nn.Module, dataset: str, data_path: str | None, batch_size: int, workers: int,
                    device: torch.device, img_size: int = 0, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, skip_bad: bool = False) -> tuple[Any, int]:
    """Loader over the validation split for `spach eval`, with the model's pretrained config
    (resize, crop, mean/std) for folders, the dataset's own statistics for in-memory sets."""
    name = canonical_dataset(dataset)
    if name == "imagefolder":
        val = load_val_folder(data_path, skip_bad)
        data_cfg = resolve_data_config({}, model=model)
        if img_size:
            data_cfg["input_size"] = (3, img_size, img_size)
        if mean:
            data_cfg["mean"], data_cfg["std"] = tuple(mean), tuple(std)
        loader = DataLoader(_with_transform(val, create_transform(**data_cfg, is_training=False)), batch_size=batch_size,
                            num_workers=workers, collate_fn=collate_skip_bad, pin_memory=device.type == "cuda")
        return loader, len(val)
    val = load_dataset(name, data_path, False)
    size = img_size or val.images.shape[-1]
    tf = TensorTransform(size, mean or val.mean, std or val.std, device)
    return TensorLoader(val, range(len(val)), batch_size, tf, device), len(val)

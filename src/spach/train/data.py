"""Loaders for training and evaluation: batch transforms and samplers, assembled by `build_data`.

Two data paths:
- *in-memory* sets live as one uint8 tensor; batches are sliced from it and augmented as whole tensors
  on the training device (random-resized crop and flip as one batched affine resample, timm's
  RandomErasing), which is far cheaper than PIL per image;
- *image folders* (ImageNet layout) go through timm's `create_transform` per image in worker processes.
An in-memory set falls back to the per-image path when an augmentation only that path has is asked for
(RandAugment, colour jitter). Mixup/CutMix act on batches in the engine for both paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from spach.errors import SpachError, first_line
from spach.train.augment import safe_transform
from spach.train.config import TrainConfig
from spach.train.datasets import (
    TensorImages,
    canonical_dataset,
    collate_skip_bad,
    load_dataset,
    load_folders,
    load_val_folder,
)


# ------------------------------------------------------------------------------------ batch transforms
class TensorTransform:
    """uint8 (B, C, H, W) batch on the device -> normalised float batch of `size`; when training,
    a per-image random-resized crop (`scale`, `ratio`) and horizontal flip as one affine resample,
    then timm's RandomErasing.

    The crops and flips draw from their own `generator`, which the engine seeds per (seed, epoch,
    rank): every model trained with one seed sees the same augmented images in the same order, however
    much randomness its own layers consume (common random numbers for the battle's paired comparisons)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 train: bool = False, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1):
        self.size, self.train, self.scale, self.ratio, self.hflip = size, train, scale, ratio, hflip
        self.generator = torch.Generator(device=device)
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
        b, dev, g = x.shape[0], x.device, self.generator
        area = torch.empty(b, device=dev).uniform_(*self.scale, generator=g)
        log_r = torch.empty(b, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
        w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
        h = (area / log_r.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, device=dev, generator=g) < self.hflip, -1.0, 1.0)
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


def train_sampler(n: int, cfg: TrainConfig, rank: int, world: int) -> Sampler:
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
    generator: torch.Generator | None = None  # the training augmentation's own random stream (in-memory sets)


def _fixed_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """The same `k` indices of `range(n)` on every call (and every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


def _needs_pil(cfg: TrainConfig) -> bool:
    return bool(cfg.aa and cfg.aa != "none") or cfg.color_jitter > 0


def build_data(cfg: TrainConfig, pretrained_cfg: dict[str, Any], device: torch.device, rank: int = 0, world: int = 1) -> Data:
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
    if cfg.mean and len(cfg.mean) != in_chans:
        raise SpachError(f"mean and std have {len(cfg.mean)} values but the {name} images have {in_chans} channel(s); "
                         "give one value per channel")
    size = cfg.img_size or native
    if len(train) == 0 or len(val) == 0:
        raise SpachError(f"dataset {name} at {cfg.data_path} holds no {'training' if len(train) == 0 else 'validation'} images")

    def pick(ds: Any, k: int, seed: int, flag: str, split: str) -> Any:
        if not k:
            return ds
        if k > len(ds):
            raise SpachError(f"--{flag} {k} is more than the {len(ds)} {split} images of {name}; lower it (0: all)")
        idx = _fixed_subset(len(ds), k, seed)
        return ds.subset(idx) if isinstance(ds, TensorImages) else Subset(ds, idx.tolist())

    train_full = train
    # the training subset follows the seed; the validation subset does not: every run scores the same images
    train, val = pick(train, cfg.train_subset, cfg.seed, "train-subset", "training"), \
        pick(val, cfg.val_subset, 1, "val-subset", "validation")
    train_eval = pick(train, cfg.eval_train_subset, cfg.seed + 2, "eval-train-subset", "training") \
        if cfg.eval_train_subset else None
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

    generator = None
    if tensor_path:
        train_tf = TensorTransform(size, mean, std, device, train=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                                   re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
        generator = train_tf.generator

        def make(sampler: Sampler) -> Any:
            return TensorLoader(train, sampler, cfg.batch_size, train_tf, device, drop_last=True)
    else:
        train_t = _with_transform(train, pil_train_transform(cfg, in_chans, size, mean, std))

        def make(sampler: Sampler) -> Any:
            return _image_loader(train_t, sampler, cfg, cfg.batch_size, True)

    return Data(len(classes), in_chans, size, list(classes), len(train), len(val), tensor_path, make, val_loader, te_loader,
                generator)


def pil_train_transform(cfg: TrainConfig, in_chans: int, size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """timm's per-image training transform for `cfg` (crop, flip, RandAugment, jitter, erasing), its
    augmentation ops made safe for the installed Pillow (see `spach.train.augment`)."""
    return safe_transform(create_transform(
        (in_chans, size, size), is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.aa if cfg.aa and cfg.aa != "none" else None,
        interpolation=cfg.train_interpolation, mean=mean, std=std,
        re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount))


class _Transformed(Dataset):
    """`ds[i]` = (transform(image), label); None stays None (a skipped bad image)."""

    def __init__(self, ds: Dataset, transform: Callable):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        item = self.ds[i]
        if item is None:
            return None
        try:
            return self.transform(item[0]), item[1]
        except Exception as e:  # in a worker process: the error names the image, on one line
            raise SpachError(f"transforming {_source(self.ds, i)} failed ({type(e).__name__}: {first_line(e)}); if every "
                             "image fails, the installed timm/Pillow may not match constraints.txt (make setup)") from None


def _source(ds: Dataset, i: int) -> str:
    """The file behind `ds[i]` (image folders, through any Subset), else its index."""
    while isinstance(ds, Subset):
        ds, i = ds.dataset, ds.indices[i]
    samples = getattr(ds, "samples", None)
    return f"image {samples[i][0]}" if samples else f"image {i} of the dataset"


def _with_transform(ds: Dataset, transform: Callable) -> Dataset:
    return _Transformed(ds, transform)


def _image_loader(ds: Dataset, sampler: Any, cfg: TrainConfig, batch_size: int, train: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=train,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_skip_bad,
                      persistent_workers=False)


def eval_loader_for(model: torch.nn.Module | None, dataset: str, data_path: str | None, batch_size: int, workers: int,
                    device: torch.device, img_size: int = 0, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, skip_bad: bool = False) -> tuple[Any, int]:
    """Loader over the validation split for `spach eval`, with the model's pretrained config
    (resize, crop, mean/std) for folders (`model` is needed only there), the dataset's own statistics
    for in-memory sets."""
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

"""Evaluation: loss, top-1 and top-5 of a model over a loader (`evaluate`, used by the training loop),
and `spach eval`: a checkpoint scored on a validation set (`evaluate_checkpoint`)."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from spach.bench.optimize import optimize
from spach.bench.profile import throughput as measure_throughput
from spach.device import amp_dtype as parse_amp
from spach.device import autocast
from spach.errors import CheckpointError, SpachError, first_line
from spach.files import atomic_write_bytes
from spach.models.convert import check_fits, checkpoint_filter_fn, head_and_channels, read_checkpoint
from spach.terminal import track
from spach.train import checkpoint
from spach.train.config import ConfigError, TrainConfig
from spach.train.data import canonical_dataset, eval_loader_for
from spach.train.factory import build_model
from spach.train.runtime import Dist, setup

PREDICTIONS_FILE = "predictions.npz"  # a run's final predicted class and label of every validation image


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str, amp_dtype: torch.dtype | None = None,
             distributed: bool = False, predictions: bool = False) -> dict[str, Any]:
    """Cross-entropy loss, top-1 and top-5 (%) of `model` over `loader` (summed over ranks when
    `distributed`, each rank holding its own shard). Also `n`, the number of images seen, and with
    `predictions` the predicted class and the label of every image (`pred`, `label`: int64 CPU
    tensors in the loader's order; a rank's own shard when distributed)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    preds, labels = [], []
    for batch in checked(loader):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), hit[:, :1].sum().double(),
                             hit.sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        if predictions:
            preds.append(top[:, 0].cpu())
            labels.append(y.cpu())
    if distributed and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    result: dict[str, Any] = {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n,
                              "top5": 100 * sums[2].item() / n, "n": int(sums[3].item())}
    if predictions:
        result.update(pred=torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
                      label=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    return result


def save_predictions(d: Dist, val: dict[str, Any], path: Path) -> None:
    """`pred` and `label` of every validation image in dataset order (ranks hold interleaved shards)."""
    pairs = [(val["pred"], val["label"])]
    if d.world > 1:
        pairs = [None] * d.world
        dist.all_gather_object(pairs, (val["pred"], val["label"]))
    if not d.main:
        return
    n = sum(len(pred) for pred, _ in pairs)
    pred, label = np.zeros(n, np.int16), np.zeros(n, np.int16)
    for rank, (pr, lb) in enumerate(pairs):
        pred[rank::d.world], label[rank::d.world] = pr.numpy(), lb.numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, pred=pred, label=label)
    atomic_write_bytes(path, buf.getvalue())


def checked(loader: Any) -> Iterator[Any]:
    """Iterate a loader, turning an error in a data-loader worker (re-raised by torch with the worker's
    traceback in its message) into one line."""
    try:
        yield from loader
    except SpachError as e:
        raise type(e)(first_line(e)) from None
    except Exception as e:
        msg = str(e)
        if "DataLoader worker" not in msg:
            raise
        if msg.startswith("Caught "):  # "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ..."
            raise SpachError(f"a data-loader worker failed: {type(e).__name__}: {first_line(e)}") from None
        raise SpachError(f"{first_line(e)}; try fewer --workers (or --workers 0)") from None  # a worker killed


def evaluate_checkpoint(model: str | None, pretrained: str, data_path: str | None, dataset: str = "imagefolder",
                        batch_size: int = 128, workers: int = 4, device: str = "auto", img_size: int = 0,
                        amp: str = "auto", model_kwargs: dict | None = None, use_ema: bool = False,
                        skip_bad_images: bool = False, throughput: bool = False, compile: bool = False,
                        imports: list[str] | None = None) -> dict[str, Any]:
    """Top-1/top-5/loss of a checkpoint on the validation split. Image folders use the model's
    pretrained config (resize, crop, mean/std); a spach training checkpoint also brings its own
    model name, architecture overrides, resolution and normalisation. The model runs in
    `spach.optimize`'s fastest inference setup for the device; its progress is a bar on a terminal, else a line
    as it starts (`spach.terminal`)."""
    if batch_size < 1:
        raise SpachError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise SpachError(f"--workers must be >= 0, got {workers}")
    if Path(pretrained).is_dir():
        raise CheckpointError(f"checkpoint {pretrained} is a folder; pass the path of a .pth or .safetensors file")
    if not Path(pretrained).is_file():
        raise CheckpointError(f"checkpoint {pretrained} does not exist; pass the path of a .pth or .safetensors file")
    args = checkpoint.read_args(pretrained)
    if model and args.get("model") and model != args["model"]:
        raise CheckpointError(f"checkpoint {pretrained} is of model {args['model']!r}, not {model!r}; drop --model or pass the right one")
    checkpoint.import_recorded_plugins(args, imports, pretrained)
    model = model or args.get("model")
    if not model:
        raise SpachError(f"{pretrained} does not name its model; pass --model")
    d = setup(device)
    amp_dtype = parse_amp(amp, d.device)
    dataset = canonical_dataset(dataset)
    cfg = _eval_config(model, model_kwargs, args)
    size = img_size or args.get("img_size", 0)
    mean, std = args.get("mean") or None, args.get("std") or None
    # free probes (meta device) for the model's pretrained config, built at the size the model runs at (a model
    # may not build at its default: a window that tiles 32-pixel grids need not tile 224-pixel ones): an image
    # folder's resize, crop and mean/std come from it; in-memory sets bring their own, and their size
    probe = _probe(cfg, size) if dataset == "imagefolder" else None
    loader, n = eval_loader_for(probe, dataset, data_path, batch_size, workers, d.device, size, mean, std, skip_bad_images)
    first_x = next(iter(loader))[0]
    num_classes = _dataset_classes(loader)
    state = read_checkpoint(pretrained, use_ema)
    if probe is None:
        probe = _probe(cfg, size or first_x.shape[-1])
    _check_data_fits(state, getattr(probe, "pretrained_cfg", {}), pretrained, model, num_classes, first_x.shape[1], dataset,
                     data_path)
    net = build_model(dataclasses.replace(cfg, pretrained=""), num_classes, first_x.shape[1], size or first_x.shape[-1])
    load_strict(net, state)
    fast = optimize(net, device=d.device, dtype=amp_dtype or torch.float32, compile=compile)
    result = evaluate(fast, track(loader, f"spach eval: {model} on {n} {dataset} images, {d.device}"), d.device)
    result.update(model=model, checkpoint=str(pretrained), dataset=dataset, images=n, device=str(d.device))
    if throughput:
        result["throughput"] = measure_throughput(net, batch_size=batch_size, img_size=first_x.shape[-1], device=d.device,
                                                  dtype=amp_dtype, warmup=50, repeats=30)
    return result


def _eval_config(model: str, model_kwargs: dict | None, args: dict[str, Any]) -> TrainConfig:
    """The model's settings: `--model-kwargs`, else the checkpoint's own (read_args checked them)."""
    try:
        return TrainConfig(model=model, model_kwargs=args.get("model_kwargs", {}) if model_kwargs is None else model_kwargs,
                           pretrained="", drop_path=0.0)
    except ConfigError as e:
        raise SpachError(f"--model-kwargs {e.problem}") from None


def _probe(cfg: TrainConfig, size: int) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg, 1000, 3, size)


def _check_data_fits(state: dict[str, torch.Tensor], pretrained_cfg: dict[str, Any], path: str, model: str, classes: int,
                     channels: int, dataset: str, data_path: str | None) -> None:
    """A checkpoint whose head or first conv does not fit the data's classes or channels: one line blaming
    the data, not the checkpoint (a 1000-class ImageNet checkpoint on a 10-class folder)."""
    head, chans = head_and_channels(state, pretrained_cfg)
    data = f"the {dataset} data{f' at {data_path}' if data_path else ''}"
    if head is not None and head != classes:
        flags = f"--dataset {dataset}{f' --data-path {data_path}' if data_path else ''}"
        raise CheckpointError(f"checkpoint {path} classifies {head} classes but {data} holds {classes}: score it on the "
                              f"data it was trained on, or fine-tune it to these classes first: spach train --model "
                              f"{model} --pretrained {path} {flags}")
    if chans is not None and chans != channels:
        raise CheckpointError(f"checkpoint {path} takes {chans}-channel images but {data} holds {channels}-channel ones: "
                              "score it on the data it was trained on")


def _dataset_classes(loader: Any) -> int:
    ds = loader.data if hasattr(loader, "data") else loader.dataset.ds
    return len(ds.classes)


def load_strict(net: nn.Module, source: str | Path | dict[str, torch.Tensor], use_ema: bool = False) -> None:
    """Load every weight of `source` (a checkpoint file, or its state dict), the head included (evaluating a
    freshly initialised head would be meaningless)."""
    state = source if isinstance(source, dict) else read_checkpoint(source, use_ema)
    if hasattr(net, "config"):  # a spach model: official names are converted
        state = checkpoint_filter_fn(state, net)
    check_fits(state, net)
    net.load_state_dict(state)

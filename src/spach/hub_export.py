"""`spach export --format timm`: a model as a timm model folder (the Hugging Face Hub layout).

The folder holds `model.safetensors`, `config.json` in timm's format (`architecture`, `num_classes`,
`num_features`, `label_names`, `model_args` to rebuild the architecture, `pretrained_cfg` with the
preprocessing the model was trained and evaluated with) and a short model card, `README.md`. timm
writes the config (`timm.models._hub.save_config_for_hf`, what its `push_to_hf_hub` uses), so
`timm.create_model("local-dir:FOLDER", pretrained=True)` after `import spach` rebuilds the model, and
so does `"hf-hub:user/repo"` once the folder is uploaded. A SPACH-family model records its whole
config as `model_args` (a custom `net_arch` included; architecture `"spach"` for a model built from
overrides only); a timm model records what timm's factory kept. The folder is loaded back that way
and checked against the original before export writes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

from spach.errors import SpachError, first_line
from spach.files import atomic_save_safetensors, atomic_write_text, read_json, safetensors_metadata
from spach.models.registry import family_of_model
from spach.train import checkpoint
from spach.train.datasets import canonical_dataset, load_dataset

TIMM_FILES = ("model.safetensors", "README.md", "config.json")  # in the order written: config.json (what timm reads first) last


def write_timm_folder(net: nn.Module, name: str, pretrained: str | None, size: tuple[int, int], folder: Path,
                      tolerance: float) -> dict[str, Any]:
    """Write the timm layout of `net` (built by `spach.export.build`, weights from `pretrained`) into the
    empty `folder`, load it back through timm's `local-dir:` and check it; returns the max abs error."""
    info = _checkpoint_info(pretrained)
    args = info.get("args") or {}
    data_config, labels = _preprocessing(net, args, size)
    model_config: dict[str, Any] = {"label_names": labels} if labels and len(labels) == net.num_classes else {}
    draft = folder.parent / f"{folder.name}.config.json"  # timm's own writer, then adjusted
    try:
        save_config_for_hf(net, str(draft), model_config=model_config, model_args=_model_args(net), data_config=data_config)
    except (TypeError, ValueError) as e:
        raise SpachError(f"timm cannot describe {name} in a config.json ({first_line(e)})") from None
    config = json.loads(draft.read_text())
    draft.unlink()
    # the zoo entry's facts about the official checkpoint (its ImageNet top-1, notes, source, tag, licence) are
    # not these weights': the model card says where these come from
    for key in ("top1", "notes", "origin_url", "tag", "license"):
        config["pretrained_cfg"].pop(key, None)
    atomic_save_safetensors(net.state_dict(), {}, folder / "model.safetensors")
    atomic_write_text(folder / "README.md", model_card(name, net, config, info, pretrained))
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return {"max_abs_error": _check(net, folder, size, tolerance, name)}


def _checkpoint_info(pretrained: str | None) -> dict[str, Any]:
    """What a spach checkpoint records beside its weights (`args`, `epoch`, `top1`), plus the run's
    `summary.json` when it lies beside it."""
    if not pretrained:
        return {}
    metadata = safetensors_metadata(pretrained)
    raw = metadata if metadata is not None else checkpoint.load(pretrained)
    info = {k: raw.get(k) for k in ("args", "epoch", "top1")}
    info["args"] = checkpoint.checked_args(info["args"], pretrained)  # read_args' checks, without loading the file again
    summary = read_json(Path(pretrained).parent / "summary.json", warn=False)
    info["summary"] = summary if isinstance(summary, dict) else {}
    run = read_json(Path(pretrained).parent / "config.json", warn=False)  # the run's resolved lr and total batch
    same_run = isinstance(run, dict) and all(run.get(k) == info["args"].get(k) for k in ("lr", "batch_size", "lr_base_size"))
    info["resolved"] = run["resolved"] if same_run and isinstance(run.get("resolved"), dict) else {}
    return info


def _model_args(net: nn.Module) -> dict[str, Any] | None:
    """The whole config of a spach-family model (drop rates aside: they do not change what it computes);
    None for a timm model (timm's factory recorded its arguments)."""
    if family_of_model(net) is None or not dataclasses.is_dataclass(getattr(net, "config", None)):
        return None
    config = dataclasses.asdict(net.config)
    return {k: v for k, v in config.items() if not (k.startswith("drop") or k.endswith("drop_rate"))}


def _preprocessing(net: nn.Module, args: dict[str, Any], size: tuple[int, int]) -> tuple[dict[str, Any], list[str] | None]:
    """timm's data config (input size, mean/std, interpolation, crop) for how the run evaluated, and its
    class names. A checkpoint without a training config keeps the model's own (ImageNet) preprocessing."""
    cfg = net.pretrained_cfg
    in_chans = getattr(net, "in_chans", None) or cfg.get("input_size", (3,))[0]
    data: dict[str, Any] = {"input_size": (in_chans, *size)}
    if len(cfg.get("mean", ())) not in (1, in_chans):  # ImageNet's 3 values for a model of other channels: their average
        data.update(mean=(sum(cfg["mean"]) / len(cfg["mean"]),), std=(sum(cfg["std"]) / len(cfg["std"]),))
    if "dataset" not in args:  # official or bare weights: the model's own (ImageNet) preprocessing
        return data, None
    try:
        dataset = canonical_dataset(str(args.get("dataset") or "imagefolder"))
    except SpachError:
        return data, None
    mean, std = args.get("mean") or None, args.get("std") or None
    if dataset == "imagefolder":  # timm's eval transform with the model's resize and crop
        root = Path(str(args.get("data_path") or "")) / "train"
        labels = sorted(e.name for e in os.scandir(root) if e.is_dir()) if root.is_dir() else None
        data.update(mean=tuple(mean or cfg["mean"]), std=tuple(std or cfg["std"]))
        return data, labels
    try:  # an in-memory set: its own statistics and names (the validation split is the smaller)
        split = load_dataset(dataset, args.get("data_path") or None, False, int(args.get("seed") or 0))
    except SpachError as e:
        raise SpachError(f"the run trained on {dataset}, which cannot be read to recover its class names and "
                         f"normalisation ({e}); export where the data is") from None
    # the engine's evaluation: the whole image, normalised, resized bilinearly to the model's size
    data.update(mean=tuple(mean or split.mean), std=tuple(std or split.std), interpolation="bilinear", crop_pct=1.0,
                crop_mode="center")
    return data, list(split.classes)


def _check(net: nn.Module, folder: Path, size: tuple[int, int], tolerance: float, name: str) -> float:
    """Load the folder back as a timm user will and compare outputs with the original."""
    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # any failure of timm's loader means the folder is not usable
        raise SpachError(f"timm cannot load the exported {name} back ({first_line(e)}); nothing was written") from None
    x = torch.randn(2, loaded.pretrained_cfg["input_size"][0], *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (loaded(x) - net(x)).abs().max().item()
    if not error <= tolerance:
        raise SpachError(f"the timm folder of {name} loads as a model that differs by {error:.2e} (max abs, more "
                         f"than {tolerance:g}); nothing was written")
    return error


def model_card(name: str, net: nn.Module, config: dict[str, Any], info: dict[str, Any], pretrained: str | None) -> str:
    """A short README.md: what was trained, on what, for how long, its measured top-1, how to load it."""
    args, summary = info.get("args") or {}, info.get("summary") or {}
    pcfg = config["pretrained_cfg"]
    params = sum(p.numel() for p in net.parameters())
    arch = config.get("model_args", {}).get("net_arch")
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:", "- image-classification",
             "- timm", "- spach", "---", "", f"# {config['architecture']}", ""]
    what = f"A custom SPACH model (`net_arch` {json.dumps(arch)})" if arch and name == "spach" else f"A `{name}` model"
    run = Path(pretrained).parent if pretrained else Path()
    if run.parent.parent.name == "runs" and run.name.startswith("seed"):  # a battle's runs/<contestant>/seed<k>
        what += f", battle contestant `{run.parent.name}` ({run.name})"
    lines.append(f"{what}, {params / 1e6:.2f}M parameters, {config['num_classes']} classes, exported by "
                 f"`spach export --format timm` from `{pretrained or 'freshly initialised weights'}`.")
    lines.append("")
    if "dataset" in args:
        def arg(key: str) -> str:
            return _plain(args.get(key, "?"))

        data = arg("dataset")
        subset = f", {arg('train_subset')} training images" if args.get("train_subset") else ""
        lines.append(f"- Trained with spach on {data}{subset} for {_plain(summary.get('epochs', args.get('epochs', '?')))} "
                     f"epoch(s) (of {arg('epochs')}), {_batch_and_lr(args, info.get('resolved') or {})}, seed {arg('seed')}.")
        if isinstance(info.get("top1"), (int, float)):
            val = f"{arg('val_subset')} validation images" if args.get("val_subset") else "the validation split"
            epoch = _plain(info.get("epoch", "?"))
            lines.append(f"- Top-1 {info['top1']:.2f}% on {val} of {data} (these weights, epoch {epoch}).")
        if isinstance(summary.get("best_top1"), (int, float)):
            final = summary.get("final_top1")
            final_text = f"{final:.2f}%" if isinstance(final, (int, float)) else "not recorded"
            lines.append(f"- The run's summary: best top-1 {summary['best_top1']:.2f}%, final {final_text}.")
    else:
        lines.append("- Not a spach training checkpoint: what it was trained on is not recorded here.")
    lines.append(f"- Input {'x'.join(map(str, pcfg['input_size']))}, mean {list(pcfg.get('mean', []))}, std "
                 f"{list(pcfg.get('std', []))}, {pcfg.get('interpolation', '?')} resize, crop_pct {pcfg.get('crop_pct', '?')}.")
    plugins = [Path(i).name for i in args.get("imports") or []]
    if plugins:  # a name as a code span when it is plain (no Markdown in it), else not shown
        names = ", ".join(f"`{n}`" if re.fullmatch(r"[A-Za-z0-9_.-]+", n) else "(a file of another name)" for n in plugins)
        lines.append(f"- Its mixers come from the plugin(s) its run imported ({names}): import them before loading it.")
    lines += ["", "## Use", "", "```python", "import spach  # registers the SPACH architectures with timm", "import timm",
              "", 'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
              "# after uploading (huggingface_hub.upload_folder(repo_id=..., folder_path=...)):",
              '# model = timm.create_model("hf-hub:USER/REPO", pretrained=True)',
              "cfg = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**cfg)", "```", ""]
    return "\n".join(lines)


def _batch_and_lr(args: dict[str, Any], resolved: dict[str, Any]) -> str:
    """The batch and learning rate the run trained with: the total batch and the lr as scaled to it (the run's
    config.json), else the per-process batch and the base lr with its scaling."""
    total, lr = resolved.get("total_batch"), resolved.get("lr")
    if isinstance(total, int) and isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return f"batch {total}, lr {lr:.6g}"
    base = _plain(args.get("lr_base_size", "?"))
    scaled = f"base lr {_plain(args.get('lr', '?'))} x total batch / {base}" if args.get("lr_base_size") else f"lr {_plain(args.get('lr', '?'))}"
    return f"batch {_plain(args.get('batch_size', '?'))} per process, {scaled}"


def _plain(value: Any) -> str:
    """A value read from a checkpoint, as short plain text for the card (no control characters, no Markdown)."""
    text = "".join(c if c.isprintable() else " " for c in str(value))[:60]
    return text.translate(str.maketrans({c: " " for c in "[]()`<>*_|#"}))

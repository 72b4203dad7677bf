"""Checkpoints: safe reading, strict loading for every family (through its own filter), and the SPACH
family's official <-> spach parameter-name converter.

Official names (microsoft/SPACH) -> ours:
    norm1 / norm2 (model level)           -> norm_pre / norm
    blocks.{j}.*                          -> stages.0.blocks.{j}.*            (single-stage)
    layer1.{j}.*                          -> stages.0.blocks.{j}.*            (multi-stage)
    layer{s}.0.net.1.{0,1}.*              -> stages.{s-1}.downsample.{conv,norm}.*
    layer{s}.{j}.*  (s > 1)               -> stages.{s-1}.blocks.{j-1}.*
  inside a block:
    gamma_1 [1, 1, C]                     -> gamma [C]
    spatial_func.* / channel_func.*       -> mixer.* / mlp.*
    cpe_net.net.1.*                       -> cpe.*
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any

import torch
import torch.nn as nn

from spach.errors import CheckpointError, SpachError, first_line
from spach.files import is_safetensors, read_safetensors
from spach.models.registry import family_of_checkpoint, family_of_model

# Official checkpoints may hold the training arguments as an argparse.Namespace: harmless data,
# so allow it for weights_only loading (everything else that is not a tensor container stays refused).
# Allowed per load, not globally: timm's loader removes it from torch's global list when it is done.
_SAFE_GLOBALS = [argparse.Namespace]

_BLOCK_TO_SPACH = [
    (re.compile(r"^gamma_1$"), "gamma"),
    (re.compile(r"^spatial_func\."), "mixer."),
    (re.compile(r"^channel_func\."), "mlp."),
    (re.compile(r"^cpe_net\.net\.1\."), "cpe."),
]
_BLOCK_TO_OFFICIAL = [
    (re.compile(r"^gamma$"), "gamma_1"),
    (re.compile(r"^mixer\."), "spatial_func."),
    (re.compile(r"^mlp\."), "channel_func."),
    (re.compile(r"^cpe\."), "cpe_net.net.1."),
]
_TOP_TO_SPACH = {"norm1.": "norm_pre.", "norm2.": "norm."}
_TOP_TO_OFFICIAL = {v: k for k, v in _TOP_TO_SPACH.items()}


def _sub(rules: list[tuple[re.Pattern, str]], rest: str) -> str:
    for pattern, repl in rules:
        if pattern.search(rest):
            return pattern.sub(repl, rest, count=1)
    return rest


def is_official(state_dict: dict[str, Any]) -> bool:
    return not any(k.startswith("stages.") for k in state_dict)


def official_to_spach(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official SPACH state dict in our parameter names (`layer2.1.spatial_func.qkv` -> `stages.1.blocks.0.mixer.qkv`)."""
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^blocks\.(\d+)\.(.+)$", key):
            key = f"stages.0.blocks.{m[1]}.{_sub(_BLOCK_TO_SPACH, m[2])}"
        elif m := re.match(r"^layer(\d+)\.0\.net\.1\.([01])\.(.+)$", key):
            key = f"stages.{int(m[1]) - 1}.downsample.{'conv' if m[2] == '0' else 'norm'}.{m[3]}"
        elif m := re.match(r"^layer(\d+)\.(\d+)\.(.+)$", key):
            stage, j = int(m[1]) - 1, int(m[2]) - (1 if m[1] != "1" else 0)
            key = f"stages.{stage}.blocks.{j}.{_sub(_BLOCK_TO_SPACH, m[3])}"
        else:
            key = next((new + key[len(old):] for old, new in _TOP_TO_SPACH.items() if key.startswith(old)), key)
        if key.endswith(".gamma") and value.ndim == 3:
            value = value.reshape(-1)
        out[key] = value
    return out


def spach_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export to the official layout (e.g. to evaluate weights trained here with the official code)."""
    if "pos_embed" in state_dict:
        raise CheckpointError("the official SPACH code has no position embedding; a pos_embed model cannot be exported")
    single = not any(k.startswith("stages.1.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", key):
            key = f"layer{int(m[1]) + 1}.0.net.1.{0 if m[2] == 'conv' else 1}.{m[3]}"
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
            stage, j, rest = int(m[1]), int(m[2]), _sub(_BLOCK_TO_OFFICIAL, m[3])
            key = f"blocks.{j}.{rest}" if single else f"layer{stage + 1}.{j + (stage > 0)}.{rest}"
            if rest == "gamma_1":
                value = value.reshape(1, 1, -1)
        else:
            key = next((new + key[len(old):] for old, new in _TOP_TO_OFFICIAL.items() if key.startswith(old)), key)
        out[key] = value
    return out


def load_file(path: str | os.PathLike) -> Any:
    """`torch.load` of a checkpoint file, safely (`weights_only=True`: tensors and plain data only),
    every failure a one-line CheckpointError that says what is wrong with the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; pass the path of a checkpoint file inside it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth or .safetensors file")
    if str(path).endswith(".safetensors"):  # torch.load reads such a name as safetensors, whatever it holds
        if _is_torch_file(path):
            raise CheckpointError(f"cannot read checkpoint {path}: it is a PyTorch checkpoint named .safetensors; "
                                  "rename it to .pth")
        raise CheckpointError(f"cannot read checkpoint {path}: its safetensors header is missing or corrupt (a truncated file?)")
    if _is_web_page(path):  # torch would call it an unsafe pickle
        raise CheckpointError(f"cannot read checkpoint {path}: it is a web page (HTML), not a checkpoint (a failed or "
                              "blocked download?); download it again")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or isinstance(e, pickle.UnpicklingError):
            reason = ("it holds Python objects other than tensors and plain data, which spach refuses to unpickle; "
                      "re-save its state dict (torch.save(model.state_dict(), path)) from a trusted copy")
        else:
            reason = (f"the file is truncated or not a PyTorch checkpoint ({type(e).__name__}: "
                      f"{first_line(e)[:80]}); re-save or re-download it")
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _is_torch_file(path: str | os.PathLike) -> bool:
    """Whether a file starts as `torch.save` writes one: a zip archive, or a pickle (the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _is_web_page(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        head = f.read(256).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


def read_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its model state dict.

    A safetensors file (told by its content, whatever its name) holds the weights themselves. Any other
    file is read with `torch.load(weights_only=True)`: a bare state dict or a dict holding it under
    `model` (the official code's choice), `model_ema`/`state_dict_ema` (taken when `use_ema`, or when
    there is nothing else) or `state_dict`.
    """
    if os.path.isfile(path) and is_safetensors(path):  # tensors and a JSON header only: nothing to unpickle
        try:
            ckpt = read_safetensors(path)[0]
        except SpachError as e:
            raise CheckpointError(str(e)) from None
    else:
        ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    order = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict", "model_ema", "state_dict_ema")
    for key in order:
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict (expected tensors under 'model' or at the top level)")
    return state


def check_fits(state_dict: dict[str, torch.Tensor], model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Raise one clear line when `state_dict` (spach names) does not match `model` exactly."""
    mine = model.state_dict()
    own = {k: v.shape for k, v in mine.items() if not k.startswith(skip_prefixes)}
    theirs = {k: v.shape for k, v in state_dict.items() if not k.startswith(skip_prefixes)}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {tuple(theirs[k])} vs model {tuple(own[k])}" for k in own if k in theirs and theirs[k] != own[k]]
    # load_state_dict would cast integers into float weights without a word (garbage, then NaN losses)
    # (the head too, even where timm drops it: integer weights mean a damaged or mislabelled file)
    kinds = [f"{k} is {_dtype(state_dict[k])}, expected floating point ({_dtype(v)})" for k, v in mine.items()
             if k in state_dict and v.is_floating_point() and not state_dict[k].is_floating_point()]
    if not (missing or unexpected or shapes or kinds):
        return
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes)}")
    if kinds:
        parts.append(f"not floating point: {few(kinds)}")
    theirs_family, own_family = family_of_checkpoint(state_dict), family_of_model(model)
    if theirs_family is not None and theirs_family is not own_family:
        hint = f"it is a {theirs_family.title} checkpoint"
    elif kinds and not (missing or unexpected or shapes):
        hint = "the file is damaged or mislabels its tensors; re-save it from the trained model"
    else:
        hint = "is it a checkpoint of another model or img_size?"
    raise CheckpointError(f"checkpoint does not fit model {name} ({'; '.join(parts)}); {hint}")


def head_and_channels(state_dict: dict[str, torch.Tensor], pretrained_cfg: dict[str, Any]) -> tuple[int | None, int | None]:
    """(classes, input channels) read off a checkpoint's weights: its classifier's rows and its first conv's
    input channels (names from the model's pretrained config); None where it has no such tensor."""
    head = state_dict.get(f"{pretrained_cfg.get('classifier', 'head')}.weight")
    conv = state_dict.get(f"{pretrained_cfg.get('first_conv', 'stem.proj')}.weight")
    return (int(head.shape[0]) if head is not None and head.ndim else None), \
        (int(conv.shape[1]) if conv is not None and conv.ndim == 4 else None)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The SPACH family's filter (timm's `pretrained_filter_fn`): convert official names and check the
    fit (the head is left to timm, which drops it when num_classes differs)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if is_official(state_dict):
        state_dict = official_to_spach(state_dict)
    check_fits(state_dict, model, skip_prefixes=("head.",))
    return state_dict


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> nn.Module:
    """Load an official or spach checkpoint into a model of any spach family, strictly, through the
    family's filter. A head of another class count is left at its fresh init (fine-tuning);
    everything else must match exactly."""
    family = family_of_model(model)
    if family is None:
        raise CheckpointError(f"{type(model).__name__} is not a model of a spach family; load its weights with its own code")
    state = family.filter_fn(read_checkpoint(path, use_ema), model)
    prefix = family.classifier + "."
    head = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not head or any(k not in state or state[k].shape != v.shape for k, v in head.items()):
        state = {k: v for k, v in state.items() if not k.startswith(prefix)} | head
    check_fits(state, model)
    model.load_state_dict(state, strict=True)
    return model

"""The official checkpoints, one line away: `timm.create_model(name, pretrained=True)` (after `import
spach`), `spach.create_model(name, pretrained=True)` and `spach eval --model NAME --pretrained`.

Each model whose checkpoint the authors publish has it as the `url` of its pretrained config
(`registry.OFFICIAL_WEIGHTS`). It is downloaded once into timm's and torch hub's cache
(`torch.hub.get_dir()/checkpoints`: `$TORCH_HOME/hub/checkpoints`, or timm's `cache_dir=`) with torch's
downloader (a progress bar on a terminal only), into a temporary file beside its place there, and
moved into place only once it reads as this model's checkpoint (the official-to-spach conversion
and the strict fit pass): a cut transfer, an HTML error page or another model's file is one line
and leaves nothing behind, so the next call downloads again. It then loads through spach's one
loader (`convert.load_checkpoint`: weights_only, the official `argparse.Namespace` allowed, strict).

`SPACH_WEIGHTS_URL` redirects every download to a mirror (`https://host/path/`) or a local folder:
the file of the same name there is fetched (and cached) instead. A server that stops sending for
`SPACH_DOWNLOAD_TIMEOUT` seconds (default 60) fails the download instead of hanging it.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import urllib.error
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import timm
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from spach.errors import CheckpointError, SpachError
from spach.models.convert import check_fits, load_checkpoint, read_checkpoint
from spach.models.limits import check_size
from spach.models.registry import OFFICIAL_WEIGHTS, Family, family_of_variant, feature_net, sync_cfg

MIRROR_ENV = "SPACH_WEIGHTS_URL"
TIMEOUT_ENV = "SPACH_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_FILE_WAY = "or load a copy with pretrained_cfg_overlay=dict(file=PATH) (spach eval: --pretrained PATH)"


def cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of `url` is cached: timm's and torch hub's folder (`torch.hub.get_dir()/checkpoints`,
    which follows TORCH_HOME and XDG_CACHE_HOME), or `cache_dir`; named as in the URL."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / os.path.basename(urlparse(url).path)


def source_url(url: str) -> str:
    """`url`, or the file of the same name on the mirror or in the folder `SPACH_WEIGHTS_URL` names."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return url
    name = os.path.basename(urlparse(url).path)
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return (Path(base).expanduser().resolve() / name).as_uri()


def with_weights() -> list[str]:
    return sorted(OFFICIAL_WEIGHTS)


def _no_weights(name: str) -> SpachError:
    return SpachError(f"no official weights are published for {name}; these models have them: {', '.join(with_weights())}; "
                      "load weights of your own with pretrained=PATH (timm: pretrained_cfg_overlay=dict(file=PATH); "
                      "spach eval: --pretrained PATH)")


def official_source(variant: str, kwargs: dict[str, Any]) -> str | None:
    """The URL `pretrained=True` downloads for this `timm.create_model` call, or None when its pretrained
    config names another source (`file=`, `state_dict=`, the Hub), which timm loads its own way."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.state_dict or cfg.file or cfg.hf_hub_id or cfg.source in ("hf-hub", "local-dir"):
        return None
    if not cfg.url:
        raise _no_weights(variant)
    return cfg.url


def _reference(name: str) -> nn.Module:
    """The model the official checkpoint of `name` belongs to, with its default arguments (no memory)."""
    with torch.device("meta"):
        return timm.create_model(name)


def validate(path: Path, name: str) -> None:
    """Raise a CheckpointError unless `path` reads as a checkpoint of model `name` (converted, strict fit)."""
    model = _reference(name)
    family = family_of_variant(name)
    check_fits(family.filter_fn(read_checkpoint(path), model), model)


def fetch(name: str, url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached checkpoint of model `name` from `url` (or its mirror), downloaded and validated first
    when it is not cached yet."""
    target = cache_path(url, cache_dir)
    if target.is_file():
        return target
    src, timeout = source_url(url), download_timeout()  # a bad timeout is refused before anything is written
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")  # beside its place: the rename is atomic
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        part.open("xb").close()
    except OSError as e:
        raise SpachError(f"cannot write to the weights cache {target.parent} ({e.strerror or e}); point TORCH_HOME at a "
                         f"writable folder (the cache is $TORCH_HOME/hub/checkpoints), {_FILE_WAY}") from None
    try:
        try:
            _download(src, part, timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise SpachError(f"cannot download the official weights of {name} from {src} ({_reason(e, timeout)}); copy {url} "
                             f"to {target}, set {MIRROR_ENV} to a mirror URL or a folder holding {target.name}, "
                             f"{_FILE_WAY}") from None
        try:
            validate(part, name)
        except CheckpointError as e:
            reason = str(e).replace(f"checkpoint {part}", "the file")
            raise SpachError(f"the file downloaded from {src} is not the official checkpoint of {name} ({reason}); "
                             f"nothing was cached: try again, or copy the right file to {target}") from None
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target


def download_timeout() -> float:
    """Seconds a download may wait for the server's next bytes (`SPACH_DOWNLOAD_TIMEOUT`, default 60)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SpachError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds above 0; e.g. {TIMEOUT_ENV}=120")
    return value


def _download(src: str, part: Path, timeout: float) -> None:
    # torch's downloader opens the URL without a timeout, so a stalled server would hang it for good;
    # the socket default bounds each connect and read (not the whole transfer) and is put back after.
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(src, str(part), progress=sys.stderr.isatty())
    finally:
        socket.setdefaulttimeout(before)


def _reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
        return f"the server sent nothing for {timeout:g} s; {TIMEOUT_ENV} sets how long to wait"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def load_official(model: nn.Module, name: str, url: str, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Download (once) and load the official checkpoint of `name` into `model` (which may differ in
    its head: a head for another class count stays freshly initialised)."""
    return load_checkpoint(model, fetch(name, url, cache_dir))


def official_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached official checkpoint of zoo model `name` (downloaded and validated on first use)."""
    if family_of_variant(name) is None:
        raise SpachError(f"unknown model {name!r}; run 'spach models' for the list")
    if name not in OFFICIAL_WEIGHTS:
        raise _no_weights(name)
    return fetch(name, OFFICIAL_WEIGHTS[name], cache_dir)


def build(family: Family, variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's builder for a family variant (pretrained loading through the family's filter);
    `features_only=True` wraps the result with `feature_net`. The official checkpoints download through
    spach (validated before they enter the cache) and load through its one loader; other sources
    (file=, state_dict=, the Hub) take timm's way."""
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", None)
    kwargs.pop("feature_cls", None)  # always the getter: every family has forward_intermediates
    official = official_source(variant, kwargs) if pretrained else None
    check_size(variant, kwargs.get("img_size"),
               lambda: build_model_with_cfg(family.model_cls, variant, False, pretrained_filter_fn=family.filter_fn, **kwargs))
    model = build_model_with_cfg(
        family.model_cls, variant, pretrained and official is None, pretrained_filter_fn=family.filter_fn, **kwargs,
    )
    if official is not None:
        load_official(model, variant, official, kwargs.get("cache_dir"))
    sync_cfg(model, variant)
    return feature_net(model, out_indices) if features_only else model

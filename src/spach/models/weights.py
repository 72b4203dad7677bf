"""The official checkpoints, one line away: `timm.create_model(name, pretrained=True)` (after `import
spach`), `spach.create_model(name, pretrained=True)` and `spach eval --model NAME --pretrained`.

Each model whose checkpoint the authors publish has it as the `url` of its pretrained config
(`registry.OFFICIAL_WEIGHTS`). It is downloaded once into timm's and torch hub's cache
(`torch.hub.get_dir()/checkpoints`: `$TORCH_HOME/hub/checkpoints`, or timm's `cache_dir=`) by
`download` (bounded in time, every failure one line; a progress bar on a terminal only), into a
locked scratch folder beside its place there (`.spach-download-<pid>-<hex>/`), and moved into place
only once it reads as this model's checkpoint (the official-to-spach conversion and the strict fit
pass): a cut transfer, an HTML error page or another model's file is one line and leaves nothing
behind, so the next call downloads again. Ctrl-C and SIGTERM remove the scratch folder; one that a
killed process left (nobody holds its lock) is removed by the next download. The checkpoint then
loads through spach's one loader (`convert.load_checkpoint`: weights_only, the official
`argparse.Namespace` allowed, strict).

`SPACH_WEIGHTS_URL` redirects every download to a mirror (`https://host/path/`) or a local folder:
the file of the same name there is fetched (and cached) instead. `SPACH_DOWNLOAD_TIMEOUT` (default
60 s) bounds the wait for the server's next bytes and sets the slowest average rate a download may
keep (1 MiB per that many seconds, after twice that long; see `download`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import timm
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from spach.errors import CheckpointError, SpachError
from spach.files import os_error, scratch_folder
from spach.models.convert import check_fits, load_checkpoint, read_checkpoint
from spach.models.download import TIMEOUT_ENV, DownloadError, download, download_timeout  # noqa: F401 (TIMEOUT_ENV: re-exported)
from spach.models.limits import check_size
from spach.models.registry import OFFICIAL_WEIGHTS, Family, family_of_variant, feature_net, sync_cfg
from spach.signals import interrupting

MIRROR_ENV = "SPACH_WEIGHTS_URL"
SCRATCH_PREFIX = ".spach-download-"  # a download's scratch folder in the cache: <prefix><pid>-<hex>/<file>
LEGACY_STALE_S = 3600  # an unlocked temporary of an earlier spach or torch.hub untouched this long is abandoned
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
    with interrupting(), contextlib.ExitStack() as stack:  # SIGTERM too ends it as Ctrl-C does: nothing is left
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(target)
            part = stack.enter_context(scratch_folder(target, SCRATCH_PREFIX, "download folder")) / target.name
            file = stack.enter_context(part.open("xb"))
        except (OSError, SpachError) as e:
            # scratch_folder's SpachError is one about an OSError: its strerror names the cause best
            cause = e if isinstance(e, OSError) else e.__context__
            raise SpachError(f"cannot write to the weights cache {target.parent} ({getattr(cause, 'strerror', None) or e}); "
                             f"point TORCH_HOME at a writable folder (the cache is $TORCH_HOME/hub/checkpoints), "
                             f"{_FILE_WAY}") from None
        try:
            download(src, file, timeout, progress=sys.stderr.isatty())
        except DownloadError as e:
            raise SpachError(f"cannot download the official weights of {name} from {src} ({e}); copy {url} "
                             f"to {target}, set {MIRROR_ENV} to a mirror URL or a folder holding {target.name}, "
                             f"{_FILE_WAY}") from None
        except OSError as e:
            raise os_error(e, part) from None
        file.close()
        try:
            validate(part, name)
        except CheckpointError as e:
            reason = str(e).replace(f"checkpoint {part}", "the file")
            raise SpachError(f"the file downloaded from {src} is not the official checkpoint of {name} ({reason}); "
                             f"nothing was cached: try again, or copy the right file to {target}") from None
        os.replace(part, target)
    return target


def _remove_stale(target: Path) -> None:
    """Remove what killed downloads of `target` left before spach locked its temporaries: spach's own
    `.<name>.<hex>.part` and torch.hub's `<name>.<hex>.partial`, once untouched for LEGACY_STALE_S
    (nobody locks them, so only their age tells they are abandoned)."""
    for old in [*target.parent.glob(f".{target.name}.*.part"), *target.parent.glob(f"{target.name}.*.partial")]:
        try:
            if time.time() - old.stat().st_mtime > LEGACY_STALE_S:
                old.unlink()
        except OSError:
            pass


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

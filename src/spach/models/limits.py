"""The largest model spach builds, checked before any memory is taken: an input side of at most
`MAX_IMG_SIZE` pixels and at most `MAX_PARAMS` parameters. Every way a model is built passes here
(`spach train`, `eval`, `export`, and timm's `create_model`, a `local-dir:`/`hf-hub:` config.json
included), so a setting that would only run out of memory (a 100,000-px input, a token-mixing MLP of
137 GB) is one line naming it."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from spach.errors import SpachError

# An image side beyond 4096 pixels is a typo that would only run out of memory (train's --img-size too).
MAX_IMG_SIZE = 4096
# 2**31 parameters (8.6 GB of float32 weights): 24x the largest official model (ShiftViT-B, 89M).
MAX_PARAMS = 2**31


def check_size(name: str, img_size: Any, build: Callable[[], nn.Module]) -> None:
    """Refuse `name` at `img_size` (an int or (h, w); None: its own) when a side exceeds MAX_IMG_SIZE,
    or when `build()` (run on the meta device: no memory) makes more than MAX_PARAMS parameters."""
    sides = img_size if isinstance(img_size, (list, tuple)) else [img_size]
    too_big = [s for s in sides if isinstance(s, int) and s > MAX_IMG_SIZE]
    if too_big:
        raise SpachError(f"{name}: img_size {too_big[0]} is larger than {MAX_IMG_SIZE} pixels, the most spach builds a "
                         f"model for; pick a smaller img_size")
    if torch.get_default_device().type == "meta":  # a probe already: it takes no memory
        return
    with torch.device("meta"):
        model = build()
    params = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(params.values())
    if total > MAX_PARAMS:
        largest = max(params, key=params.get)
        raise SpachError(f"{name} with these settings would have {total / 1e9:.1f}G parameters ({total * 4 / 1e9:,.0f} GB "
                         f"of float32 weights; {largest} alone {params[largest] * 4 / 1e9:,.1f} GB), more than the "
                         f"{MAX_PARAMS / 1e9:.1f}G spach builds; lower img_size, the widths or the depths (a token-mixing "
                         "MLP grows with the square of the token count)")

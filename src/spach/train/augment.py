"""timm's PIL augmentations made safe across Pillow releases, applied once to a transform spach builds.

timm's RandAugment posterizes to `4 - int(m / 10 * 4)` bits with `inc1` (0 bits at full magnitude)
and to `int(m / 10 * 4)` bits without it (0 bits at magnitude 0). Old Pillow returned a black image
for 0 bits (keep no bit of any pixel); Pillow 13 raises `ValueError: bits must be between or equal to
1 and 8` inside a data-loader worker. `safe_transform` swaps timm's posterize op, in the transform's
own op objects only (timm's tables stay untouched), for `posterize`, which never hands Pillow a bit
count outside 1..8 and keeps the op's meaning at 0 bits.
"""
from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, defined for every bit count: >= 8 keeps the image, < 1 keeps no bit (black)."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits < 1:
        return img.point(lambda _: 0)  # every band of every pixel masked to 0, what `posterize(img, 0)` meant
    return ImageOps.posterize(img, bits)


def augment_ops(transform: Any) -> list[Any]:
    """Every timm AugmentOp inside `transform` (Compose, RandAugment, AutoAugment, AugMix)."""
    if isinstance(transform, auto_augment.AugmentOp):
        return [transform]
    found: list[Any] = []
    for attr in ("transforms", "ops", "policy"):
        children = getattr(transform, attr, None)
        if isinstance(children, (list, tuple)):
            for child in children:
                found += augment_ops(child)
    return found


def safe_transform(transform: Any) -> Any:
    """`transform` with each of its posterize ops replaced by `posterize` (in place; returned for chaining)."""
    for op in augment_ops(transform):
        if op.aug_fn is auto_augment.posterize or "Posterize" in op.name:
            op.aug_fn = posterize
    return transform

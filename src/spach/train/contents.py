"""What a data file says, checked field by field before anything uses it: the pixels, labels and class
names a CIFAR pickle or a Fashion-MNIST IDX file holds. A reader unpacks a file into named fields
(`{"data": ..., "labels": ...}`) and passes them with their schema to `check_fields`; a field of the
wrong type, dtype, shape or range is one line naming the file and the field.

The schema is what training needs: pixels are whole numbers in 0..255 (any numeric dtype, so a float64
file of NaN or 1e300 is refused, not cast to garbage), labels whole numbers in [0, classes), and class
names a list of one printable name per class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from spach.errors import SpachError

Check = Callable[[Any], Any]  # a field's value -> the value as used; raises FieldError


class FieldError(ValueError):
    """What is wrong with one field (completed into one line by `check_fields`)."""


def check_fields(path: Path, what: str, fields: dict[str, Any], schema: dict[str, Check], fix: str) -> dict[str, Any]:
    """Each field of `schema` checked and converted (`what`: the kind of file, for the message)."""
    checked = {}
    for name, check in schema.items():
        try:
            checked[name] = check(fields[name])
        except FieldError as e:
            raise SpachError(f"{what} {path}: {name} {e}; {fix}") from None
    return checked


def pixels(shape: tuple[int, ...]) -> Check:
    """Images of `shape` (per image) as uint8 (N, *shape); a flat row per image is reshaped."""
    def check(value: Any) -> np.ndarray:
        a = _numbers(value)
        size = int(np.prod(shape))
        if a.ndim == 2 and a.shape[1] == size:
            a = a.reshape(len(a), *shape)
        if a.shape[1:] != shape:
            want = " or ".join(dict.fromkeys([f"(N, {', '.join(map(str, shape))})", f"(N, {size})"]))
            raise FieldError(f"must be an array of shape {want}, got {a.shape}")
        _whole_in(a, 0, 255, "pixel values")
        return a.astype(np.uint8, copy=False)

    return check


def labels(classes: int) -> Check:
    """One class number in [0, classes) per image, as int64."""
    def check(value: Any) -> np.ndarray:
        a = _numbers(value)
        if a.ndim != 1:
            raise FieldError(f"must be a list of class numbers, got an array of shape {a.shape}")
        _whole_in(a, 0, classes - 1, "class numbers")
        return a.astype(np.int64)

    return check


def class_names(classes: int) -> Check:
    """`classes` printable names (str, or UTF-8 bytes as Python 2 wrote them)."""
    def check(value: Any) -> list[str]:
        if not isinstance(value, (list, tuple)):
            raise FieldError(f"must be a list of {classes} class names, got {_kind(value)}")
        if len(value) != classes:
            raise FieldError(f"holds {len(value)} names for {classes} classes")
        names = []
        for v in value:
            try:
                v = v.decode("utf-8") if isinstance(v, bytes) else v
            except UnicodeDecodeError:
                raise FieldError(f"holds a name that is not UTF-8 text: {v[:20]!r}") from None
            if not isinstance(v, str) or not v.isprintable():
                raise FieldError(f"must hold printable names (text), got {_kind(v) if not isinstance(v, str) else repr(v[:20])}")
            names.append(v)
        return names

    return check


def _numbers(value: Any) -> np.ndarray:
    """`value` as a numeric array (integers or floats); anything else (huge or mixed Python numbers,
    which numpy keeps as objects, text, booleans, ragged lists) is refused."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        a = None
    if a is None or a.dtype.kind not in "uif":
        what = "a ragged list" if a is None else f"{a.dtype} values" if a.dtype != object else "values that are not " \
            "machine numbers (e.g. integers beyond 64 bits)"
        raise FieldError(f"must hold numbers, got {what}")
    return a


def _whole_in(a: np.ndarray, low: int, high: int, what: str) -> None:
    """Every value of `a` a whole number in low..high."""
    if a.size == 0:
        return
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.floor(a))
        if bad.any():
            raise FieldError(f"must be whole numbers in {low}..{high} ({what}), found {a[bad].flat[0]:g}")
    lo, hi = a.min(), a.max()
    if lo < low or hi > high:
        raise FieldError(f"must be whole numbers in {low}..{high} ({what}), found {lo if lo < low else hi:g}")


def _kind(value: Any) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, (int, float)) else repr(value)

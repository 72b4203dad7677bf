"""Numbers and durations for people: `hms(seconds)`, `count(n)` and its inverse `parse_count(text)`."""
from __future__ import annotations

import math


def hms(seconds: float) -> str:
    """'m:ss', or 'h:mm:ss' from an hour on; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def count(n: float) -> str:
    """12.35M, 4.10k, 17."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def parse_count(text: str | float | int) -> float:
    """`count`'s inverse: 5e6, "5.2M", "800k", "1.5G" (case-insensitive suffix) -> a number; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:].lower(), 1.0)
    value = float(s[:-1] if scale != 1.0 else s)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value * scale

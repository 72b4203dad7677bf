"""Numbers and durations for people: `hms(seconds)`, `count(n)`."""
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

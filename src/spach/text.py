"""Text from outside (study files, plugins, exception messages) made safe to show on a terminal or in a
report: a control character (an ESC that recolours or rewrites the terminal, a carriage return that
overwrites the line) or a bidirectional control (U+202E shows text in another order than it is
stored) never gets through raw. `one_line` is the CLI's sanitiser for every message it prints;
`unsafe_char` lets a reader refuse such characters in the fields of a file.
"""
from __future__ import annotations

import unicodedata

# Unicode's Bidi_Control characters (the "Trojan Source" set), and the two line/paragraph separators
# (category Zl/Zp: a line break to a terminal, yet not a control character)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LINE_SEPARATORS = frozenset("\u2028\u2029")


def is_unsafe(ch: str) -> bool:
    """A control character (C0, DEL, C1), a bidi control, a line/paragraph separator or a lone surrogate
    (which cannot even be encoded to print)."""
    return ch in BIDI_CONTROLS or ch in LINE_SEPARATORS or unicodedata.category(ch) in ("Cc", "Cs")


def escape_char(ch: str) -> str:
    """`ch` as Python writes it in a string literal: ESC as \\x1b, U+202E as \\u202e."""
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every unsafe character written as its escape (see `is_unsafe`)."""
    return "".join(escape_char(ch) if is_unsafe(ch) else ch for ch in text)


def one_line(text: object, limit: int = 0) -> str:
    """`text` as one line a terminal shows as it is: its lines joined by a space (leading and trailing
    white space of each dropped, tabs made spaces), every other unsafe character escaped, and at most
    `limit` characters (0: any)."""
    lines = (line.strip().replace("\t", " ") for line in str(text).splitlines())
    s = escape(" ".join(line for line in lines if line))
    return s if not limit or len(s) <= limit else s[: limit - 1] + "…"


def unsafe_char(text: str, allow: str = "") -> str | None:
    """The first unsafe character of `text` that is not in `allow`, described for a message
    ('U+202E RIGHT-TO-LEFT OVERRIDE'), or None when there is none."""
    for ch in text:
        if ch not in allow and is_unsafe(ch):
            return f"U+{ord(ch):04X} {unicodedata.name(ch, 'control character')}"
    return None

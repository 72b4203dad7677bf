"""Rendering the report's blocks (headings, paragraphs, tables, figures) as Markdown and as one
self-contained HTML page (figures embedded as base64 PNG); user text is always shown, never rendered."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from spach.text import BIDI_CONTROLS, LINE_SEPARATORS, escape_char

Block = tuple[str, Any]  # (kind, payload): h1/h2/h3/p: text; table: (headers, rows); img: (name, path)
VERDICT_CLASSES = ("supported", "CONTRADICTED", "equivalent", "mixed", "inconclusive")


# control characters (C0 but newline and tab, DEL, C1): a terminal escape (ESC, BEL ...) in a description or a
# label is shown as a visible symbol, never written raw into report.md or report.html; so is a bidi control
# (U+202E would show a name reversed), a line separator or a lone surrogate (JSON's "\ud800": not even UTF-8),
# as its escape (spach.text)
_CONTROL = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"}
_CONTROL.update({0x7F: "\u2421", **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}})
_CONTROL.update({ord(ch): escape_char(ch) for ch in [*BIDI_CONTROLS, *LINE_SEPARATORS, *map(chr, range(0xD800, 0xE000))]})


_LINK = re.compile(r"\](?=[(\[:])")  # the `]` of `[x](url)`, `[x][ref]` and `[ref]: url`: escaped, no link forms


def visible(text: Any) -> str:
    """`text` with its control characters replaced by visible symbols (ESC shows as U+241B) and its bidi
    controls by their escapes (U+202E shows as \\u202e). Every piece of text in a report goes through here."""
    return str(text).translate(_CONTROL)


def _md_text(text: str) -> str:
    """Text for Markdown: HTML in it (a study's description or names) is shown, never rendered, and so are
    link and image brackets (`[x](javascript:...)`); `code` spans are kept as they are."""
    parts = visible(text).split("`")
    return "`".join(p if i % 2 else _LINK.sub(r"\\]", html.escape(p, quote=False)) for i, p in enumerate(parts))


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md_text(x))
        elif kind == "p":
            out.append(_md_text(x))
        elif kind == "table":
            headers, rows = x
            out.append("\n".join(["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]))
        elif kind == "img":
            name, path = x
            out.append(f"![{_md_cell(name)}]({Path(path).relative_to(base).as_posix()})")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}
.supported{color:#1a7f37;font-weight:600}.CONTRADICTED{color:#cf222e;font-weight:600}.inconclusive{color:#9a6700}
.equivalent{color:#0969da;font-weight:600}.mixed{color:#8250df;font-weight:600}"""


def _html_text(text: str) -> str:
    parts = html.escape(visible(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_cell(text: str) -> str:
    cls = str(text).split(" ")[0] if str(text).split(" ")[0] in VERDICT_CLASSES else ""
    return f'<td class="{cls}">{_html_text(text)}</td>' if cls else f"<td>{_html_text(text)}</td>"


def render_html(blocks: list[Block], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(visible(title))}</title><style>{_CSS}</style></head><body>"]
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_html_text(x)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_html_text(x)}</p>")
        elif kind == "table":
            headers, rows = x
            out.append("<table><tr>" + "".join(f"<th>{_html_text(h)}</th>" for h in headers) + "</tr>"
                       + "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows) + "</table>")
        elif kind == "img":
            name, path = x
            data = base64.b64encode(Path(path).read_bytes()).decode()
            out.append(f'<img alt="{html.escape(visible(name))}" src="data:image/png;base64,{data}">')
    return "\n".join(out + ["</body></html>"]) + "\n"

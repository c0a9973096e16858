"""report.html: the report's blocks (see ``report``) as one self-contained page.

Pictures are embedded as base64 PNG data URIs and the style sheet is inline, so the page can be mailed
or attached as a single file: it loads nothing from the network or the disk.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
td.better { background: #e3f4e1; } td.worse { background: #fbe3e1; }
code { background: #f5f5f5; padding: 0 0.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
"""


def inline(text: str) -> str:
    """Escape ``text`` and turn its **bold** and `code` spans into HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{inline(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            css = {"better": ' class="better"', "worse": ' class="worse"'}.get(cell, "")
            cells.append(f"<td{css}>{inline(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(blocks: list[tuple], folder: Path, title: str) -> str:
    """The page; image paths in the blocks are relative to ``folder`` and get embedded."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{inline(block[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            parts.append(_table(block[1], block[2]))
        elif kind == "img":
            caption = inline(block[2])
            parts.append(
                f'<figure><img alt="{html.escape(block[2])}" src="{data_uri(Path(folder) / block[1])}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )

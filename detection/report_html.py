"""``OUT/report.html``: ``report.md`` as one self-contained HTML page (pictures embedded as
base64 ``data:`` URLs), so it opens in any browser, sent as one file, with nothing else beside it.

It renders the Markdown that :mod:`detection.report` writes, which uses a small subset: ``#``
headings, ``|``-tables with a ``| --- |`` rule, ``![alt](relative/path.png)`` pictures, paragraphs,
inline ``code`` and ``**bold**``. Every text is HTML-escaped; a picture path must stay inside the
report's folder and name a PNG or JPEG file there (else it is left out with a warning).
"""
from __future__ import annotations

import base64
import html
import logging
import os
import re
from pathlib import Path

from .io.files import atomic_write_text

__all__ = ["markdown_to_html", "write_html_report"]

log = logging.getLogger(__name__)

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}code{background:#f2f2f2;padding:0 .2em}
figure{display:inline-block;margin:.5em}figure img{max-width:520px;height:auto;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}"""


def _inline(text: str) -> str:
    """Escape, then ``code`` and **bold** (in escaped text, so nothing in the data becomes markup)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _picture(alt: str, target: str, base: Path) -> str:
    path = (base / target).resolve()
    root = base.resolve()
    if root not in path.parents or path.suffix.lower() not in _MIME or not path.is_file():
        log.warning("report.html: picture %r is not a PNG/JPEG file inside %s: left out", target, base)
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:{_MIME[path.suffix.lower()]};base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def markdown_to_html(markdown: str, base: Path, title: str = "SPP-net detection report") -> str:
    """The report's Markdown as a standalone HTML page; pictures read from ``base`` and embedded."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            head, rest = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
        elif _IMAGE.fullmatch(line.strip()):
            figures = []
            while i < len(lines) and _IMAGE.fullmatch(lines[i].strip()):
                m = _IMAGE.fullmatch(lines[i].strip())
                figures.append(_picture(m[1], m[2], base))
                i += 1
            body.append("<div>" + "".join(figures) + "</div>")
        else:
            para = []
            while (i < len(lines) and lines[i].strip() and not lines[i].startswith("#")
                   and not lines[i].lstrip().startswith("|") and not _IMAGE.fullmatch(lines[i].strip())):
                para.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html_report(markdown_path: str | os.PathLike) -> Path:
    """Write ``report.html`` beside ``report.md`` (atomically), pictures embedded."""
    md = Path(markdown_path)
    dest = md.with_suffix(".html")
    atomic_write_text(dest, markdown_to_html(md.read_text(encoding="utf-8"), md.parent))
    return dest

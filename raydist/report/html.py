"""report.html: the Markdown report as one self-contained page, every plot inlined.

Python-Markdown (with its `tables` extension) turns report.md into HTML; every <img> that names
a file beside the report gets that file's bytes as a base64 data URI, so the page opens
anywhere (a browser on a laptop after `ray rsync-down`, a CI artefact) with nothing next to it.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

import markdown

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
"""

IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")')


def write(report_md: Path) -> Path:
    """report.html beside `report_md`, from its text and the images it names."""
    body = markdown.markdown(report_md.read_text(), extensions=["tables"], output_format="html")
    body = IMG_SRC.sub(lambda m: m[1] + inline(report_md.parent, m[2]) + m[3], body)
    title = html.escape(report_md.read_text().partition("\n")[0].lstrip("# ").strip())
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    path = report_md.with_suffix(".html")
    path.write_text(page)
    return path


def inline(folder: Path, src: str) -> str:
    """A data URI of the image `src` names in `folder`; `src` as it is if it names no file
    there (a URL, or a plot a report section did not draw)."""
    path = folder / html.unescape(src)
    if "://" in src or src.startswith("data:") or not path.is_file():
        return src
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"

"""report.html: the Markdown report as one self-contained page, loaded in a real headless
browser, alone in a folder of its own, where every plot must still render."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import SCALING, results_table, sweep_folder

from raydist.cli import main

pytestmark = pytest.mark.unit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Runs once the page and its images have loaded: their sizes, written into the DOM that
# --dump-dom prints (a broken or missing image has naturalWidth 0).
CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "imgcheck";
  out.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.complete, i.naturalWidth]));
  document.body.appendChild(out);
});
</script>"""


def report_folder(tmp_path: Path) -> Path:
    """A sweep folder (tests/test_report.py's scaling table) with its report written."""
    (tmp_path / "sweep").mkdir()
    folder = sweep_folder(tmp_path / "sweep", results_table(SCALING), "{target: 0.9}")
    assert main(["report", str(folder)]) == 0
    return folder


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def rendered_images(page: Path, profile: Path) -> list[list]:
    """[alt, complete, naturalWidth] of every <img> of `page` as headless Chromium shows it."""
    flags = ["--headless=new", "--disable-gpu", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--dump-dom"]
    if os.geteuid() == 0:  # Chromium's sandbox refuses to run as root
        flags.insert(0, "--no-sandbox")
    dom = subprocess.run([browser(), *flags, page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom, re.S)
    assert found, f"the check did not run; the browser printed: {dom[:500]!r}"
    return json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))


def test_report_html_holds_the_tables_and_inlines_every_plot(tmp_path):
    folder = report_folder(tmp_path)
    page = (folder / "report.html").read_text()
    markdown = (folder / "report.md").read_text()
    plots = re.findall(r"!\[([^]]*)\]\(([^)]+)\)", markdown)
    assert [alt for alt, _ in plots] == ["speedup", "curves"]
    assert re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page) == ["speedup", "curves"]
    assert page.count("<table>") == sum(line.startswith("|---") for line in markdown.splitlines())
    assert "<td>ddp</td>\n<td>4</td>\n<td>2</td>\n<td>630</td>\n<td>3.32</td>" in page


@pytest.mark.skipif(browser() is None, reason=f"no Chromium found (looked for {', '.join(BROWSERS)}); "
                    "`make setup` installs it where apt-get is available and it runs as root")
def test_every_plot_renders_in_a_headless_browser(tmp_path):
    folder = report_folder(tmp_path)
    alone = tmp_path / "elsewhere"  # no PNG beside it: only inlined images can render
    alone.mkdir()
    page = alone / "report.html"
    page.write_text((folder / "report.html").read_text().replace("</body>", CHECK + "\n</body>"))

    images = rendered_images(page, tmp_path / "profile")
    assert [alt for alt, _, _ in images] == ["speedup", "curves"]
    assert all(complete and width > 0 for _, complete, width in images), images

"""detection.report_html: report.html renders the report's Markdown subset with escaped text and
embedded pictures, and a real headless browser (Debian's chromium; skipped without it) shows it
with every picture loaded."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.backbones import build_backbone
from detection.data.voc import VOCDataset
from detection.detector import DetectorSettings, SPPDetector
from detection.proposals import SelectiveSearchConfig
from detection.report import write_report
from detection.report_html import markdown_to_html, write_html_report
from detection.timing import random_detector


def _png(path: Path, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    return path.read_bytes()


def test_markdown_subset_and_embedded_pictures(tmp_path):
    data = _png(tmp_path / "pics" / "a.png")
    _png(tmp_path.parent / "outside.png")
    md = ("# Title with `code`\n\nSome **bold** text <script>alert(1)</script> & more\n\n"
          "| class | AP |\n| --- | --- |\n| cat<b> | 0.500 |\n| **mAP** | **0.5** |\n\n"
          "![a](pics/a.png)\n![out](../outside.png)\n![none](pics/none.png)\n")
    page = markdown_to_html(md, tmp_path)
    assert "<h1>Title with <code>code</code></h1>" in page
    assert "<p>Some <strong>bold</strong> text &lt;script&gt;alert(1)&lt;/script&gt; &amp; more</p>" in page
    assert "<thead><tr><th>class</th><th>AP</th></tr></thead>" in page
    assert "<tr><td>cat&lt;b&gt;</td><td>0.500</td></tr>" in page and "---" not in page
    assert "<script>" not in page
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(s) for s in srcs] == [data]           # the outside and missing ones are left out


@pytest.fixture(scope="module")
def report_dir(synthetic_voc, tmp_path_factory):
    """A report as the pipeline writes it (a random ZF-5 detector, 2 test images drawn)."""
    out = tmp_path_factory.mktemp("report")
    dataset = VOCDataset(synthetic_voc, "test")
    settings = DetectorSettings(scales=(96,), feature_layer="fc7", proposals=SelectiveSearchConfig(max_boxes=50))
    det = random_detector(build_backbone("zf5"), len(dataset.classes), settings, hidden=(8, 8))
    det = SPPDetector(det.backbone, det.head, det.svms, det.regressors, dataset.classes, settings)
    metrics = {"AP": {c: 0.25 for c in dataset.classes}, "mAP": 0.25, "metric": "voc10"}
    write_report(out, metrics, None, dataset, det, None, num_images=2)
    return out


def test_write_report_writes_html_beside_markdown(report_dir):
    page = (report_dir / "report.html").read_text()
    assert (report_dir / "report.md").is_file()
    assert page.count('src="data:image/png;base64,') == 2 and "<h2>Accuracy</h2>" in page
    assert "<td>0.250</td>" in page and 'src="detections/' not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Appended to a copy of the page: the title becomes "<pictures decoded>/<pictures>" once loaded.
COUNTER = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
           " document.title = im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length; });"
           "</script>")


def _rendered_title(page: Path, tmp_path: Path) -> tuple[str, str]:
    probe = tmp_path / f"probe_{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", COUNTER + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-extensions", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"<title>([^<]*)</title>", proc.stdout)
    assert m, proc.stdout[:2000]
    return m[1], proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_a_headless_browser_with_every_picture_loaded(report_dir, tmp_path):
    title, dom = _rendered_title(report_dir / "report.html", tmp_path)
    assert title == "2/2"
    assert "<h1>SPP-net detection report</h1>" in dom and "<table>" in dom
    # the counter tells a picture that does not decode from one that does
    broken = tmp_path / "broken"
    _png(broken / "good.png")
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (broken / "report.md").write_text("# r\n\n![good](good.png)\n![bad](bad.png)\n")
    title, _ = _rendered_title(write_html_report(broken / "report.md"), tmp_path)
    assert title == "1/2"

"""report.html: what it shows, rendered in headless Chromium, and what it escapes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from helpers import rendered, scan_args
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.scan import ImageResult, ScanOptions
from pneumotriage.scan.rank import rank, tier_of
from pneumotriage.synth import write_study


def test_report_renders_in_chromium(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    CliRunner().invoke(app, scan_args(scan_input, out, models))
    dom = rendered(out / "report.html", tmp_path / "profile")
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    assert 'data-error="' not in dom, "a script error occurred"
    assert dom.count('class="row ') == 13
    assert dom.count('class="row urgent') + dom.count("implausible outline — check") >= 1
    assert '<span id="shown">13</span>' in dom


def test_escapes_dicom_text(tmp_path: Path, models: dict[str, Path]) -> None:
    import pydicom

    study = write_study(tmp_path / "s", 2, positive_rate=0.5, size=(128, 128), seed=1)
    path = study.out / study.images[0].path
    ds = pydicom.dcmread(path)
    ds.PatientID = "<script>document.body.setAttribute('data-error','x')</script>"
    ds.AccessionNumber = "A&B\"'"
    ds.save_as(path)
    for extra in ("manifest.json", "train-rle.csv"):
        (study.out / extra).unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, scan_args(study.out, out, models))
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "<script>document" not in html and "&lt;script&gt;" in html and "A&amp;B&quot;&#x27;" in html


def test_report_legend_and_an_implausible_outline(tmp_path: Path) -> None:
    """The report says what each tier means at the thresholds in force and what the red outline is; an outline
    over half the image is flagged "implausible outline — check" and tiered review, not urgent (checked in the
    page Chromium renders)."""
    from pneumotriage.postprocess import Outline, Thresholds
    from pneumotriage.scan.finish import implausible
    from pneumotriage.scan.outputs import summarise, write_outputs

    big = Outline(0, 0, np.ones((80, 100), dtype=bool), (100, 100))
    border = Outline(10, 0, np.pad(np.ones((70, 1), dtype=bool), ((0, 0), (0, 4))), (100, 100))
    inside = Outline(30, 30, np.ones((20, 20), dtype=bool), (100, 100))
    assert "covers 80% of the image" in (implausible(big) or "")
    assert "70% of the image's left border" in (implausible(border) or "")
    assert implausible(inside) is None
    rows = [
        ImageResult("flagged", "a.dcm", "ok", probability=0.97, segmented=True, area_px=8000, flag=implausible(big)),
        ImageResult("plain", "b.dcm", "ok", probability=0.9, segmented=True, area_px=400),
        ImageResult("calm", "c.dcm", "ok", probability=0.1, segmented=False),
    ]
    for i, r in enumerate(rows):
        r.file_stem, r.seq = r.image_id, i
        r.tier = tier_of(r, Thresholds(), ScanOptions(), True)
    assert [r.tier for r in rows] == ["review", "urgent", "routine"]
    thresholds = Thresholds()  # the defaults: gate 0.5 and the winners' triplet
    summary = summarise(
        tmp_path, rank(rows), counts={}, models=[], thresholds=thresholds, no_segment=False, plan={}, skipped=[],
        timings={},
    )  # fmt: skip
    # The flagged image's overlay and report thumbnail, as a scan leaves them.
    for folder, size in (("overlays", 256), (".scan/thumbs", 64)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (200, 30, 30)).save(tmp_path / folder / "flagged.jpg")
    rows[0].overlay_file, rows[0].study_datetime = "overlays/flagged.jpg", "2019-03-04T10:22:05"
    rows[0].view_position, rows[0].modality = "PA", "CR"
    write_outputs(summary)
    html = (tmp_path / "report.html").read_text()
    assert ">2019-03-04 10:22<" in html and ">PA<" in html and ">CR<" in html
    assert "at least 2000 pixels of a 1024 x 1024 image (scaled to each image's size" in html
    assert "above 0.75, the outline then drawn at 0.3" in html
    assert (
        "nothing outlined but classifier probability ≥ the review threshold 0.5" in html
        and "outline is drawn in red" in html
    )
    worklist = list(csv.DictReader(open(tmp_path / "worklist.csv", newline="")))
    assert worklist[1]["image_id"] == "flagged" and worklist[1]["flag"].startswith("implausible outline — check")
    dom = rendered(tmp_path / "report.html", tmp_path / "profile")
    assert 'data-ready="1"' in dom and 'data-error="' not in dom
    assert "implausible outline — check: it covers 80% of the image" in dom
    assert "the segmenter outlined a pneumothorax (at least 2000 pixels" in dom  # the legend, rendered
    assert dom.count('class="row urgent') == 1 and dom.count('class="row review') == 1
    assert 'id="lightbox" title="click to close" style="display: flex;"' not in dom  # closed until asked
    # A link's #view= clicks the image's thumbnail, as a reader does: the overlay at full size, from the file.
    report = tmp_path / "report.html"
    opened = rendered(report.as_uri() + "#view=flagged", tmp_path / "profile2")
    assert 'id="lightbox" title="click to close" style="display: flex;"' in opened
    assert '<img id="big" alt="overlay of flagged" src="data:image/jpeg;base64,' in opened
    # Without a segmenter the legend gives the urgent probability in force instead of the unused triplet.
    summary.urgent_probability, summary.decisions = 0.85, "classifier"
    write_outputs(summary)
    html = (tmp_path / "report.html").read_text()
    assert "classifier probability ≥ 0.85" in html and "pixels of a 1024 x 1024 image" not in html

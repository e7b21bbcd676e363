"""report.html: what it shows, rendered in headless Chromium, and what it escapes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from browser import Page
from helpers import read_rows, rendered, scan_args
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.scan import Decisions, ImageResult
from pneumotriage.scan.tiers import rank, tier_of
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
    # Every row says why it has its tier, in the worklist too; the unreadable file says what is wrong with it.
    worklist = read_rows(out / "worklist.csv")
    assert all(row["reason"] for row in worklist)
    broken = next(row for row in worklist if row["image_id"] == "broken")
    assert broken["reason"].startswith("unreadable: ") and str(scan_input) not in broken["reason"]


def _reading_list(out: Path, n: int = 30) -> list[ImageResult]:
    """A ranked scan of ``n`` images as a scan leaves it (pictures included): urgent, review and routine rows with
    long UID-like ids and patient ids, an unreadable file and one not triaged."""
    from pneumotriage.outlayout import OutLayout
    from pneumotriage.postprocess import Thresholds
    from pneumotriage.scan.outputs import summarise, write_outputs

    rng = np.random.default_rng(3)
    thresholds = Thresholds(gate=0.2, review=0.5)
    rows = []
    for i in range(n):
        stem = f"1.2.826.0.1.3680043.8.498.{10**20 + i * 7919}"
        p = float(rng.random())
        r = ImageResult(stem, f"/data/{stem}.dcm", "ok", probability=p, segmented=p >= thresholds.gate)
        r.patient_id, r.accession = f"{i:04d}a1b2-c3d4-e5f6-7788-99aabbccdd{i:02d}", f"ACC{i:06d}"
        r.study_datetime, r.view_position, r.modality, r.file_stem, r.seq = "2019-03-04T10:22:05", "PA", "CR", stem, i
        if p > 0.8:
            r.area_px, r.area_cm2, r.side = 900 + i, 8.25, "left"
            r.overlay_file = f"overlays/{stem}.jpg"
        rows.append(r)
    rows.append(ImageResult("broken", "/data/broken.dcm", "error", error="/data/broken.dcm: the file ends early"))
    rows.append(ImageResult("head", "/data/head.dcm", "not triaged", error="/data/head.dcm: not triaged: modality CT"))
    for i, r in enumerate(rows):
        r.seq = i
        r.tier = tier_of(r, thresholds, Decisions(), True)
    ranked = rank(rows)
    summary = summarise(
        out, ranked, counts={}, models=[], thresholds=thresholds, no_segment=False, plan={}, skipped=[], timings={}
    )
    for folder in ("overlays", ".scan/thumbs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for r in ranked:
        if r.file_stem is None:
            continue
        grey = int(40 + 200 * (r.probability or 0))
        Image.new("RGB", (192, 192), (grey, grey, grey)).save(OutLayout(out).thumbnail(r.file_stem))
        if r.overlay_file:
            Image.new("RGB", (512, 512), (200, 30, 30)).save(out / r.overlay_file)
            Image.new("RGB", (512, 512), (grey, grey, grey)).save(OutLayout(out).plain_thumbnail(r.file_stem))
    write_outputs(summary)
    return ranked


def _lightbox(page: Page) -> tuple[str | None, str | None]:
    """The lightbox's state: (the image id it shows or None when closed, its picture's alt text)."""
    view = page.value(
        "document.getElementById('lightbox').style.display==='flex'?"
        "document.getElementById('lightbox').getAttribute('data-view'):null"
    )
    return view, page.value("document.getElementById('big').alt")


def test_the_report_is_a_reading_list_at_desk_and_phone_widths(tmp_path: Path) -> None:
    """At 1280 and 420 px the first rows' picture and tier are on screen; the lightbox opens for an urgent and a
    routine row with a caption, the outline turns off and on, the arrow keys move through the worklist in its
    order, Esc closes it, and #view= opens any row."""
    out = tmp_path / "out"
    ranked = _reading_list(out)
    ids = [r.image_id for r in ranked]
    report = (out / "report.html").as_uri()
    with Page(tmp_path / "profile", 1280, 800) as page:
        for width, height in ((1280, 800), (420, 860)):
            page.resize(width, height)
            page.open(report)
            assert page.value("document.body.getAttribute('data-error')") is None
            for row in (1, 2):
                for cell in ("td.pic", "td.tier"):
                    assert page.inside(f"#worklist tbody tr:nth-child({row}) {cell}"), (width, row, cell)
            shot = page.screenshot(tmp_path / f"report-{width}.png")
            with Image.open(shot) as picture:
                assert picture.width == width
        page.resize(1280, 800)
        page.open(report)
        # One line a row at desk width: a row is no taller than its picture, even with a long reason.
        heights = page.value(
            "Array.prototype.map.call(document.querySelectorAll('#worklist tbody tr'),"
            "function(r){return r.getBoundingClientRect().height;})"
        )
        assert max(heights) < 90, heights
        # An urgent row: its overlay, then the picture without the outline, and a caption that says what it is.
        assert ranked[0].tier == "urgent"
        page.click("#worklist tbody tr:nth-child(1) button.open")
        assert _lightbox(page) == (ids[0], f"overlay of {ids[0]}")
        caption = page.value("document.getElementById('caption').textContent")
        assert ids[0] in caption and "#1 urgent" in caption and "8.2 cm²" in caption and "patient 0" in caption
        page.click("#outline")
        assert _lightbox(page) == (ids[0], ids[0])
        page.click("#outline")
        assert _lightbox(page)[1] == f"overlay of {ids[0]}"
        # The arrow keys go through the worklist in its order; Esc closes.
        page.key("ArrowRight")
        page.key("ArrowRight")
        assert _lightbox(page)[0] == ids[2]
        page.key("ArrowLeft")
        assert _lightbox(page)[0] == ids[1]
        assert page.value("location.hash") == f"#view={ids[1]}"
        page.key("Escape")
        assert _lightbox(page)[0] is None
        # A routine row opens too, and says so.
        routine = next(i for i, r in enumerate(ranked) if r.tier == "routine")
        page.click(f"#worklist tbody tr:nth-child({routine + 1}) button.open")
        assert _lightbox(page) == (ids[routine], ids[routine])
        assert "routine" in page.value("document.getElementById('caption').textContent")
        page.key("Escape")
        # #view= opens any row, the not-triaged one too (its reason in the caption); an unknown id says so.
        page.open(report + "#view=head")
        assert _lightbox(page)[0] == "head"
        assert "not triaged: modality CT" in page.value("document.getElementById('caption').textContent")
        page.open(report + "#view=nobody")
        assert _lightbox(page)[0] is None
        assert "No row has the image id nobody" in page.value("document.getElementById('missing').textContent")


def test_escapes_dicom_text(tmp_path: Path, models: dict[str, Path]) -> None:
    import pydicom

    study = write_study(tmp_path / "s", 2, positive_rate=0.5, size=(128, 128), seed=1)
    path = study.out / study.images[0].path
    ds = pydicom.dcmread(path)
    ds.PatientID = "<script>document.body.setAttribute('data-error','x')</script>"
    ds.AccessionNumber = "A&B\"'"
    ds.save_as(path)
    for extra in ("manifest.json", "train-rle.csv", "sample_submission.csv"):
        (study.out / extra).unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, scan_args(study.out, out, models))
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "<script>document" not in html and "&lt;script&gt;" in html and "A&amp;B&#34;&#39;" in html


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
        r.tier = tier_of(r, Thresholds(), Decisions(), True)
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
    assert 'style="display: flex;"' not in dom  # the lightbox is closed until asked
    # A link's #view= opens the image's picture: the overlay at full size, from the file.
    report = tmp_path / "report.html"
    opened = rendered(report.as_uri() + "#view=flagged", tmp_path / "profile2")
    assert 'aria-label="picture" data-view="flagged" style="display: flex;"' in opened
    assert '<img id="big" alt="overlay of flagged" src="data:image/jpeg;base64,' in opened
    # Without a segmenter the legend gives the urgent probability in force instead of the unused triplet.
    summary.urgent_probability, summary.decisions = 0.85, "classifier"
    write_outputs(summary)
    html = (tmp_path / "report.html").read_text()
    assert "classifier probability ≥ 0.85" in html and "pixels of a 1024 x 1024 image" not in html


def test_the_rows_escape_every_value_as_markupsafe_does() -> None:
    """The report writes its worklist rows itself; each value is escaped exactly as the template's autoescape
    (markupsafe) would: a header's text never reaches the page as markup."""
    from markupsafe import Markup, escape

    from pneumotriage.scan.report import _escape

    hostile = ['<script>alert("x")</script>', "O'Brien & Sons", "&amp; already", "\"'<>&", "é 中 \x00", "", "plain"]
    for value in (*hostile, 3, 0.125, -0.0, 1e-7, float("inf"), float("nan"), 10**30, True, Markup("<b>kept</b>")):
        assert _escape(value) == str(escape(value)), value


def test_report_thumbnails_sets_how_many_rows_have_a_picture(tmp_path: Path, models: dict[str, Path]) -> None:
    """`--report-thumbnails N` (what the page names when it shows fewer pictures than rows) keeps pictures for the
    first N rows; the rest are rows without one."""
    study = write_study(tmp_path / "s", 4, positive_rate=0.0, size=(128, 128), seed=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, scan_args(study.out, out, models, "--report-thumbnails", "2"))
    assert result.exit_code in (0, 4), result.output  # the study's CSVs are not DICOM
    html = (out / "report.html").read_text()
    assert html.count('title="enlarge"><img') == 2 and html.count(">details</button>") == 2
    assert "Pictures are kept for the first 2 rows (<code>--report-thumbnails</code>)" in html
    bad = CliRunner().invoke(app, scan_args(study.out, tmp_path / "bad", models, "--report-thumbnails", "-1"))
    assert bad.exit_code == 2 and "give 0 or more" in bad.output

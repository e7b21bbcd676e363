"""The scan cascade end to end: worklist, tiers, error rows, masks, submission, report, resume after kill, submit."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.dicom import read_header
from pneumotriage.labels import read_rle_csv
from pneumotriage.rle import rle_decode
from pneumotriage.scan import TIERS, ImageResult, ScanOptions
from pneumotriage.scan.discover import safe_name
from pneumotriage.scan.finish import patient_side
from pneumotriage.scan.rank import rank, tier_of
from pneumotriage.synth import StudySummary, write_study
from pneumotriage.train import TrainConfig, train


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small models trained for two epochs at 64 px: enough to run the cascade, not to be right."""
    root = tmp_path_factory.mktemp("scan-models")
    study = write_study(root / "study", 16, positive_rate=0.5, size=(128, 128), seed=5, ptx_scale=2.0)
    paths = {}
    for kind, extra in (("classifier", {"arch": "efficientnet_b0"}), ("segmenter", {"encoder": "efficientnet_b0"})):
        cfg = TrainConfig(
            kind=kind,
            data=str(study.out),
            labels=str(study.labels_csv),
            out=str(root / kind),
            image_size=64,
            batch_size=4,
            epochs=2,
            workers=0,
            device="cpu",
            val_fraction=0.34,
            pretrained=False,
            augment="none",
            **extra,
        )
        train(cfg)
        paths[kind] = root / kind / "best.pt"
    return paths


@pytest.fixture
def scan_input(study: StudySummary, tmp_path: Path) -> Path:
    """The 12-image study, a truncated DICOM and a text file."""
    folder = tmp_path / "in"
    shutil.copytree(study.out, folder)
    (folder / "train-rle.csv").unlink()
    (folder / "manifest.json").unlink()
    first = next(folder.rglob("*.dcm"))
    (folder / "broken.dcm").write_bytes(first.read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def _scan_args(folder: Path, out: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "scan",
        str(folder),
        "--out",
        str(out),
        "--classifier",
        str(models["classifier"]),
        "--segmenter",
        str(models["segmenter"]),
        "--workers",
        "0",
        "--no-progress",
        # an untrained-ish segmenter: make it outline something on every image past a low gate
        "--gate",
        "0.3",
        "--top-score",
        "0.2",
        "--min-area",
        "50",
        *extra,
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_scan_end_to_end(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, _scan_args(scan_input, out, models))
    assert result.exit_code == 4, result.output  # a DICOM failed, the rest were triaged
    rows = _rows(out / "worklist.csv")
    assert len(rows) == 13  # the text file is not an image: listed apart
    assert [int(r["rank"]) for r in rows] == list(range(1, 14))
    assert [Path(r["path"]).name for r in _rows(out / "skipped.csv")] == ["notes.txt"]

    errors = [r for r in rows if r["status"] == "error"]
    assert {Path(r["path"]).name for r in errors} == {"broken.dcm"}
    assert all(r["tier"] == "review" and r["path"] in r["error"] for r in errors)

    # ranked: tier order, then readable rows by falling probability
    order = [TIERS.index(r["tier"]) for r in rows]
    assert order == sorted(order)
    for tier in TIERS:
        probs = [float(r["probability"]) for r in rows if r["tier"] == tier and r["status"] == "ok"]
        assert probs == sorted(probs, reverse=True)

    ok = [r for r in rows if r["status"] == "ok"]
    # Something was outlined: urgent, or review where the outline is implausible (these barely trained models
    # outline whole images, and are flagged so).
    assert any(r["mask_file"] for r in ok)
    assert all(r["tier"] == "review" for r in ok if r["flag"])
    submission = read_rle_csv(out / "submission.csv")
    assert set(submission) == {r["image_id"] for r in ok} | {r["image_id"] for r in errors}
    for r in ok:
        header = read_header(r["path"])
        decoded = submission.masks_for(r["image_id"], header.rows, header.columns)
        if not r["mask_file"]:  # nothing outlined: no mask file, -1 in the submission, not urgent
            assert r["area_px"] in ("", "0") and not decoded.any() and r["overlay_file"] == ""
            assert r["tier"] != "urgent"
            continue
        mask = np.asarray(Image.open(out / r["mask_file"]))
        assert mask.shape == (header.rows, header.columns) and set(np.unique(mask)) <= {0, 255}
        assert int(r["area_px"]) == int(np.count_nonzero(mask)) > 0
        assert r["tier"] == ("review" if r["flag"] else "urgent")  # segmented run: urgent = outlined plausibly
        np.testing.assert_array_equal(decoded, mask > 0)
        overlay = Image.open(out / r["overlay_file"])
        assert overlay.mode == "RGB" and overlay.size[0] <= 512
        assert r["side"] in ("left", "right", "both")
        spacing = header.pixel_spacing_mm
        assert spacing is not None
        assert float(r["area_cm2"]) == pytest.approx(int(r["area_px"]) * spacing[0] * spacing[1] / 100, rel=1e-3)
    assert any(r["mask_file"] for r in ok)
    assert all(submission[r["image_id"]] == [] for r in errors)  # -1

    document = json.loads((out / "worklist.json").read_text())
    assert [r["image_id"] for r in document["worklist"]] == [r["image_id"] for r in rows]
    assert {m["role"] for m in document["models"]} == {"classifier", "segmenter"}
    assert all(len(m["sha256"]) == 64 for m in document["models"])
    html = (out / "report.html").read_text()
    assert html.count("<tr class='row") == 13


def _rendered(report: Path | str, profile: Path) -> str:
    """report.html as headless Chromium leaves its DOM once the page's script has run (skips without Chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            report if isinstance(report, str) else report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_report_renders_in_chromium(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    CliRunner().invoke(app, _scan_args(scan_input, out, models))
    dom = _rendered(out / "report.html", tmp_path / "profile")
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    assert 'data-error="' not in dom, "a script error occurred"
    assert dom.count('class="row ') == 13
    assert dom.count('class="row urgent') + dom.count("implausible outline — check") >= 1
    assert '<span id="shown">13</span>' in dom


def test_no_phi_and_json(scan_input: Path, models: dict[str, Path], tmp_path: Path, study: StudySummary) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*_scan_args(scan_input, out, models), "--no-phi", "--json"])
    assert result.exit_code == 4
    document = json.loads(result.stdout)
    assert len(document["worklist"]) == 13 and "patient_id" not in document["worklist"][0]
    patients = {im.patient_id for im in study.images}
    for name in ("worklist.csv", "worklist.json", "report.html", "submission.csv"):
        # Embedded pictures are base64: any three letters turn up there by chance. The text is what counts.
        text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", (out / name).read_text())
        assert not any(p in text for p in patients), name
        assert "SYN" not in text  # accession numbers of the phantoms


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
    result = CliRunner().invoke(app, _scan_args(study.out, out, models))
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "<script>document" not in html and "&lt;script&gt;" in html and "A&amp;B&quot;&#x27;" in html


def test_safe_names() -> None:
    taken: set[str] = set()
    assert safe_name("../../etc/passwd", taken) == "etc_passwd"
    assert safe_name("a/b", taken) == "a_b"
    second = safe_name("a:b", taken)
    assert second.startswith("a_b-") and second != "a_b"
    assert safe_name("...", taken) == "image"
    assert all("/" not in n and not n.startswith(".") for n in taken)


def test_tier_rules_and_ranking() -> None:
    o = ScanOptions(urgent_probability=0.9)
    r = ImageResult(image_id="a", path="a", status="ok", probability=0.7, area_px=10)
    assert tier_of(r, 0.5, o, segmented_run=True) == "urgent"
    r.area_px = 0
    assert tier_of(r, 0.5, o, segmented_run=True) == "review"
    assert tier_of(r, 0.8, o, segmented_run=True) == "routine"
    r.probability = 0.95
    assert tier_of(r, 0.5, o, segmented_run=False) == "urgent"
    bad = ImageResult(image_id="b", path="b", status="error", error="x")
    assert tier_of(bad, 0.5, o, segmented_run=True) == "review"
    results = [
        ImageResult(image_id="r1", path="", status="ok", probability=0.1, tier="routine"),
        ImageResult(image_id="e1", path="", status="error", tier="review"),
        ImageResult(image_id="v1", path="", status="ok", probability=0.6, tier="review"),
        ImageResult(image_id="u1", path="", status="ok", probability=0.8, tier="urgent", area_px=5),
        ImageResult(image_id="u2", path="", status="ok", probability=0.8, tier="urgent", area_px=50),
    ]
    assert [x.image_id for x in rank(results)] == ["u2", "u1", "v1", "e1", "r1"]


def test_patient_side() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 1:3] = True  # image left = patient's right
    assert patient_side(mask) == "right"
    assert patient_side(mask[:, ::-1]) == "left"
    assert patient_side(mask | mask[:, ::-1]) == "both"
    assert patient_side(np.zeros((4, 4), dtype=bool)) is None


def test_scan_resume_after_kill_equals_full_run(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    base = [sys.executable, "-m", "pneumotriage", *_scan_args(scan_input, full, models), "--batch-size", "1"]
    assert subprocess.run(base, env=env, capture_output=True, timeout=300).returncode == 4

    part = tmp_path / "part"
    args = [sys.executable, "-m", "pneumotriage", *_scan_args(scan_input, part, models), "--batch-size", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = part / ".scan" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3):
        assert proc.poll() is None, "the scan ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(journal.read_text().splitlines())
    assert 3 <= done < 13 and not (part / "worklist.csv").exists()

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 4, resumed.stderr
    assert "done before the resume" in " ".join(resumed.stderr.split())
    # 12 images and the truncated DICOM (its header reads, its pixels fail): nothing redone, nothing lost
    assert len(journal.read_text().splitlines()) == 13

    def comparable(folder: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "path" and k != "error"} for r in _rows(folder / "worklist.csv")]

    assert comparable(part) == comparable(full)
    assert (part / "submission.csv").read_text() == (full / "submission.csv").read_text()
    for mask in (full / "masks").iterdir():
        assert (part / "masks" / mask.name).read_bytes() == mask.read_bytes()


def test_scan_refuses_a_used_folder_and_missing_models(scan_input: Path, models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, _scan_args(scan_input, out, models)).exit_code == 4
    again = runner.invoke(app, _scan_args(scan_input, out, models))
    assert again.exit_code == 2 and "--resume" in again.output
    result = runner.invoke(app, ["scan", str(scan_input), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no models given" in result.output
    result = runner.invoke(
        app, ["scan", str(scan_input), "--out", str(tmp_path / "o3"), "--classifier", "demo-classifier"]
    )
    assert result.exit_code == 3 and "weights fetch demo-classifier" in result.output


def test_submit_matches_sample(study: StudySummary, models: dict[str, Path], tmp_path: Path) -> None:
    ids = [im.image_id for im in study.images]
    sample = tmp_path / "sample.csv"
    order = [ids[3], ids[0], ids[3], ids[5], "1.2.3.not.in.the.folder", ids[1]]
    sample.write_text("\ufeffImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in order))
    out = tmp_path / "submission.csv"
    result = CliRunner().invoke(
        app,
        [
            "submit",
            str(study.out),
            "--sample-submission",
            str(sample),
            "--out",
            str(out),
            "--classifier",
            str(models["classifier"]),
            "--segmenter",
            str(models["segmenter"]),
            "--workers",
            "0",
            "--segment-all",
        ],
    )
    assert result.exit_code == 4 and "1.2.3.not.in.the.folder" in result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    assert [line.split(",")[0] for line in lines[1:]] == [ids[3], ids[0], ids[5], "1.2.3.not.in.the.folder", ids[1]]
    written = read_rle_csv(out)
    assert written["1.2.3.not.in.the.folder"] == []
    for image_id in (ids[3], ids[0]):
        rows = written[image_id]
        if rows:
            assert rle_decode(rows[0], 128, 128).shape == (128, 128)  # original resolution


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
        r.tier = tier_of(r, 0.5, ScanOptions(), True)
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
    assert "at least 2000 pixels (at 1024²) above 0.75, the outline then drawn at 0.30" in html
    assert "gate 0.5 but no outline survived" in html and "outline is drawn in red" in html
    worklist = list(csv.DictReader(open(tmp_path / "worklist.csv", newline="")))
    assert worklist[1]["image_id"] == "flagged" and worklist[1]["flag"].startswith("implausible outline — check")
    dom = _rendered(tmp_path / "report.html", tmp_path / "profile")
    assert 'data-ready="1"' in dom and 'data-error="' not in dom
    assert "implausible outline — check: it covers 80% of the image" in dom
    assert "the segmenter outlined a pneumothorax (at least 2000 pixels" in dom  # the legend, rendered
    assert dom.count('class="row urgent') == 1 and dom.count('class="row review') == 1
    assert 'id="lightbox" title="click to close" style="display: flex;"' not in dom  # closed until asked
    # A link's #view= clicks the image's thumbnail, as a reader does: the overlay at full size, from the file.
    report = tmp_path / "report.html"
    opened = _rendered(report.as_uri() + "#view=flagged", tmp_path / "profile2")
    assert 'id="lightbox" title="click to close" style="display: flex;"' in opened
    assert '<img id="big" alt="overlay of flagged" src="data:image/jpeg;base64,' in opened
    # Without a segmenter the legend gives the urgent probability in force instead of the unused triplet.
    summary.urgent_probability = 0.85
    write_outputs(summary)
    html = (tmp_path / "report.html").read_text()
    assert "classifier probability ≥ 0.85" in html and "pixels (at 1024²)" not in html

"""No silent wrong answer: what is not a frontal chest radiograph, or not read truly, is a row that says so and
never a tier of its own; a model that answers NaN is an error, never routine; an image stored mirrored or
upside down is turned upright for the models and its outline goes back where the image has it.

Each case is crafted here from a phantom (or a real file from ../shared/data where it is there), mixed among
good phantoms, and checks the exit code, the row's status and reason (naming the file), and that the good
files' rows are those of a scan of the good files alone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from helpers import within
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.dicom import read_dicom
from pneumotriage.models import ModelSpec, build_model, save_checkpoint
from pneumotriage.synth import StudySummary

CHEST_FIELDS = ("rank", "tier", "probability", "status", "error", "side", "area_px")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained 64 px models whose segmenter outlines something on most phantoms (low thresholds), and a
    classifier and a segmenter whose weights are NaN."""
    root = tmp_path_factory.mktemp("refusal-models")
    torch.manual_seed(0)
    clf = build_model(ModelSpec("classifier", "efficientnet_b0", input_size=64))
    seg = build_model(ModelSpec("segmenter", "unet", "efficientnet_b0", input_size=64))
    with torch.no_grad():  # an untrained map spreads over 0.493 +- 1e-4; scaled, it outlines part of an image
        seg.head.weight.mul_(3000)
        seg.head.bias.zero_()
    outline = {"top_score": 0.4, "min_area": 0, "bottom_score": 0.4, "min_component": 0}
    paths = {
        "classifier": save_checkpoint(root / "clf.pt", clf, thresholds={"gate": 0}),
        "segmenter": save_checkpoint(root / "seg.pt", seg, thresholds=outline),
    }
    for name, net in (("nan-classifier", clf), ("nan-segmenter", seg)):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float("nan"))
        paths[name] = save_checkpoint(root / f"{name}.pt", net, thresholds={"gate": 0})
    return paths


def _scan(
    inputs: list[Path], out: Path, models: dict[str, Path], *extra: str, clf: str = "classifier", seg: str = "segmenter"
) -> Any:
    args = ["scan", *map(str, inputs), "--out", str(out), "--classifier", str(models[clf])]
    args += ["--segmenter", str(models[seg]), "--workers", "0", "--no-progress", "--segment-all", *extra]
    return CliRunner().invoke(app, args)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "worklist.csv", newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


def _good(study: StudySummary, folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(study.out.rglob("*.dcm"))[:n]
    for f in files:
        shutil.copy(f, folder / f.name)
    return [folder / f.name for f in files]


def _native(source: Path, path: Path, pixels: np.ndarray | None = None, **tags: Any) -> Path:
    """A copy of a phantom as uncompressed 8-bit MONOCHROME2 (``pixels`` in place of its own), with ``tags`` set
    (None deletes one), under a new SOP Instance UID."""
    ds = pydicom.dcmread(source)
    stored = np.asarray(ds.pixel_array, dtype=np.uint8) if pixels is None else pixels
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    for key in ("PlanarConfiguration",):
        if key in ds:
            del ds[key]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = False
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    for key, value in tags.items():
        if value is None:
            if key in ds:
                del ds[key]
        else:
            setattr(ds, key, value)
            if key == "PixelPaddingValue":
                ds[key].VR = "US"  # ambiguous (US or SS) until the pixel representation says
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# Not a frontal chest radiograph: not triaged, with the rule that refused it


def _colour(source: Path, path: Path) -> Path:
    ds = pydicom.dcmread(source)
    grey = np.asarray(ds.pixel_array, dtype=np.uint8)
    rgb = np.stack([grey, grey[::-1], 255 - grey], axis=-1)
    _native(source, path)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_what_is_not_a_frontal_chest_radiograph_is_not_triaged(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    good = _good(study, folder)
    src = good[0]
    stripe = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None], (1, 1000))
    pattern = np.zeros((128, 128), dtype=np.uint8)
    pattern[::16] = 255
    cases = {
        "ct-head.dcm": ({"Modality": "CT", "BodyPartExamined": "HEAD"}, "modality CT"),
        "capture-of-a-form.dcm": (
            {"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "BodyPartExamined": "ABDOMEN"},
            "body part",
        ),
        "tibia.dcm": ({"BodyPartExamined": "EXTREMITY"}, "body part examined is EXTREMITY"),
        "lateral.dcm": ({"ViewPosition": "LL"}, "a lateral view"),
        "turned.dcm": ({"PatientOrientation": ["F", "L"]}, "patient orientation F\\L"),
        "lateral-by-orientation.dcm": ({"PatientOrientation": ["P", "F"]}, "patient orientation P\\F"),
        "no-modality.dcm": ({"Modality": None, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"}, "no modality"),
    }
    for name, (tags, _) in cases.items():
        _native(src, folder / name, **tags)
    _native(src, folder / "strip.dcm", pixels=stripe)
    _native(src, folder / "constant.dcm", pixels=np.full((128, 128), 77, dtype=np.uint8))
    _native(src, folder / "test-pattern.dcm", pixels=pattern)
    _colour(src, folder / "colour.dcm")
    reasons = {
        **{name: why for name, (_, why) in cases.items()},
        "strip.dcm": "not the shape of a chest radiograph",
        "constant.dcm": "constant image",
        "test-pattern.dcm": "two grey levels",
        "colour.dcm": "a colour image",
    }
    out = tmp_path / "out"
    result = _scan([folder], out, models)
    assert result.exit_code == 4, result.output  # some inputs were not triaged
    rows = _rows(out)
    assert len(rows) == len(good) + len(reasons)
    for name, why in reasons.items():
        row = rows[name]
        assert row["status"] == "not triaged", (name, row)
        assert why in row["error"] and str(folder / name) in row["error"] and "--accept" in row["error"], row
        assert row["tier"] == "review" and row["probability"] == "" and row["area_px"] == ""
    counts = json.loads((out / "worklist.json").read_text())["counts"]
    assert counts["not_triaged"] == len(reasons) and counts["errors"] == 0
    assert "not triaged" in result.output and "not triaged" in (out / "report.html").read_text()
    # The refused row still says who it is.
    assert rows["ct-head.dcm"]["modality"] == "CT" and rows["ct-head.dcm"]["sop_instance_uid"]
    # The good files' rows are those of a scan of the good files alone.
    alone = tmp_path / "alone"
    assert _scan(good, alone, models).exit_code == 0
    for name, row in _rows(alone).items():
        mixed = rows[name]
        assert {k: mixed[k] for k in ("tier", "probability", "area_px", "side")} == {
            k: row[k] for k in ("tier", "probability", "area_px", "side")
        }


def test_accept_widens_one_rule_and_is_checked(study: StudySummary, models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    src = _good(study, folder, 1)[0]
    _native(src, folder / "ct.dcm", Modality="CT")
    _native(src, folder / "lateral.dcm", ViewPosition="LL")
    out = tmp_path / "out"
    assert _scan([folder], out, models, "--accept", "modality").exit_code == 4
    rows = _rows(out)
    assert rows["ct.dcm"]["status"] == "ok" and rows["ct.dcm"]["probability"]
    assert rows["lateral.dcm"]["status"] == "not triaged"
    bad = _scan([folder], tmp_path / "out2", models, "--accept", "everything")
    assert bad.exit_code == 2 and "not a rule" in bad.output and "body-part" in bad.output
    assert not (tmp_path / "out2" / "worklist.csv").exists()


def test_real_chest_radiographs_pass_the_input_check(real_data: Path, models: dict[str, Path], tmp_path: Path) -> None:
    files = sorted(real_data.glob("siim-sample/*.dcm")) + sorted(real_data.glob("cxr-other/*.dcm"))
    assert len(files) >= 13
    out = tmp_path / "out"
    result = _scan(files, out, models)
    assert result.exit_code == 0, result.output
    assert all(r["status"] == "ok" for r in _rows(out).values())


# --------------------------------------------------------------------------------------------------------------
# Images that would be misread: refused, or read as the header says


def _jpeg_copy(source: Path, path: Path, change: Any) -> Path:
    ds = pydicom.dcmread(source)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([change(frame)])
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pixel_data_that_would_decode_wrong_is_an_error_row(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    good = _good(study, folder)
    src = good[0]
    two = np.asarray(pydicom.dcmread(src).pixel_array, dtype=np.uint8)
    _native(src, folder / "two-frames-declared-one.dcm", pixels=np.concatenate([two, two]))
    ds = pydicom.dcmread(folder / "two-frames-declared-one.dcm")
    ds.Rows = two.shape[0]
    ds.save_as(folder / "two-frames-declared-one.dcm", enforce_file_format=True)
    _jpeg_copy(src, folder / "jpeg-cut.dcm", lambda f: f[: len(f) * 3 // 4])
    _jpeg_copy(src, folder / "jpeg-zeroed.dcm", lambda f: f[: len(f) // 3] + bytes(len(f) // 2) + f[len(f) * 5 // 6 :])
    for name, slope in (("slope-0.dcm", "0"), ("slope-nan.dcm", "NaN"), ("slope-huge.dcm", "1e300")):
        _native(src, folder / name, RescaleSlope=slope, RescaleIntercept="0")
    out = tmp_path / "out"
    result = _scan([folder], out, models)
    assert result.exit_code == 4
    rows = _rows(out)
    why = {
        "two-frames-declared-one.dcm": "declares one frame",
        "jpeg-cut.dcm": "does not end with its end marker",
        "jpeg-zeroed.dcm": "zero bytes",
        "slope-0.dcm": "RescaleSlope 0",
        "slope-nan.dcm": "RescaleSlope",
        "slope-huge.dcm": "RescaleSlope 1e300",
    }
    for name, text in why.items():
        assert rows[name]["status"] == "error" and text in rows[name]["error"], rows[name]
        assert str(folder / name) in rows[name]["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == len(good)


def test_an_image_stored_mirrored_or_upside_down_is_read_upright(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    """The models see the upright image (the same probability as the upright copy), and the outline comes back
    on the stored grid (the upright copy's mask, mirrored), with the patient's side unchanged."""
    folder = tmp_path / "in"
    src = study.out / next(i.path for i in study.images if i.positive)
    folder.mkdir()
    upright = np.asarray(pydicom.dcmread(src).pixel_array, dtype=np.uint8).copy()
    upright[:, : upright.shape[1] // 3] //= 3  # not symmetric: a mirror shows
    _native(src, folder / "upright.dcm", pixels=upright, PatientOrientation=["L", "F"])
    _native(src, folder / "mirrored.dcm", pixels=upright[:, ::-1].copy(), PatientOrientation=["R", "F"])
    _native(src, folder / "upside-down.dcm", pixels=upright[::-1].copy(), PatientOrientation=["L", "H"])
    _native(src, folder / "inverse.dcm", pixels=255 - upright, PresentationLUTShape="INVERSE")
    out = tmp_path / "out"
    assert _scan([folder], out, models).exit_code == 0
    rows = _rows(out)
    base = rows["upright.dcm"]
    assert base["area_px"] not in ("", "0"), "the test needs an outline"
    masks = {n: np.asarray(Image.open(out / r["mask_file"])) > 0 for n, r in rows.items() if r["mask_file"]}
    assert set(masks) == set(rows)
    np.testing.assert_array_equal(masks["mirrored.dcm"], masks["upright.dcm"][:, ::-1])
    np.testing.assert_array_equal(masks["upside-down.dcm"], masks["upright.dcm"][::-1])
    np.testing.assert_array_equal(masks["inverse.dcm"], masks["upright.dcm"])
    for name in ("mirrored.dcm", "upside-down.dcm", "inverse.dcm"):
        assert abs(float(rows[name]["probability"]) - float(base["probability"])) < 1e-5, name
        assert rows[name]["side"] == base["side"] and rows[name]["area_px"] == base["area_px"], name


def test_pixel_padding_is_background_not_image(study: StudySummary, tmp_path: Path) -> None:
    """Pixels at PixelPaddingValue come out 0 and take no part in the normalisation: the image inside reads as
    it does without the padding frame."""
    src = sorted(study.out.rglob("*.dcm"))[0]
    inner = np.asarray(pydicom.dcmread(src).pixel_array, dtype=np.uint8) // 2 + 40  # 40..167
    framed = np.full((inner.shape[0] + 40, inner.shape[1] + 40), 255, dtype=np.uint8)
    framed[20:-20, 20:-20] = inner
    padded = read_dicom(_native(src, tmp_path / "padded.dcm", pixels=framed, PixelPaddingValue=255)).pixels
    alone = read_dicom(_native(src, tmp_path / "inner.dcm", pixels=inner)).pixels
    assert (padded[:20] == 0).all() and (padded[:, -20:] == 0).all()
    np.testing.assert_allclose(padded[20:-20, 20:-20], alone, atol=1e-6)
    unpadded = read_dicom(_native(src, tmp_path / "undeclared.dcm", pixels=framed)).pixels
    assert (unpadded[:20] == 1).all()  # undeclared, the frame is the brightest thing in the image


def test_an_unusable_window_is_not_applied_and_said(study: StudySummary, tmp_path: Path) -> None:
    src = sorted(study.out.rglob("*.dcm"))[0]
    plain = read_dicom(_native(src, tmp_path / "plain.dcm"))
    for width in ("0", "-5", "NaN"):
        image = read_dicom(_native(src, tmp_path / f"w{width}.dcm", WindowCenter="100", WindowWidth=width))
        np.testing.assert_array_equal(image.pixels, plain.pixels)
        assert any("not usable" in w for w in image.warnings), image.warnings


# --------------------------------------------------------------------------------------------------------------
# A model that answers NaN


@pytest.mark.parametrize("broken", ["nan-classifier", "nan-segmenter"])
def test_a_model_answering_nan_gives_error_rows_never_routine(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, broken: str
) -> None:
    folder = tmp_path / "in"
    good = _good(study, folder)
    out = tmp_path / "out"
    names = {"clf": broken if broken == "nan-classifier" else "classifier"}
    names["seg"] = broken if broken == "nan-segmenter" else "segmenter"
    result = _scan([folder], out, models, **names)
    assert result.exit_code == 4, result.output
    rows = _rows(out)
    assert len(rows) == len(good)
    role = broken.split("-")[1]
    for row in rows.values():
        assert row["status"] == "error" and f"the {role} gave nan" in row["error"], row
        assert row["tier"] == "review" and row["mask_file"] == ""

    def refuse(name: str) -> None:
        raise AssertionError(f"worklist.json holds {name}")

    doc = json.loads((out / "worklist.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert doc["counts"]["routine"] == doc["counts"]["urgent"] == 0 and doc["counts"]["errors"] == len(good)


# --------------------------------------------------------------------------------------------------------------
# Another patient's result: never


def _library_scan(inputs: list[Path], out: Path, models: dict[str, Path], **options: Any) -> Any:
    from pneumotriage.models import load_model
    from pneumotriage.scan import ScanOptions, run

    progress = options.pop("progress", None)
    files = options.pop("files", None)
    options = {"workers": 0, "batch_size": 1, **options}
    opts = ScanOptions.of(segment_all=True, **options)
    return run(
        inputs,
        out,
        classifier=load_model(models["classifier"]),
        segmenter=load_model(models["segmenter"]),
        options=opts,
        progress=progress,
        files=files,
    )


def _other_patient(src: Path, path: Path, patient: str, sop: str | None = None) -> Path:
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.PatientName = patient, patient
    ds.StudyInstanceUID = generate_uid()
    if sop:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_file_replaced_mid_scan_gets_no_seg_or_sr_of_the_other_patient(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("highdicom")
    folder = tmp_path / "in"
    good = _good(study, folder, 3)
    other = _other_patient(good[2], tmp_path / "other.dcm", "OTHER-PATIENT")
    first = min(good, key=lambda p: p.name)  # the walk's first: journaled after the first batch of one
    replaced = []

    def progress(event: dict[str, Any]) -> None:
        if event.get("event") == "batch" and not replaced:  # the first file is scanned: swap it for another
            shutil.copy(other, first)
            replaced.append(first)

    out = tmp_path / "out"
    summary = _library_scan([folder], out, models, dicom_seg=True, dicom_sr=True, progress=progress)
    assert replaced
    row = next(r for r in summary.results if r.path == str(first))
    assert row.patient_id != "OTHER-PATIENT"  # the row is the image that was scanned
    note = next(n for n in summary.notes if "DICOM SEG/SR" in n)
    assert str(first) in note and "changed since it was scanned" in note
    made = sorted((out / "dicom").glob("*.dcm"))
    assert not [p for p in made if p.name.startswith(row.file_stem)], made
    for path in made:  # the others' objects carry their own patients
        assert str(pydicom.dcmread(path).PatientID) != "OTHER-PATIENT"


def test_two_patients_sharing_a_sop_instance_uid_get_objects_of_their_own(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("highdicom")
    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted(study.out.rglob("*.dcm"))[0]
    sop = generate_uid()
    _other_patient(src, folder / "a.dcm", "PATIENT-A", sop)
    _other_patient(src, folder / "b.dcm", "PATIENT-B", sop)
    out = tmp_path / "out"
    summary = _library_scan([folder], out, models, dicom_sr=True)
    assert any("SOP Instance UIDs are shared" in n and sop in n for n in summary.notes), summary.notes
    made = {
        str(pydicom.dcmread(p).PatientID): str(pydicom.dcmread(p).SOPInstanceUID)
        for p in (out / "dicom").glob("*-sr.dcm")
    }
    assert set(made) == {"PATIENT-A", "PATIENT-B"} and made["PATIENT-A"] != made["PATIENT-B"]


def test_resume_redoes_a_file_replaced_with_the_same_size_and_mtime(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    good = _good(study, folder, 2)
    out = tmp_path / "out"
    _library_scan([folder], out, models)
    target = good[0]
    before = target.stat()
    old_id = str(pydicom.dcmread(target).PatientID)
    new_id = "Z" * len(old_id)  # another patient in the same bytes: the same size
    data = target.read_bytes()
    assert old_id.encode() in data  # PatientID (and PatientName, the same in a phantom)
    target.write_bytes(data.replace(old_id.encode(), new_id.encode()))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    summary = _library_scan([folder], out, models, resume=True)
    row = next(r for r in summary.results if r.path == str(target))
    assert row.patient_id == new_id


# --------------------------------------------------------------------------------------------------------------
# Every file found is accounted for once


def _skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return {Path(r["path"].split(": ")[0]).name: r["reason"] for r in csv.DictReader(fh)}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_every_file_found_is_a_row_or_a_skipped_line(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    good = _good(study, folder, 2)
    shutil.copy(good[0], folder / ".hidden.dcm")
    (folder / ".hidden-folder").mkdir()
    shutil.copy(good[1], folder / ".hidden-folder" / "inside.dcm")
    (tmp_path / "elsewhere").mkdir()
    (folder / "link-to-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.mkfifo(folder / "a-fifo")
    (folder / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    summary = _library_scan([folder], out, models)
    skipped = _skipped(out)
    assert "hidden file" in skipped[".hidden.dcm"] and "hidden folder" in skipped[".hidden-folder"]
    assert "a link to a folder" in skipped["link-to-folder"] and "a FIFO" in skipped["a-fifo"]
    assert "not a DICOM" in skipped["notes.txt"] or "not DICOM" in skipped["notes.txt"]
    assert len(summary.results) == 2 and summary.counts["skipped"] == 5
    found = {p.name for p in folder.iterdir()}
    assert found == {Path(r.path).name for r in summary.results} | set(skipped)


def test_a_folder_used_as_its_own_out_is_still_scanned(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "parent" / "images"
    good = _good(study, folder, 2)
    summary = _library_scan([folder], folder, models)  # --out is the input folder
    assert sorted(r.path for r in summary.results) == sorted(map(str, good))
    later = _library_scan([tmp_path / "parent"], tmp_path / "later", models)  # a later scan of the parent
    assert sorted(r.path for r in later.results) == sorted(map(str, good))  # the outputs are not inputs
    assert not later.skipped


def test_a_file_gone_before_it_is_read_is_an_error_row_not_skipped(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    from pneumotriage.scan.discover import found_files

    folder = tmp_path / "in"
    good = _good(study, folder, 2)
    walked = list(found_files([folder]))
    good[0].unlink()  # found, then gone before a worker opens it
    summary = _library_scan([folder], tmp_path / "out", models, files=iter(walked))
    row = next(r for r in summary.results if r.path == str(good[0]))
    assert row.status == "error" and "cannot be read" in (row.error or "") and str(good[0]) in (row.error or "")
    assert not summary.skipped


# --------------------------------------------------------------------------------------------------------------
# Outputs that attack their reader


def test_tag_values_and_names_do_not_run_in_a_spreadsheet_or_a_terminal(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    src = _good(study, folder, 1)[0]
    formula = folder / '=HYPERLINK("x").dcm'
    _native(src, formula, PatientID="+cmd|' /C calc'!A0", AccessionNumber="@SUM(1+1)")
    markup = folder / "a[link=file:x]b[red]c \x1b[31mred.dcm"  # a name holds no "/": no closing tag
    _native(src, markup, PatientID="-2+3")
    out = tmp_path / "out"
    result = _scan([folder], out, models, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # strict JSON on stdout
    assert "\x1b" not in result.output
    with open(out / "worklist.csv", newline="", encoding="utf-8") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c[1:2].isdigit())]
    assert "'+cmd|' /C calc'!A0" in cells and "'@SUM(1+1)" in cells and "'-2+3" in cells
    with open(out / "submission.csv", newline="", encoding="utf-8") as fh:
        ids = [row[0] for row in csv.reader(fh)][1:]
    assert "'" + formula.name[: -len(".dcm")] in ids
    table = _scan([folder], tmp_path / "out2", models)  # the table on the terminal
    assert table.exit_code == 0 and "\x1b[31m" not in table.output, table.output
    shown = CliRunner().invoke(app, ["inspect", str(folder)])
    assert shown.exit_code == 0 and shown.exception is None and "\x1b[31m" not in shown.output, shown.output


# --------------------------------------------------------------------------------------------------------------
# Workers: never outlive the scan; one that dies mid-image costs that image only


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc to find the workers")
def test_workers_die_with_a_killed_scan(study: StudySummary, models: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "in"
    for i in range(6):
        _good(study, folder / f"copy-{i}", 12)
    cmd = [sys.executable, "-m", "pneumotriage", "scan", str(folder), "--out", str(tmp_path / "out")]
    cmd += ["--classifier", str(models["classifier"]), "--segmenter", str(models["segmenter"]), "--workers", "1"]
    proc = subprocess.Popen([*cmd, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _children(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "the scan started no worker"
            time.sleep(0.02)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)  # as the OOM killer does: no clean-up runs in the scan
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "a worker outlived its scan"
    finally:
        proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


@pytest.mark.parametrize("batch", [2, 8])  # the worker reads files 2 and 8 at a time: the others in its task too
def test_a_file_that_kills_its_worker_is_an_error_row_and_the_scan_goes_on(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    import signal

    from pneumotriage.scan import workers as scan_workers

    if not sys_platform_forks():
        pytest.skip("the workers are forked only on Linux: the stand-in for a bomb reaches them that way")
    original = scan_workers.read

    def read(path: Path, **kwargs: Any) -> Any:
        if path.name == "killer.dcm":  # a stand-in for a decompression bomb: the OOM killer ends the worker
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, **kwargs)

    monkeypatch.setattr(scan_workers, "read", read)
    folder = tmp_path / "in"
    good = _good(study, folder, 6)
    shutil.copy(good[0], folder / "killer.dcm")
    summary = within(120, _library_scan, [folder], tmp_path / "out", models, workers=1, batch_size=batch)
    rows = {Path(r.path).name: r for r in summary.results}
    assert len(rows) == 7
    assert rows["killer.dcm"].status == "error" and "the worker reading it died" in (rows["killer.dcm"].error or "")
    assert all(r.status == "ok" for n, r in rows.items() if n != "killer.dcm")


def sys_platform_forks() -> bool:
    import sys

    return sys.platform.startswith("linux")


# --------------------------------------------------------------------------------------------------------------
# Bombs: refused before they cost memory or time


@pytest.mark.parametrize("workers", [1, 0])
def test_bombs_are_error_rows_before_they_cost_memory_or_time(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pneumotriage.dicom import files as dicom_files
    from pneumotriage.scan import workers as scan_workers

    folder = tmp_path / "in"
    good = _good(study, folder, 3)
    src = good[0]
    # Limits made small for the test (the real ones: 256 MiB inflated, 512 MiB a file, 60 s a file).
    monkeypatch.setattr(dicom_files, "MAX_INFLATED_BYTES", 8 * 2**20)
    monkeypatch.setattr(dicom_files, "MAX_FILE_BYTES", 64 * 2**20)
    monkeypatch.setattr(scan_workers, "FILE_TIME_LIMIT_S", 1.0)
    deflated = _native(src, folder / "deflate-bomb.dcm")
    ds = pydicom.dcmread(deflated)
    ds.add_new(0x00091010, "OB", bytes(32 * 2**20))  # 32 MiB of zeros: a few kB deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    assert deflated.stat().st_size < 2**20
    sparse = _native(src, folder / "sparse.dcm")
    with open(sparse, "r+b") as fh:
        fh.truncate(100 * 2**20)  # a hole: no disk used
    _native(src, folder / "declares-huge.dcm", Rows=9000, Columns=9000)
    header = _native(src, folder / "zeros-after-header.dcm", PixelData=None)
    with open(header, "ab") as fh:
        fh.write(bytes(20 * 2**20))  # pydicom parses zeros as empty elements: ~7 s here
    out = tmp_path / "out"
    summary = _library_scan([folder], out, models, workers=workers, batch_size=2)
    rows = {Path(r.path).name: r for r in summary.results}
    why = {
        "deflate-bomb.dcm": "inflates to over 8 MiB",
        "sparse.dcm": "over the 64 MiB",
        "declares-huge.dcm": "exceeds the 40 MP",
        "zeros-after-header.dcm": "took over 1 s",
    }
    for name, text in why.items():
        assert rows[name].status == "error" and text in (rows[name].error or ""), rows[name]
        assert str(folder / name) in (rows[name].error or "")
    assert all(rows[f.name].status == "ok" for f in good)


# --------------------------------------------------------------------------------------------------------------
# The scan's own state is checked, not trusted


def _journal_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / ".scan" / "journal.jsonl").read_text().splitlines()]


def _write_journal(out: Path, rows: list[Any]) -> None:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    (out / ".scan" / "journal.jsonl").write_text(text)


@pytest.mark.parametrize(
    "forgery", ["mask_file", "overlay_file", "file_stem", "not-json", "unknown-field", "type", "status"]
)
def test_a_forged_journal_is_one_line_and_touches_nothing(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, forgery: str
) -> None:
    folder = tmp_path / "in"
    _good(study, folder, 2)
    out = tmp_path / "out"
    assert _scan([folder], out, models).exit_code == 0
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    rows = _journal_lines(out)
    first = rows[0]
    if forgery == "mask_file":
        first["mask_file"] = "../precious.txt"
    elif forgery == "overlay_file":
        first["overlay_file"] = "/etc/passwd"
    elif forgery == "file_stem":
        first["file_stem"] = "../../precious"
    elif forgery == "unknown-field":
        first["evil"] = 1
    elif forgery == "type":
        first["probability"] = "high"
    elif forgery == "status":
        first["status"] = "urgent-ish"
    lines: list[Any] = rows
    if forgery == "not-json":
        lines = ["{not json", *rows]
    _write_journal(out, lines)
    # The input changed since, so a resume would clean up the forged row's files: it must not get that far.
    (folder / next(iter(sorted(p.name for p in folder.iterdir())))).touch()
    result = _scan([folder], out, models, "--resume")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "journal.jsonl" in errors[0] and "damaged" in errors[0], result.output
    assert "Traceback" not in result.output and victim.read_text() == "keep me"


@pytest.mark.parametrize("link", ["masks", ".scan", ".scan/journal.jsonl"])
def test_nothing_is_written_through_a_link_planted_in_out(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, link: str
) -> None:
    folder = tmp_path / "in"
    _good(study, folder, 2)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / ".scan").mkdir(parents=True)
    target = elsewhere / "journal.jsonl" if link.endswith(".jsonl") else elsewhere
    if link == ".scan":
        (out / ".scan").rmdir()
    (out / link).symlink_to(target, target_is_directory=not link.endswith(".jsonl"))
    result = _scan([folder], out, models)
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.output and "Traceback" not in result.output
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())


# --------------------------------------------------------------------------------------------------------------
# Errors say what is wrong, in one line


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--batch-size", "100000000000000000000"], "--batch-size"),
        (["--workers", "100000"], "--workers 100000: give 0 to"),
        (["--device", "meta"], "--device 'meta'"),
        (["--accept", "nothing"], "not a rule"),
    ],
)
def test_absurd_options_are_one_line(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, extra: list[str], says: str
) -> None:
    result = _scan([_good(study, tmp_path / "in", 1)[0]], tmp_path / "out", models, *extra)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] and says in result.output
    assert not (tmp_path / "out" / "worklist.csv").exists()


def test_absurd_checkpoints_and_ensembles_are_one_line(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    data = torch.load(models["classifier"], weights_only=True)
    torch.save({**data, "input_size": 10**9}, tmp_path / "huge.pt")
    loop = tmp_path / "loop.json"
    loop.write_text(
        json.dumps({"format": "pneumotriage-ensemble", "format_version": 1, "members": [{"path": "loop.json"}]})
    )
    for name, says in (("huge.pt", "over the 2048 pixels"), ("loop.json", "includes itself")):
        models = {**models, "bad": tmp_path / name}
        result = _scan([_good(study, tmp_path / "in", 1)[0]], tmp_path / f"out-{name}", models, clf="bad")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and says in lines[0] and name in lines[0], result.output


def test_a_terminal_that_cannot_show_a_character_gets_it_escaped(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pneumotriage", "scan", str(_good(study, tmp_path / "in", 2)[0].parent)]
    cmd += ["--out", str(tmp_path / "out"), "--classifier", str(models["classifier"]), "--no-segment"]
    cmd += ["--workers", "0", "--no-progress"]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONIOENCODING": "ascii"}, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr and b"UnicodeEncodeError" not in done.stderr


# --------------------------------------------------------------------------------------------------------------
# Bad files mixed among real SIIM images change nothing for the good ones


def test_bad_files_among_real_siim_images_leave_their_rows_as_they_are(
    real_data: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    siim = sorted((real_data / "siim-sample").glob("*.dcm"))[:4]
    alone, mixed = tmp_path / "alone", tmp_path / "mixed"
    for folder in (alone, mixed):
        folder.mkdir()
        for f in siim:
            shutil.copy(f, folder / f.name)
    src = siim[0]
    _native(src, mixed / "ct.dcm", Modality="CT", BodyPartExamined="HEAD")
    _native(src, mixed / "lateral.dcm", ViewPosition="LL")
    _native(src, mixed / "knee.dcm", BodyPartExamined="KNEE")
    _native(src, mixed / "constant.dcm", pixels=np.zeros((512, 512), dtype=np.uint8))
    _native(src, mixed / "slope-0.dcm", RescaleSlope="0")
    _jpeg_copy(src, mixed / "cut.dcm", lambda f: f[: len(f) // 2])
    _jpeg_copy(src, mixed / "zeroed.dcm", lambda f: f[:1000] + bytes(len(f) // 4) + f[1000 + len(f) // 4 :])
    shutil.copy(src, mixed / ".hidden.dcm")
    (mixed / "notes.txt").write_text("x")
    results = {}
    for name, folder in (("alone", alone), ("mixed", mixed)):
        out = tmp_path / f"out-{name}"
        results[name] = (_scan([folder], out, models).exit_code, _rows(out), _skipped(out))
    assert results["alone"][0] == 0 and results["mixed"][0] == 4
    keep = ("tier", "probability", "area_px", "side", "status", "mask_file", "sop_instance_uid", "patient_id")
    good = {n: {k: r[k] for k in keep} for n, r in results["alone"][1].items()}
    assert {n: {k: r[k] for k in keep} for n, r in results["mixed"][1].items() if n in good} == good
    rows = results["mixed"][1]
    assert {n for n, r in rows.items() if r["status"] == "not triaged"} == {
        "ct.dcm",
        "lateral.dcm",
        "knee.dcm",
        "constant.dcm",
    }
    assert {n for n, r in rows.items() if r["status"] == "error"} == {"slope-0.dcm", "cut.dcm", "zeroed.dcm"}
    assert set(results["mixed"][2]) == {".hidden.dcm", "notes.txt"}
    assert len(rows) + len(results["mixed"][2]) == len(list(mixed.iterdir()))


def test_the_readers_notes_reach_the_worklist(study: StudySummary, models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    src = _good(study, folder, 1)[0]
    _native(src, folder / "bad-window.dcm", WindowCenter="100", WindowWidth="0")
    out = tmp_path / "out"
    assert _scan([folder], out, models).exit_code == 0
    rows = _rows(out)
    assert "window 100/0 is not usable; not applied" in rows["bad-window.dcm"]["notes"]
    assert rows[src.name]["notes"] == ""


def test_a_long_rle_field_reads(tmp_path: Path) -> None:
    """A large pneumothorax with a ragged edge: one RLE of over 600,000 characters (csv's default limit is
    131,072)."""
    from pneumotriage.labels import read_rle_csv
    from pneumotriage.rle import rle_encode

    mask = np.zeros((1024, 1024), dtype=bool)
    mask[:, :700] = np.random.default_rng(0).random((1024, 700)) < 0.5
    rle = rle_encode(mask)
    assert len(rle) > 600_000
    path = tmp_path / "labels.csv"
    path.write_text(f"ImageId,EncodedPixels\nbig,{rle}\n")
    labels = read_rle_csv(path)
    assert labels["big"] == [rle]


def test_a_home_that_is_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    for args in (["weights", "list"], ["weights", "fetch", "demo-classifier"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "is a file" in result.output, result.output
        assert "Traceback" not in result.output


def test_running_out_of_memory_is_not_blamed_on_out(
    study: StudySummary, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pneumotriage.scan import engine

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(engine, "Workers", no_memory)
    result = _scan([_good(study, tmp_path / "in", 1)[0]], tmp_path / "out", models)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "out of memory" in lines[0], result.output
    assert "--out" not in lines[0].split("(")[0] and "cannot write" not in lines[0]


def test_tune_reads_mirrored_images_upright_and_leaves_out_nan_answers(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    """Tuning sees what the scan sees: a mirrored image's map comes back on the stored grid (its labels' grid),
    and a model's NaN never reaches a metric (the image is listed unreadable)."""
    from pneumotriage.folds import ImageRecord
    from pneumotriage.models import load_model
    from pneumotriage.tune import predict_once

    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted(study.out.rglob("*.dcm"))[0]
    upright = np.asarray(pydicom.dcmread(src).pixel_array, dtype=np.uint8).copy()
    upright[:, : upright.shape[1] // 3] //= 3
    paths = [
        _native(src, folder / "upright.dcm", pixels=upright),
        _native(src, folder / "mirrored.dcm", pixels=upright[:, ::-1].copy(), PatientOrientation=["R", "F"]),
    ]
    records = [ImageRecord(p.stem, p, False, 0, None, 0, *upright.shape) for p in paths]
    seg = load_model(models["segmenter"])
    got, _ = predict_once(
        records, segmenter=seg, classifier=None, cache_root=None, scratch=tmp_path / "s", device="cpu", workers=0
    )
    assert got.image_ids == ["upright", "mirrored"]
    np.testing.assert_allclose(got.maps[1], got.maps[0][:, ::-1], atol=1e-6)
    broken, _ = predict_once(
        records,
        segmenter=load_model(models["nan-segmenter"]),
        classifier=None,
        cache_root=None,
        scratch=tmp_path / "s2",
        device="cpu",
        workers=0,
    )
    assert broken.image_ids == [] and len(broken.unreadable) == 2 and "not a number" in broken.unreadable[0]


def test_a_jpeg_cut_short_and_closed_again_is_not_triaged(
    study: StudySummary, models: dict[str, Path], tmp_path: Path
) -> None:
    """libjpeg only warns when a stream ends early and fills the rest of the image with one value: closed with an
    end marker, such a stream passes the marker check, and the filled band gives it away."""
    folder = tmp_path / "in"
    good = _good(study, folder, 2)
    _jpeg_copy(good[0], folder / "closed-again.dcm", lambda f: f[: len(f) * 7 // 10] + b"\xff\xd9")
    out = tmp_path / "out"
    assert _scan([folder], out, models).exit_code == 4
    row = _rows(out)["closed-again.dcm"]
    assert row["status"] == "not triaged" and "cut short and filled by the decoder" in row["error"], row


def _with_lut(source: Path, path: Path, keyword: str) -> Path:
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    _native(source, path)
    ds = pydicom.dcmread(path)
    if keyword == "palette":
        ds.PhotometricInterpretation = "PALETTE COLOR"
        for colour in ("Red", "Green", "Blue"):
            ds.add_new(Tag(f"{colour}PaletteColorLookupTableDescriptor"), "US", [4, 0, 8])
            ds.add_new(Tag(f"{colour}PaletteColorLookupTableData"), "OW", bytes([0, 1]))
    else:
        item = Dataset()
        item.add_new(Tag("LUTDescriptor"), "US", [256, 0, 16])
        item.add_new(Tag("LUTData"), "OW", bytes(6))  # 3 entries where 256 are declared
        if keyword == "ModalityLUTSequence":
            item.ModalityLUTType = "US"
        setattr(ds, keyword, [item])
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_damaged_lut_says_which_and_an_optional_one_is_only_a_note(study: StudySummary, tmp_path: Path) -> None:
    from pneumotriage.errors import CorruptPixelDataError

    src = sorted(study.out.rglob("*.dcm"))[0]
    plain = read_dicom(_native(src, tmp_path / "plain.dcm")).pixels
    image = read_dicom(_with_lut(src, tmp_path / "voi.dcm", "VOILUTSequence"))  # how to show it: optional
    np.testing.assert_array_equal(image.pixels, plain)
    assert any("VOI LUT/window not applied" in w for w in image.warnings)
    for keyword, says in (("ModalityLUTSequence", "its Modality LUT is damaged"), ("palette", "palette colour")):
        with pytest.raises(CorruptPixelDataError, match=says):
            read_dicom(_with_lut(src, tmp_path / f"{keyword}.dcm", keyword))

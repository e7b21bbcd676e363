"""DICOM outputs for PACS: every SEG and SR read back with highdicom and pydicom (the SEG's pixels equal the scan's
mask PNG, its references the source image's UIDs) and, where Debian's dicom3tools is installed, checked by
dciodvfy with no error."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from pneumotriage.models import LoadedModel, ModelSpec, build_model
from pneumotriage.scan import ScanOptions, run
from pneumotriage.synth import StudySummary

hd = pytest.importorskip("highdicom", reason="highdicom is the optional extra pneumotriage[dicom]")


class _OneRegion(torch.nn.Module):
    """A segmenter that outlines one confident 12 x 12 region of every image."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        logits = torch.full((b, 1, h, w), -10.0)
        logits[:, :, h // 3 : h // 3 + 12, w // 4 : w // 4 + 12] = 10.0
        return {"mask": logits}


@pytest.fixture(scope="module")
def scanned(study: StudySummary, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    spec = ModelSpec("classifier", "resnet34", input_size=64)
    net = build_model(spec).eval()
    clf = LoadedModel(net, spec, {"gate": 0.0}, {"clinical": False, "note": "trained on synthetic images"}, None,
                      "c" * 64, "demo-classifier")  # fmt: skip
    seg_spec = ModelSpec("segmenter", "unet", "resnet34", input_size=64)
    seg = LoadedModel(_OneRegion(), seg_spec, {"min_area": 100.0}, {"clinical": True}, None, "d" * 64, "one-region")
    outs = {}
    for label, no_phi in (("plain", False), ("no-phi", True)):
        out = tmp_path_factory.mktemp(label)
        options = ScanOptions.of(workers=1, segment_all=True, dicom_seg=True, dicom_sr=True, no_phi=no_phi)
        summary = run([study.out], out, classifier=clf, segmenter=seg, options=options)
        assert not any("DICOM SEG/SR" in n for n in summary.notes), summary.notes
        outs[label] = out
    return outs


def _texts(ds: pydicom.Dataset) -> list[str]:
    """Every text and code meaning in an SR's content tree (a dataset's repr cuts long values short)."""
    found = []
    for item in ds.get("ContentSequence", []):
        for sequence in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
            found += [str(code.CodeMeaning) for code in item.get(sequence, [])]
        for nested in item.get("MeasuredValueSequence", []):
            found += [str(code.CodeMeaning) for code in nested.get("MeasurementUnitsCodeSequence", [])]
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


def _rows(out: Path) -> list[dict[str, str]]:
    import csv

    return list(csv.DictReader(open(out / "worklist.csv", newline="")))


def test_seg_pixels_and_references_equal_the_scans(scanned: dict[str, Path]) -> None:
    out = scanned["plain"]
    rows = [r for r in _rows(out) if r["mask_file"]]
    assert len(rows) == 12
    for r in rows:
        stem = Path(r["mask_file"]).stem
        # pydicom reads it whole. (highdicom 0.28's reader wants a Slice Thickness in Pixel Measures, which the
        # standard requires only with a frame of reference: a radiograph has none, so none is written.)
        seg = pydicom.dcmread(out / "dicom" / f"{stem}-seg.dcm")
        source = pydicom.dcmread(r["path"], stop_before_pixels=True)
        mask = np.asarray(Image.open(out / r["mask_file"])) > 0
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
        assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 1
        assert np.array_equal(seg.pixel_array.reshape(mask.shape) > 0, mask)
        assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "Pneumothorax"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        parameters = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        assert "one-region sha256 " + "d" * 64 in parameters and "demo-classifier sha256 " + "c" * 64 in parameters
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
        assert [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [
            float(v) for v in source.PixelSpacing
        ]


def test_sr_holds_the_triage_and_references_the_image(scanned: dict[str, Path]) -> None:
    out = scanned["plain"]
    for r in _rows(out):
        stem = Path(r["mask_file"]).stem
        sr = pydicom.dcmread(out / "dicom" / f"{stem}-sr.dcm")
        source = pydicom.dcmread(r["path"], stop_before_pixels=True)
        # highdicom reads the report back, template and all: one measurement group, for this image.
        (group,) = hd.sr.srread(out / "dicom" / f"{stem}-sr.dcm").content.get_image_measurement_groups()
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        text = " | ".join(_texts(sr))
        assert r["tier"].capitalize() in text and "Pneumothorax probability" in text
        assert "Not for clinical use" in text  # the classifier is not clinical
        assert "demo-classifier sha256 " + "c" * 64 in text and "one-region sha256 " + "d" * 64 in text
        assert (r["area_cm2"] != "") == ("square centimeter" in text)


def test_no_phi_objects_carry_no_patient_identifiers(scanned: dict[str, Path], study: StudySummary) -> None:
    out = scanned["no-phi"]
    patients = {i.patient_id for i in study.images}
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == 24
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.PatientID == "" and str(ds.PatientName) == "" and ds.get("AccessionNumber", "") == ""
        assert not any(p in str(ds) for p in patients)
        # PS3.15's basic profile: the study's dates and people go too (the object's own creation time stays).
        for keyword in ("StudyDate", "StudyTime", "OtherPatientNames", "ReferringPhysicianName", "StudyID"):
            assert str(ds.get(keyword, "")) == "", (path.name, keyword, ds.get(keyword))


def test_dciodvfy_finds_no_error(scanned: dict[str, Path]) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian's dicom3tools; .ci/run installs it)")
    for path in sorted((scanned["plain"] / "dicom").glob("*.dcm")):
        done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_the_sr_says_an_algorithm_made_it_and_no_one_verified_it(scanned: dict[str, Path]) -> None:
    """The IHE AI Results profile's marks: the algorithm as Contributing Equipment ("Processing Equipment"),
    VerificationFlag UNVERIFIED, a caution in the series description, and the private coding scheme declared."""
    import pydicom

    from pneumotriage.scan.pacs import SCHEME

    path = next((scanned["plain"] / "dicom").glob("*-sr.dcm"))
    sr = pydicom.dcmread(path)
    assert sr.VerificationFlag == "UNVERIFIED" and "unverified" in sr.SeriesDescription
    equipment = sr.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "pneumotriage"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == [SCHEME]

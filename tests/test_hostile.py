"""What a real export folder throws at the scan: FIFOs, names that are not UTF-8, lying or damaged headers, files
that are not DICOM, the same file twice, bad options and checkpoints, an unwritable or full --out, deep nesting.

Each case checks the exit code, that the message is one line without a traceback, that the other files are
still scanned, and that what is written parses. Tests that could block (a FIFO) run in a child process under a
timeout, so they fail instead of hanging the suite.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.errors import OutputError
from pneumotriage.models import ModelSpec, build_model, load_model, save_checkpoint
from pneumotriage.scan import ScanOptions, run
from pneumotriage.synth import StudySummary, write_study

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained 64 px models (enough to run the cascade) and damaged copies of the classifier's checkpoint."""
    root = tmp_path_factory.mktemp("hostile-models")
    torch.manual_seed(0)
    clf = save_checkpoint(
        root / "clf.pt", build_model(ModelSpec("classifier", "efficientnet_b0", input_size=64)), thresholds={"gate": 0}
    )
    seg = save_checkpoint(
        root / "seg.pt",
        build_model(ModelSpec("segmenter", "unet", "efficientnet_b0", input_size=64)),
        thresholds={"top_score": 0.2, "min_area": 50},
    )
    good = torch.load(clf, weights_only=True)
    damaged = {
        "version-text": {**good, "format_version": "x"},
        "no-state": {k: v for k, v in good.items() if k != "state_dict"},
        "gate-nan": {**good, "thresholds": {"gate": float("nan")}},
        "gate-text": {**good, "thresholds": {"gate": "high"}},
    }
    paths = {"classifier": clf, "segmenter": seg}
    for name, data in damaged.items():
        torch.save(data, root / f"{name}.pt")
        paths[name] = root / f"{name}.pt"
    return paths


def _copy(study: StudySummary, folder: Path, n: int | None = None) -> list[Path]:
    """The study's DICOMs copied flat into ``folder`` (the first ``n``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(study.out.rglob("*.dcm"))[:n]
    for f in files:
        shutil.copy(f, folder / f.name)
    return sorted(folder.glob("*.dcm"))


def _scan(inputs: list[Path], out: Path, models: dict[str, Path], *extra: str) -> Any:
    args = ["scan", *map(str, inputs), "--out", str(out), "--classifier", str(models["classifier"])]
    args += ["--segmenter", str(models["segmenter"]), "--workers", "0", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def _one_line(result: Any) -> str:
    """The command's error: exactly one 'error:' line, and no traceback."""
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _all_outputs_parse(out: Path, *, submission: bool = True) -> dict[str, Any]:
    """worklist.json and metrics are strict JSON; every CSV has as many fields in each row as in its header.
    Without ``submission`` (a --no-segment scan) there must be no submission.csv."""
    doc = _strict_json(out / "worklist.json")
    assert (out / "submission.csv").exists() == submission
    for name in ("worklist.csv", "skipped.csv", *(["submission.csv"] if submission else [])):
        rows = _csv(out / name)
        assert rows and all(len(r) == len(rows[0]) for r in rows), name
    assert len(_csv(out / "worklist.csv")) == len(doc["worklist"]) + 1
    return dict(doc)


# --------------------------------------------------------------------------------------------------------------
# 1. FIFOs, sockets and devices are never opened


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("command", ["scan", "inspect"])
def test_a_fifo_does_not_hang_scan_or_inspect(
    command: str, study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    _copy(study, folder, 3)
    os.mkfifo(folder / "p.dcm")  # opening it would block for ever
    args = [sys.executable, "-m", "pneumotriage", command, str(folder)]
    if command == "scan":
        args += ["--out", str(tmp_path / "out"), "--classifier", str(checkpoints["classifier"]), "--no-segment"]
        args += ["--workers", "0", "--no-progress"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)  # fails, never hangs
    assert done.returncode == 0, done.stderr
    if command == "scan":
        doc = _all_outputs_parse(tmp_path / "out", submission=False)
        assert len(doc["worklist"]) == 3 and not any("p.dcm" in r["path"] for r in doc["worklist"])


# --------------------------------------------------------------------------------------------------------------
# 2. --no-phi: no identifier anywhere under --out, hidden files included; resume still works


def test_no_phi_leaves_no_identifier_in_any_byte(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    files = _copy(study, tmp_path / "in")
    identifiers = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        identifiers |= {str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyDate)}
        identifiers.add(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")  # as an ISO date
    out = tmp_path / "out"
    outside = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = _scan([tmp_path / "in"], out, checkpoints, "--no-phi")
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if out not in (p, *p.parents)} == outside
    # A kill after three images, then --resume: the journal must hold no identifier either.
    journal = out / ".scan" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:3]) + "\n")
    before = (out / "worklist.csv").read_bytes()
    result = _scan([tmp_path / "in"], out, checkpoints, "--no-phi", "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "worklist.csv").read_bytes() == before
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in identifiers:
                assert value.encode() not in data, f"{value} in {path.relative_to(out)}"


# --------------------------------------------------------------------------------------------------------------
# 3. A file name that is not UTF-8


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_a_name_that_is_not_utf8_is_scanned_and_resumed(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    first, *_ = _copy(study, folder, 3)
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9\xff.dcm")
    os.rename(first, odd)
    out = tmp_path / "out"
    result = _scan([folder], out, checkpoints)
    assert result.exit_code == 0, result.output
    doc = _all_outputs_parse(out)
    assert len(doc["worklist"]) == 3
    assert any(r["path"].endswith("caf\\xe9\\xff.dcm") for r in doc["worklist"])  # named, its bytes escaped
    before = (out / "worklist.csv").read_bytes()
    journal = out / ".scan" / "journal.jsonl"
    journal.write_text("\n".join(journal.read_text().splitlines()[:1]) + "\n")
    result = _scan([folder], out, checkpoints, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "worklist.csv").read_bytes() == before


# --------------------------------------------------------------------------------------------------------------
# 4. Every number is checked before anything is written


@pytest.mark.parametrize(
    "option",
    [
        ["--gate", "2.0"],
        ["--gate", "nan"],
        ["--top-score", "-1"],
        ["--min-area", "-5"],
        ["--bottom-score", "2"],
        ["--min-component", "inf"],
        ["--urgent-probability", "2"],
        ["--batch-size", "0"],
        ["--workers", "-3"],
        ["--batch-size", "many"],
    ],
)
def test_out_of_range_options_exit_2_and_write_nothing(
    option: list[str], study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _scan([study.out], out, checkpoints, *option)
    assert result.exit_code == 2, result.output
    assert option[0] in _one_line(result)
    assert not out.exists()
    assert _scan([study.out], out, checkpoints).exit_code == 0  # the corrected run is not blocked


def test_the_library_checks_options_too(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from pneumotriage.errors import UsageError

    clf = load_model(checkpoints["classifier"])
    with pytest.raises(UsageError, match="--gate"):
        run([study.out], tmp_path / "out", classifier=clf, segmenter=None, options=ScanOptions.of(gate=float("nan")))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# 5. One line, not a traceback: damaged checkpoints, an --out that cannot be, a full disk, deep nesting


@pytest.mark.parametrize("name", ["version-text", "no-state", "gate-nan", "gate-text"])
def test_a_damaged_checkpoint_is_one_line(
    name: str, study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    models = {**checkpoints, "classifier": checkpoints[name]}
    result = _scan([study.out], tmp_path / "out", models)
    assert result.exit_code == 1, result.output
    assert f"{name}.pt" in _one_line(result)
    assert not (tmp_path / "out" / "worklist.csv").exists()


def test_an_out_that_is_a_file_or_under_one(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        result = _scan([study.out], out, checkpoints)
        assert result.exit_code == 2 and "is a file" in _one_line(result)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = _scan([study.out], locked / "out", checkpoints)
        assert result.exit_code == 1 and "cannot write" in _one_line(result)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_out_that_refuses_writes_is_one_line(
    code: int, study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only file system or a folder without write permission (root ignores permissions, so the refusal is
    made here as the OS would make it)."""
    import pneumotriage.scan.journal as journal_module

    def refused(path: Any, text: str) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(journal_module, "atomic_write_text", refused)
    result = _scan([study.out], tmp_path / "out", checkpoints)
    assert result.exit_code == 1
    line = _one_line(result)
    assert os.strerror(code) in line and "signature.json" in line and "choose an --out you can write to" in line


def test_a_full_disk_stops_with_one_line_and_resume_completes_it(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills after a few images: a typed error naming the file; after space is freed, --resume gives
    the outputs of an uninterrupted scan, byte for byte."""
    import pneumotriage.scan.finish as finish_module

    clf, seg = load_model(checkpoints["classifier"]), load_model(checkpoints["segmenter"])
    options = ScanOptions.of(workers=0, segment_all=True, top_score=0.2, min_area=50)
    clean = tmp_path / "clean"
    run([study.out], clean, classifier=clf, segmenter=seg, options=options)

    real_write = finish_module.atomic_write_bytes
    writes = [0]

    def filling(path: Any, data: bytes, *, durable: bool = True) -> None:
        writes[0] += 1
        if writes[0] > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data, durable=durable)

    out = tmp_path / "out"
    monkeypatch.setattr(finish_module, "atomic_write_bytes", filling)
    with pytest.raises(OutputError, match="No space left on device.*--resume"):
        run([study.out], out, classifier=clf, segmenter=seg, options=options)
    monkeypatch.setattr(finish_module, "atomic_write_bytes", real_write)
    resumed = ScanOptions.of(workers=0, segment_all=True, top_score=0.2, min_area=50, resume=True)
    run([study.out], out, classifier=clf, segmenter=seg, options=resumed)
    for name in ("worklist.csv", "submission.csv"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(p.name for p in (clean / "masks").iterdir())


def test_folders_nested_1100_deep(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    _copy(study, deep, 1)
    inner = deep
    for _ in range(1100):  # one level at a time: mkdir(parents=True) itself recurses
        inner = inner / "d"
        inner.mkdir()
    shutil.copy(sorted(study.out.rglob("*.dcm"))[1], inner / "x.dcm")
    try:
        result = _scan([deep], tmp_path / "out", checkpoints, "--no-segment")
        assert result.exit_code == 0, result.output
        assert len(_all_outputs_parse(tmp_path / "out", submission=False)["worklist"]) == 2
    finally:  # removed here, bottom up: shutil.rmtree (pytest's clean-up) recurses and would fail on it
        (inner / "x.dcm").unlink()
        while inner != deep:
            inner.rmdir()
            inner = inner.parent


# --------------------------------------------------------------------------------------------------------------
# 7. The same file reached twice is scanned once


def test_the_same_file_twice_is_one_row(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    files = _copy(study, folder, 3)
    (folder / "zz-link.dcm").symlink_to(files[0].name)  # a link to a sibling
    out = tmp_path / "out"
    result = _scan([folder, files[1]], out, checkpoints)  # and a file named again on the command line
    assert result.exit_code == 0, result.output
    rows = _all_outputs_parse(out)["worklist"]
    assert len(rows) == 3
    assert sorted(r["rank"] for r in rows) == [1, 2, 3]
    masks = {p.name for p in (out / "masks").iterdir()}
    assert masks == {Path(r["mask_file"]).name for r in rows if r["mask_file"]}  # no orphan


# --------------------------------------------------------------------------------------------------------------
# 9. Outputs parse everywhere: strict JSON, CSVs that round-trip whatever a name or a DICOM string holds


def test_outputs_are_strict_json_and_csvs_round_trip(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    first, second, *_ = _copy(study, folder, 3)
    ds = pydicom.dcmread(first)
    ds.PixelSpacing = [1e200, 1e200]  # an area of infinity cm²
    ds.PatientID = 'a,b"c\nd\x1b'
    ds.AccessionNumber = "x,y"
    ds.save_as(first)
    os.rename(second, folder / 'odd, "name"\nhere.dcm')
    out = tmp_path / "out"
    result = _scan([folder], out, checkpoints)
    assert result.exit_code == 0, result.output
    doc = _all_outputs_parse(out)
    by_path = {Path(r["path"]).name: r for r in doc["worklist"]}
    assert by_path[first.name]["area_cm2"] is None and by_path[first.name]["patient_id"] == 'a,b"c\nd\x1b'
    with open(out / "worklist.csv", newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert rows[first.name]["patient_id"] == 'a,b"c\nd\x1b' and rows[first.name]["accession"] == "x,y"
    assert 'odd, "name"\nhere.dcm' in rows
    submission = _csv(out / "submission.csv")
    assert {r[0] for r in submission[1:]} == {r["image_id"] for r in doc["worklist"]}


# --------------------------------------------------------------------------------------------------------------
# 10. Files that are not DICOM are skipped, listed apart; a scan never reads its own outputs


def _dataset(sop_class: str) -> pydicom.Dataset:
    """An empty data set with the file meta of a ``sop_class`` object (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return ds


def _dicomdir(path: Path) -> None:
    ds = _dataset("1.2.840.10008.1.3.10")
    ds.FileSetID = "EXPORT"
    ds.save_as(path, enforce_file_format=True)


def test_files_that_are_not_dicom_are_skipped_not_rows(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    _copy(study, folder, 3)
    (folder / "LICENSE.txt").write_text("MIT\n")
    shutil.copy(study.labels_csv, folder / "train-rle.csv")
    (folder / "manifest.json").write_text("{}\n")
    _dicomdir(folder / "DICOMDIR")
    out = folder / "results"  # inside the input: its own outputs must not be picked up
    for attempt in range(2):  # the second run finds the first's outputs in its input folder
        result = _scan([folder], out if attempt == 0 else folder / "again", checkpoints)
        assert result.exit_code == 0, result.output
        written = out if attempt == 0 else folder / "again"
        doc = _all_outputs_parse(written)
        assert len(doc["worklist"]) == 3 and doc["counts"]["errors"] == 0
        skipped = {Path(r[0]).name for r in _csv(written / "skipped.csv")[1:]}
        assert skipped == {"LICENSE.txt", "train-rle.csv", "manifest.json", "DICOMDIR"}
        assert "skipped.csv" in (written / "report.html").read_text()


# --------------------------------------------------------------------------------------------------------------
# 12. A truncated file says so; an image too small to be a radiograph is refused


def _tiny_dicom(path: Path, rows: int, columns: int) -> None:
    ds = _dataset("1.2.840.10008.5.1.4.1.1.7")
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.full((rows, columns), 128, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_truncated_and_tiny_images_are_error_rows_that_say_why(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    files = _copy(study, folder, 3)
    data = files[0].read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) - 40])
    _tiny_dicom(folder / "one-pixel.dcm", 1, 1)
    _tiny_dicom(folder / "sliver.dcm", 3, 500)
    out = tmp_path / "out"
    result = _scan([folder], out, checkpoints)
    assert result.exit_code == 4, result.output  # some DICOMs could not be used
    rows = {Path(r["path"]).name: r for r in _all_outputs_parse(out)["worklist"]}
    assert sum(r["status"] == "ok" for r in rows.values()) == 3
    assert "truncated" in rows["cut.dcm"]["error"]
    for name in ("one-pixel.dcm", "sliver.dcm"):
        assert rows[name]["status"] == "error" and "too small" in rows[name]["error"]
        assert rows[name]["tier"] != "urgent"


# --------------------------------------------------------------------------------------------------------------
# 6. Resume never mixes runs: other inputs refused, outputs of changed or deleted inputs removed, one scan at a time


def test_resume_refuses_other_inputs(study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    _copy(study, tmp_path / "a", 2)
    _copy(study, tmp_path / "b", 3)
    out = tmp_path / "out"
    assert _scan([tmp_path / "a"], out, checkpoints).exit_code == 0
    result = _scan([tmp_path / "b"], out, checkpoints, "--resume")
    assert result.exit_code == 2 and "other inputs" in _one_line(result)


def test_resume_removes_outputs_of_changed_and_deleted_inputs(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    files = _copy(study, folder, 4)
    out = tmp_path / "out"
    assert _scan([folder], out, checkpoints, "--segment-all").exit_code == 0
    before = {p.name for p in (out / "masks").iterdir()}
    files[0].unlink()  # deleted
    other = sorted(study.out.rglob("*.dcm"))[5]
    shutil.copy(other, files[1])  # changed: another image under the same name
    os.utime(files[1], ns=(1_000_000_000, 1_000_000_000))
    assert _scan([folder], out, checkpoints, "--segment-all", "--resume").exit_code == 0
    fresh = tmp_path / "fresh"
    assert _scan([folder], fresh, checkpoints, "--segment-all").exit_code == 0
    assert (out / "worklist.csv").read_bytes() == (fresh / "worklist.csv").read_bytes()
    for sub in ("masks", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(p.name for p in (fresh / sub).iterdir())
        for p in (fresh / sub).iterdir():
            assert (out / sub / p.name).read_bytes() == p.read_bytes()
    assert before  # the first scan did outline something, so there was something to remove


def test_a_second_scan_into_a_busy_out_is_refused(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from pneumotriage.scan.journal import OutLock

    out = tmp_path / "out"
    held = OutLock(out / ".scan")  # a scan still running on this --out
    try:
        result = _scan([study.out], out, checkpoints, "--resume")
        assert result.exit_code == 2 and "another scan" in _one_line(result)
    finally:
        held.release()
    assert _scan([study.out], out, checkpoints, "--resume").exit_code == 0


# --------------------------------------------------------------------------------------------------------------
# 8. Two files with one ImageId: one rule for scan and submit, and a warning


def test_a_shared_image_id_follows_one_rule_in_scan_and_submit(
    study: StudySummary, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    dicoms = sorted(study.out.rglob("*.dcm"))
    smaller = sorted(write_study(tmp_path / "small", 1, positive_rate=0.0, size=(96, 96), seed=3).out.rglob("*.dcm"))
    for source, folder in ((dicoms[0], "x"), (smaller[0], "y")):  # two images of different sizes, one file name:
        (tmp_path / "in" / folder).mkdir(parents=True)  # their run-length codes differ, so the choice shows
        shutil.copy(source, tmp_path / "in" / folder / "same.dcm")
    shutil.copy(dicoms[2], tmp_path / "in" / "x" / "other.dcm")
    out = tmp_path / "out"
    result = _scan([tmp_path / "in"], out, checkpoints, "--segment-all")
    assert result.exit_code == 0, result.output
    assert "shared by more than one file" in result.output and "same" in result.output
    rows = _csv(out / "worklist.csv")
    assert sum(1 for r in rows[1:] if r[rows[0].index("image_id")] == "same") == 2
    submission = dict(_csv(out / "submission.csv")[1:])
    first = next(r for r in _csv(out / "worklist.csv")[1:] if r[rows[0].index("image_id")] == "same")
    assert first[rows[0].index("path")].endswith("x/same.dcm")  # ranked first (the larger outline)
    assert submission["same"] != "-1"
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,EncodedPixels\nsame,-1\nother,-1\n")
    args = ["submit", str(tmp_path / "in"), "--sample-submission", str(sample), "--out", str(tmp_path / "sub.csv")]
    args += ["--classifier", str(checkpoints["classifier"]), "--segmenter", str(checkpoints["segmenter"])]
    result = CliRunner().invoke(app, [*args, "--segment-all", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert dict(_csv(tmp_path / "sub.csv")[1:]) == {k: submission[k] for k in ("same", "other")}

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pneumotriage import read_rle_csv, rle_decode, write_rle_csv
from pneumotriage.errors import LabelError
from pneumotriage.folds import ImageRecord, index_dataset, patient_folds, split_fold


def _write(path: Path, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    if crlf:
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


@pytest.mark.parametrize(
    ("header", "bom", "crlf", "final_newline"),
    [
        ("ImageId,EncodedPixels\n", False, False, True),
        ("ImageId, EncodedPixels\n", True, False, False),
        ("", True, False, False),
        ("", False, True, True),
        ("ImageId , EncodedPixels \n", False, True, False),
    ],
)
def test_quirky_csvs_read_the_same(tmp_path: Path, header: str, bom: bool, crlf: bool, final_newline: bool) -> None:
    body = "a, 1 2 3 4\nb,-1\na,  10 2\nc , -1 \n\n"
    if not final_newline:
        body = body.rstrip("\n")
    labels = read_rle_csv(_write(tmp_path / "l.csv", header + body, bom=bom, crlf=crlf))
    assert dict(labels) == {"a": ["1 2 3 4", "10 2"], "b": [], "c": []}
    assert labels.positive("a") and not labels.positive("b")


def test_gzip_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "l.csv.gz"
    path.write_bytes(gzip.compress(b"\xef\xbb\xbfImageId, EncodedPixels\nx, 0 3\n"))
    assert read_rle_csv(path) == {"x": ["0 3"]}


def test_rows_are_combined_with_or_not_summed(tmp_path: Path) -> None:
    # Two overlapping regions of one image: pixels 2..5 and 4..7 (column-major, 4x4 image).
    labels = read_rle_csv(_write(tmp_path / "l.csv", "ImageId,EncodedPixels\nimg, 2 4\nimg, 4 4\nneg,-1\n"))
    mask = labels.masks_for("img", 4, 4)
    assert mask.dtype == bool
    assert mask.ravel(order="F").nonzero()[0].tolist() == [2, 3, 4, 5, 6, 7]
    assert not labels.masks_for("neg", 4, 4).any()


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("img, 1 2 3", "row 3: odd number"),
        ("img, 1 -2", "row 3: negative"),
        ("img, 1 two", "row 3: run-length string holds a non-integer"),
        ("img", "row 3: expected 2 columns"),
        (", 1 2", "row 3: empty ImageId"),
    ],
)
def test_malformed_rows_name_their_row(tmp_path: Path, row: str, fragment: str) -> None:
    path = _write(tmp_path / "bad.csv", f"ImageId,EncodedPixels\nok,-1\n{row}\n")
    with pytest.raises(LabelError, match=fragment) as info:
        read_rle_csv(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    lenient = read_rle_csv(path, strict=False)
    assert "ok" in lenient and len(lenient.errors) == 1 and lenient.errors[0].startswith("row 3")


def test_out_of_bounds_is_caught_at_decode_with_row(tmp_path: Path) -> None:
    labels = read_rle_csv(_write(tmp_path / "l.csv", "a,-1\nimg, 0 10\nimg, 20 1000\n"))
    with pytest.raises(LabelError, match=r"row 3 \(img\): .*past the image.*16x16"):
        labels.masks_for("img", 16, 16)
    assert labels.masks_for("img", 64, 64).sum() == 1010
    with pytest.raises(LabelError, match="no label for image 'zzz'"):
        labels.masks_for("zzz")


def test_absolute_form_is_explicit(tmp_path: Path) -> None:
    path = _write(tmp_path / "l.csv", "img,1 3 10 2\n")
    rel = read_rle_csv(path).masks_for("img", 4, 4)
    absolute = read_rle_csv(path, relative=False).masks_for("img", 4, 4)
    assert rel.ravel(order="F").nonzero()[0].tolist() == [1, 2, 3, 14, 15]
    assert absolute.ravel(order="F").nonzero()[0].tolist() == [0, 1, 2, 9, 10]


def test_write_rle_csv_kaggle_form(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1] = True
    path = tmp_path / "out" / "submission.csv"
    write_rle_csv(path, [("b", mask), ("a", "-1"), ("c", " 1 2 ")])
    assert path.read_text() == "ImageId,EncodedPixels\nb,5 2\na,-1\nc,1 2\n"
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left behind
    back = read_rle_csv(path)
    assert np.array_equal(back.masks_for("b", 4, 4), mask)
    write_rle_csv(path, {"x": np.zeros((4, 4), dtype=bool)}, relative=False)
    assert path.read_text() == "ImageId,EncodedPixels\nx,-1\n"
    with pytest.raises(LabelError, match="given twice"):
        write_rle_csv(path, [("a", "-1"), ("a", "1 2")])
    assert path.read_text() == "ImageId,EncodedPixels\nx,-1\n"  # a failed write leaves the old file


def _records(groups: list[tuple[str, bool]]) -> list[ImageRecord]:
    return [
        ImageRecord(
            image_id=f"img{i}",
            path=Path(f"img{i}.dcm"),
            positive=pos,
            n_rows=int(pos),
            patient_id=patient or None,
            mask_area=100 * int(pos),
            height=8,
            width=8,
        )
        for i, (patient, pos) in enumerate(groups)
    ]


def test_patient_folds_keep_patients_together_and_stratify() -> None:
    rng = np.random.default_rng(0)
    groups: list[tuple[str, bool]] = []
    for p in range(120):
        for _ in range(int(rng.integers(1, 4))):
            groups.append((f"p{p}", bool(rng.random() < 0.25)))
    groups += [("", True), ("", False)]  # no patient id: each image is its own group
    records = _records(groups)
    folds = patient_folds(records, 5, seed=1)
    assert folds == patient_folds(records, 5, seed=1)
    assert folds != patient_folds(records, 5, seed=2)
    by_patient: dict[str, set[int]] = {}
    for record, fold in zip(records, folds, strict=True):
        by_patient.setdefault(record.group, set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 6
    pos_share = [sum(r.positive for r, f in zip(records, folds, strict=True) if f == k) / sizes[k] for k in range(5)]
    assert max(pos_share) - min(pos_share) < 0.15
    train, val = split_fold(records, 2, 5, seed=1)
    assert len(train) + len(val) == len(records)
    assert not {r.group for r in train} & {r.group for r in val}
    with pytest.raises(ValueError):
        split_fold(records, 5, 5)


def test_index_dataset_on_synthetic_study(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    index = index_dataset(study.out, study.labels_csv)
    assert len(index.records) == 12 and index.n_positive == 5
    by_id = {im.image_id: im for im in study.images}
    for record in index.records:
        assert record.mask_area == by_id[record.image_id].mask_area
        assert record.patient_id == by_id[record.image_id].patient_id
        assert (record.height, record.width) == (128, 128)
    assert {p.name for p, _ in index.skipped} == {"train-rle.csv", "manifest.json", "sample_submission.csv"}
    assert index.images_without_labels == [] and index.labels_without_images == []
    # A label for an image that is absent, and an image without a label.
    text = study.labels_csv.read_text().splitlines()
    dropped = text[1].split(",")[0]
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join([text[0], *[t for t in text[1:] if not t.startswith(dropped)], "ghost,-1"]))
    index = index_dataset(study.out, partial)
    assert index.labels_without_images == ["ghost"]
    assert [p.name for p in index.images_without_labels] == [f"{dropped}.dcm"]


@pytest.mark.realdata
def test_full_siim_label_file(real_data: Path) -> None:
    labels = read_rle_csv(real_data / "siim-labels" / "siim-pneumothorax-train-rle.csv.gz")
    assert len(labels) == 12047
    assert sum(bool(rows) for rows in labels.values()) == 2669
    assert sum(len(rows) for rows in labels.values()) == 3576
    assert sum(len(rows) >= 2 for rows in labels.values()) == 624
    areas = [int(labels.masks_for(i).sum()) for i, rows in labels.items() if rows]
    assert min(areas) == 55 and max(areas) == 161421
    assert int(np.median(areas)) == 8630


@pytest.mark.realdata
def test_sample_submissions(real_data: Path) -> None:
    stage1 = read_rle_csv(real_data / "siim-submissions" / "new_sample_submission.csv")
    assert len(stage1) == 1372 and not any(stage1.values())
    stage2 = read_rle_csv(real_data / "siim-submissions" / "stage_2_sample_submission.csv")
    assert len(stage2) == 3205 and all(k.startswith("ID_") for k in stage2)


def test_rle_decode_agrees_with_masks_for(tmp_path: Path) -> None:
    labels = read_rle_csv(_write(tmp_path / "l.csv", "img, 3 5 2 2\n"))
    assert np.array_equal(labels.masks_for("img", 6, 5), rle_decode("3 5 2 2", 6, 5))

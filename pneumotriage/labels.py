"""SIIM-ACR label files (run-length CSVs), the dataset index and patient-grouped folds.

Label CSVs in the wild vary: a UTF-8 BOM, no header row, a header ``ImageId, EncodedPixels`` with a space,
values with leading spaces, CRLF line ends, no final newline, gzip compression. All are read here. An image may
have several rows (one per annotated region); its mask is the logical OR of all rows, never their sum.
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumotriage.dicom import DicomHeader, SkippedFile, discover
from pneumotriage.errors import LabelError, RleError
from pneumotriage.io import atomic_write_text
from pneumotriage.rle import EMPTY, rle_decode, rle_encode, rle_runs

__all__ = [
    "DatasetIndex",
    "ImageRecord",
    "RleLabels",
    "index_dataset",
    "patient_folds",
    "read_rle_csv",
    "split_fold",
    "write_rle_csv",
]

#: The competition's image size; labels carry no size of their own.
SIIM_SHAPE = (1024, 1024)


class RleLabels(dict[str, list[str]]):
    """Image id -> its run-length strings (an empty list for a negative image), as read from one CSV.

    A ``dict`` so it can be used as one; it also remembers where each row came from, so decoding errors can name
    the file and the row.
    """

    def __init__(self, path: Path | None = None, *, relative: bool = True) -> None:
        super().__init__()
        self.path = path
        self.relative = relative
        self.row_numbers: dict[str, list[int]] = {}
        #: Rows passed over in non-strict reading, as one-line messages.
        self.errors: list[str] = []

    def positive(self, image_id: str) -> bool:
        return bool(self[image_id])

    def masks_for(self, image_id: str, height: int = SIIM_SHAPE[0], width: int = SIIM_SHAPE[1]) -> np.ndarray:
        """The union (logical OR) of every row of ``image_id`` as a (height, width) boolean mask."""
        try:
            rows = self[image_id]
        except KeyError:
            raise LabelError(f"no label for image {image_id!r}", path=self.path) from None
        mask = np.zeros((height, width), dtype=bool)
        for rle, row in zip(rows, self.row_numbers.get(image_id, [0] * len(rows)), strict=True):
            try:
                mask |= rle_decode(rle, height, width, relative=self.relative)
            except RleError as err:
                raise LabelError(
                    f"row {row} ({image_id}): {err.message} for a {height}x{width} image",
                    path=self.path,
                    hint="fix or remove that row, or give the right image size",
                ) from None
        return mask


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LabelError(f"cannot be read: {exc.strerror or exc}", path=path, hint="check the path") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise LabelError(f"gzip data is damaged ({exc})", path=path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelError("not UTF-8 text", path=path, hint="save the CSV as UTF-8") from None


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "")


def read_rle_csv(path: str | Path, *, relative: bool = True, strict: bool = True) -> RleLabels:
    """Read a SIIM-style label or submission CSV.

    Every RLE string is checked for syntax (integers, pairs, no negative value; order for the absolute form).
    With ``strict`` (the default) the first malformed row raises a :class:`LabelError` naming its row number;
    otherwise such rows are passed over and listed in ``labels.errors``.
    """
    path = Path(path)
    labels = RleLabels(path, relative=relative)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    id_col, rle_col, n_cols = 0, 1, 2
    first = True
    for fields in reader:
        row = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        cells = [f.strip() for f in fields]
        if first:
            first = False
            names = [_norm(c) for c in cells]
            if "imageid" in names:
                if "encodedpixels" not in names:
                    raise LabelError(f"row {row}: header has ImageId but no EncodedPixels column", path=path)
                id_col, rle_col, n_cols = names.index("imageid"), names.index("encodedpixels"), len(cells)
                continue
        try:
            if len(cells) < 2 or (n_cols == 2 and len(cells) > 2):
                raise LabelError(f"expected 2 columns (ImageId, EncodedPixels), found {len(cells)}")
            image_id, rle = cells[id_col], cells[rle_col]
            if not image_id:
                raise LabelError("empty ImageId")
            rle_runs(rle, relative=relative)
        except LabelError as err:
            message = f"row {row}: {err.message}"
            if strict:
                raise LabelError(message, path=path, hint="fix or remove that row") from None
            labels.errors.append(message)
            continue
        entries = labels.setdefault(image_id, [])
        lines = labels.row_numbers.setdefault(image_id, [])
        if rle not in ("", EMPTY):
            entries.append(rle)
            lines.append(row)
    return labels


def write_rle_csv(
    path: str | Path,
    rows: Mapping[str, str | np.ndarray] | Iterable[tuple[str, str | np.ndarray]],
    *,
    relative: bool = True,
) -> None:
    """Write a Kaggle submission: header ``ImageId,EncodedPixels``, one row per image, ``-1`` when empty.

    Values may be RLE strings (written as given, stripped) or masks (encoded here). Written atomically.
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    seen: set[str] = set()
    out = io.StringIO()
    # Quoted by the csv module where a value needs it (an image id holding a comma, quote or newline): every
    # row reads back as written. SIIM's ids never need it, so a SIIM submission is byte for byte the plain form.
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    for image_id, value in items:
        if image_id in seen:
            raise LabelError(f"image {image_id!r} given twice; a submission has one row per image", path=path)
        seen.add(image_id)
        rle = (value.strip() or EMPTY) if isinstance(value, str) else rle_encode(value, relative=relative)
        writer.writerow([image_id, rle])
    atomic_write_text(path, out.getvalue())


# --------------------------------------------------------------------------------------------------------------
# Dataset index


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image of a training or validation set."""

    image_id: str
    path: Path
    positive: bool
    n_rows: int
    patient_id: str | None
    mask_area: int
    height: int
    width: int
    #: A synthetic phantom (:data:`pneumotriage.dicom.SYNTHETIC_MARK`), not a patient image.
    synthetic: bool = False

    @property
    def group(self) -> str:
        """The key that keeps an image's patient in one fold (the image itself when no patient id is known)."""
        return f"patient:{self.patient_id}" if self.patient_id else f"image:{self.image_id}"


@dataclass
class DatasetIndex:
    records: list[ImageRecord]
    #: Images found under the root that the label file does not mention.
    images_without_labels: list[Path] = field(default_factory=list)
    #: Image ids in the label file with no image under the root.
    labels_without_images: list[str] = field(default_factory=list)
    #: Files under the root that cannot be used, with the reason.
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_positive(self) -> int:
        return sum(r.positive for r in self.records)


def index_dataset(image_root: str | Path, labels_csv: str | Path, *, relative: bool = True) -> DatasetIndex:
    """Match the DICOMs under ``image_root`` (header-only) with the rows of ``labels_csv``.

    Each record carries the mask area at the image's own size, so label/size mismatches surface here, with the
    file and row, rather than in the middle of training.
    """
    labels = read_rle_csv(labels_csv, relative=relative)
    index = DatasetIndex(records=[])
    seen: set[str] = set()
    for found in discover(image_root):
        if isinstance(found, SkippedFile):
            index.skipped.append((found.path, found.reason))
            continue
        header: DicomHeader = found
        if header.problem is not None or header.shape is None:
            index.skipped.append((header.path, header.problem or "no image size in the header"))
            continue
        if header.image_id in seen:
            index.skipped.append((header.path, f"duplicate image id {header.image_id}"))
            continue
        seen.add(header.image_id)
        if header.image_id not in labels:
            index.images_without_labels.append(header.path)
            continue
        height, width = header.shape
        area = int(np.count_nonzero(labels.masks_for(header.image_id, height, width))) if labels[header.image_id] else 0
        index.records.append(
            ImageRecord(
                image_id=header.image_id,
                path=header.path,
                positive=area > 0,
                n_rows=len(labels[header.image_id]),
                patient_id=header.patient_id,
                mask_area=area,
                height=height,
                width=width,
                synthetic=header.synthetic,
            )
        )
    index.labels_without_images = sorted(set(labels) - seen)
    return index


def patient_folds(records: Sequence[ImageRecord], k: int, *, seed: int = 0) -> list[int]:
    """Assign each record a fold in ``0..k-1``: no patient spans two folds, positives spread evenly.

    Patients are stratified by whether any of their images is positive; within each stratum they are shuffled
    (seeded), then placed largest first into the fold that holds the fewest images of that stratum so far.
    """
    if k < 2:
        raise ValueError("k-fold needs k >= 2")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[record.group].append(i)
    if len(groups) < k:
        raise ValueError(f"{len(groups)} patients cannot fill {k} folds")
    rng = random.Random(seed)
    fold_of = [0] * len(records)
    for stratum in (True, False):
        keys = sorted(g for g, idx in groups.items() if any(records[i].positive for i in idx) == stratum)
        rng.shuffle(keys)
        keys.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the shuffled order
        load = [0] * k
        for key in keys:
            fold = min(range(k), key=lambda f: (load[f], f))
            load[fold] += len(groups[key])
            for i in groups[key]:
                fold_of[i] = fold
    return fold_of


def split_fold(
    records: Sequence[ImageRecord], fold: int, k: int, *, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation) for fold ``fold`` of ``k`` patient-grouped, stratified folds."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    assignment = patient_folds(records, k, seed=seed)
    train = [r for r, f in zip(records, assignment, strict=True) if f != fold]
    val = [r for r, f in zip(records, assignment, strict=True) if f == fold]
    return train, val

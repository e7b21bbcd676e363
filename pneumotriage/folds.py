"""The dataset index and patient-grouped folds: which labelled image is where, and which images validate.

:func:`index_dataset` matches the DICOMs under a folder with a label CSV (one :class:`ImageRecord` per labelled
image, plus the images without labels and the labels without images); :func:`patient_folds` and
:func:`split_fold` make stratified k-folds in which no patient is in two folds.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumotriage.dicom import DicomHeader, SkippedFile, discover
from pneumotriage.labels import read_rle_csv

__all__ = ["DatasetIndex", "ImageRecord", "index_dataset", "patient_folds", "split_fold"]


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

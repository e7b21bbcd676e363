"""What a scan produces for each file and for the whole run: plain records, no behaviour."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pneumotriage.outlayout import mask_file, overlay_file
from pneumotriage.postprocess import Thresholds
from pneumotriage.rle import EMPTY

#: A worklist tier.
Tier = Literal["urgent", "review", "routine"]
#: Worklist tiers, most urgent first.
TIERS: tuple[Tier, ...] = ("urgent", "review", "routine")
#: What became of a file: "ok" (triaged), "error" (a DICOM that cannot be used, or an answer the scan cannot
#: trust), "not triaged" (refused by the input check) or "skipped" (not DICOM: never in the worklist).
Status = Literal["ok", "error", "not triaged", "skipped"]


def _phi(*keywords: str) -> Any:
    """A row field that identifies the patient: left out of every output with ``no_phi``. ``keywords`` are the
    DICOM attributes it is read from (which ``--no-phi`` also empties in the headers a SEG or SR copies)."""
    return field(default=None, metadata={"phi": keywords})


@dataclass
class ImageResult:
    """One row of the worklist."""

    image_id: str
    path: str
    status: Status
    error: str | None = None
    rank: int = 0
    tier: Tier = "review"
    probability: float | None = None
    segmented: bool = False
    area_px: int | None = None
    area_cm2: float | None = None
    side: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    accession: str | None = _phi("AccessionNumber")
    patient_id: str | None = _phi("PatientID")
    study_datetime: str | None = _phi("StudyDate", "StudyTime")
    modality: str | None = None
    #: AP, PA, LL... as the header says (a lateral view is not what the models were trained on).
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    mask_file: str | None = None
    overlay_file: str | None = None
    rle: str = EMPTY
    key: str = ""
    #: The name this image's files (mask, overlay, thumbnail) share; None for an unreadable file.
    file_stem: str | None = None
    #: Its place in the walk of the inputs: the order of a merged sharded scan's rows before ranking.
    seq: int = -1
    #: What the reader noted while reading the image truly ("window ... not applied", "3 frames; using the
    #: first", "no transfer syntax in the file meta; assumed ..."), joined with "; ". None when there was nothing.
    notes: str | None = None
    #: At the PACS (``listen``): when the image's study was last received, and when its results were acknowledged
    #: by the destination (ISO 8601, local time). None for a folder scan.
    received_at: str | None = None
    result_sent_at: str | None = None
    #: Why an outline is implausible ("implausible outline — check: ..."): such an image is tiered review, never
    #: urgent on its outline alone. None for a plausible outline or none.
    flag: str | None = None


#: Fields left out of every output with ``no_phi``.
PHI_FIELDS = tuple(f.name for f in fields(ImageResult) if "phi" in f.metadata)


@dataclass
class ScanSummary:
    out: Path
    results: list[ImageResult]
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: list[str] = field(default_factory=list)
    #: What ``auto`` chose and why (device, batch size, workers, threads).
    plan: dict[str, Any] = field(default_factory=dict)
    #: Files passed over as not DICOM (a text file, a label CSV, a DICOMDIR), each with why: skipped.csv.
    skipped: list[ImageResult] = field(default_factory=list)
    #: The classifier alone (``--no-segment``, or no segmenter): the probability that makes an image urgent.
    urgent_probability: float | None = None
    #: Which decisions ran, for the legend: "cascade" (the classifier's gate, then the segmenter's outline),
    #: "classifier" (the classifier alone) or "segmenter" (every image segmented, no classifier).
    decisions: str = "cascade"
    #: The segmenter was turned off (``--no-segment``), as opposed to not given.
    no_segment: bool = False

    @property
    def failed(self) -> int:
        return sum(r.status != "ok" for r in self.results)


#: What a file stem (:func:`pneumotriage.scan.discover.safe_name`) can be: the only part of an output path a row
#: holds. The paths themselves are derived from it, never read.
_STEM = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,140}")
_SIMPLE = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}


def _allowed(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) is Literal:
        return tuple({type(v) for v in typing.get_args(hint)})
    allowed: list[type] = []
    for part in typing.get_args(hint) or (hint,):
        allowed += [type(None)] if part is type(None) else list(_SIMPLE.get(part, (object,)))
    return tuple(allowed)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {}
#: The values a field of a Literal type may take.
_FIELD_VALUES: dict[str, tuple[Any, ...]] = {}


def row_from(data: object, where: str) -> ImageResult:
    """An :class:`ImageResult` from a line the scan wrote (its journal, a shard's results), checked as data from a
    file anyone could have edited: a dict of the row's own fields with values of their types, a file stem that is
    a plain name, and output paths that are those the stem gives (a forged ``mask_file`` would point a resume's
    clean-up, or the report, at any file). Raises :class:`~pneumotriage.errors.UsageError` naming ``where``."""
    from pneumotriage.errors import UsageError

    if not _FIELD_TYPES:
        hints = typing.get_type_hints(ImageResult)
        _FIELD_TYPES.update({f.name: _allowed(hints[f.name]) for f in fields(ImageResult)})
        _FIELD_VALUES.update(
            {
                f.name: typing.get_args(hints[f.name])
                for f in fields(ImageResult)
                if typing.get_origin(hints[f.name]) is Literal
            }
        )

    def damaged(why: str) -> UsageError:
        return UsageError(
            f"{where} is damaged: {why}", hint="scan into a new --out (or remove the damaged line to resume)"
        )

    if not isinstance(data, dict):
        raise damaged("not a row")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise damaged(f"unknown field {unknown[0]!r}")
    for name, value in data.items():
        if not isinstance(value, _FIELD_TYPES[name]) or (isinstance(value, bool) and bool not in _FIELD_TYPES[name]):
            raise damaged(f"{name} is {type(value).__name__}")
        if name in _FIELD_VALUES and value not in _FIELD_VALUES[name]:
            raise damaged(f"{name} is {value!r}, not one of {', '.join(map(repr, _FIELD_VALUES[name]))}")
    if "image_id" not in data or "path" not in data or "status" not in data:
        raise damaged("image_id, path or status missing")
    row = ImageResult(**data)
    stem = row.file_stem
    if stem is not None and not _STEM.fullmatch(stem):
        raise damaged(f"file_stem {stem!r} is not a plain file name")
    for name, derived in (("mask_file", mask_file(stem or "")), ("overlay_file", overlay_file(stem or ""))):
        value = getattr(row, name)
        if value is not None and (stem is None or value != derived):
            raise damaged(f"{name} {value!r} is not the file its row's name gives ({derived!r})")
    return row

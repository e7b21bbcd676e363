"""What a scan produces for each file and for the whole run: plain records, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumotriage.postprocess import Thresholds
from pneumotriage.rle import EMPTY

#: Worklist tiers, most urgent first.
TIERS = ("urgent", "review", "routine")
#: Fields left out of every output with ``no_phi``.
PHI_FIELDS = ("patient_id", "accession", "study_datetime")


@dataclass
class ImageResult:
    """One row of the worklist."""

    image_id: str
    path: str
    status: str  # "ok" | "error" (a DICOM that cannot be used) | "skipped" (not DICOM: never in the worklist)
    error: str | None = None
    rank: int = 0
    tier: str = "review"
    probability: float | None = None
    segmented: bool = False
    area_px: int | None = None
    area_cm2: float | None = None
    side: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    study_datetime: str | None = None
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
    #: Why an outline is implausible ("implausible outline — check: ..."): such an image is tiered review, never
    #: urgent on its outline alone. None for a plausible outline or none.
    flag: str | None = None


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
    #: With ``--no-segment``: the classifier probability that makes an image urgent (the report's legend).
    urgent_probability: float | None = None

    @property
    def failed(self) -> int:
        return sum(r.status != "ok" for r in self.results)

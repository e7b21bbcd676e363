"""Every path a scan writes under its ``--out``, in one place: the scan's stages, its sharding and merging, the
submission's work folder and the DICOM walker (which passes a scan's outputs over) all take them from here.

    OUT/worklist.csv worklist.json submission.csv skipped.csv report.html
    OUT/masks/<stem>.png  OUT/overlays/<stem>.jpg  OUT/dicom/<stem>-seg.dcm, -sr.dcm
    OUT/.scan/            the scan's own state: journal.jsonl, signature.json, lock, thumbs/<stem>[.plain].jpg
    OUT/.scan/shards.json OUT/.scan/shards/<k>-of-<n>/  a sharded scan: its layout, each shard's journal
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE = ".scan"
MASKS = "masks"
OVERLAYS = "overlays"
DICOM = "dicom"
WORKLIST_CSV = "worklist.csv"
WORKLIST_JSON = "worklist.json"
SUBMISSION = "submission.csv"
SKIPPED = "skipped.csv"
REPORT = "report.html"
JOURNAL = "journal.jsonl"
SIGNATURE = "signature.json"
LOCK = "lock"
SHARDS_JSON = "shards.json"
#: A shard's own files beside its journal: its rows and its completion record.
SHARD_RESULTS = "results.jsonl"
SHARD_DONE = "done.json"

#: The entries a scan writes into its ``--out``: in a scan's output folder only these (and hidden names, such as
#: atomic writes in flight) are passed over by a walk; anything else there (the DICOMs of a folder used as its
#: own ``--out``) is an input like any other.
OUTPUTS = frozenset({STATE, MASKS, OVERLAYS, DICOM, WORKLIST_CSV, WORKLIST_JSON, SUBMISSION, SKIPPED, REPORT})
#: What marks a folder as a scan's output (its journal's signature, or a sharded scan's layout).
MARKS = (os.path.join(STATE, SIGNATURE), os.path.join(STATE, SHARDS_JSON))


def scan_outputs_in(folder: str | os.PathLike[str], names: set[str]) -> frozenset[str]:
    """Of ``names`` (a folder's entries), those that are a scan's own outputs: all of :data:`OUTPUTS` when the
    folder is marked as a scan's output (:data:`MARKS`), else none."""
    if STATE not in names or not any(os.path.isfile(os.path.join(folder, mark)) for mark in MARKS):
        return frozenset()
    return OUTPUTS


def mask_file(stem: str) -> str:
    """An outlined image's mask, relative to ``--out`` (as a worklist row holds it)."""
    return f"{MASKS}/{stem}.png"


def overlay_file(stem: str) -> str:
    """An outlined image's overlay, relative to ``--out``."""
    return f"{OVERLAYS}/{stem}.jpg"


def thumbnail_name(stem: str) -> str:
    """The name of an image's report picture in its folder (:meth:`OutLayout.thumbnail`)."""
    return f"{stem}.jpg"


@dataclass(frozen=True)
class OutLayout:
    """The paths of one ``--out``."""

    out: Path

    @property
    def state(self) -> Path:
        return self.out / STATE

    @property
    def thumbs(self) -> Path:
        return self.state / "thumbs"

    @property
    def masks(self) -> Path:
        return self.out / MASKS

    @property
    def overlays(self) -> Path:
        return self.out / OVERLAYS

    @property
    def dicom(self) -> Path:
        return self.out / DICOM

    @property
    def shards_json(self) -> Path:
        return self.state / SHARDS_JSON

    def mask(self, stem: str) -> Path:
        return self.out / mask_file(stem)

    def overlay(self, stem: str) -> Path:
        return self.out / overlay_file(stem)

    def thumbnail(self, stem: str) -> Path:
        """The report's picture of an image: its overlay's crop or its grey thumbnail."""
        return self.thumbs / thumbnail_name(stem)

    def plain_thumbnail(self, stem: str) -> Path:
        """The report's picture of an outlined image without its outline."""
        return self.thumbs / f"{stem}.plain.jpg"

    def dicom_object(self, stem: str, kind: str) -> Path:
        """An image's DICOM ``kind`` ("seg" or "sr") for a PACS."""
        return self.dicom / f"{stem}-{kind}.dcm"

    def shard(self, index: int, count: int) -> Path:
        """The folder shard ``index`` of ``count`` journals into."""
        return self.state / "shards" / f"{index}-of-{count}"

    def made_by_a_scan(self) -> list[Path]:
        """The folders a scan makes (those missing before it are taken away by a scan that finds nothing)."""
        return [self.out, self.state, self.thumbs, self.masks, self.overlays]

"""A Kaggle submission: scan a test folder and write one row per ImageId of the competition's sample submission.

The rows follow the sample exactly (its order, duplicates collapsed). Each mask is the scan's, at its image's
original resolution, in the run-length form asked for; an ImageId with no readable image gets ``-1`` and is
listed in :attr:`Submission.missing`, so the caller can say so (the CLI exits 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pneumotriage.errors import UsageError
from pneumotriage.labels import read_rle_csv, write_rle_csv
from pneumotriage.models import LoadedModel
from pneumotriage.scan import ScanOptions, absolute_rle, by_image_id
from pneumotriage.scan import run as run_scan


@dataclass
class Submission:
    path: Path
    rows: int
    with_mask: int
    #: Sample ImageIds that no readable image in the test folder had (written as -1).
    missing: list[str]
    #: What the scan said along the way (models, thresholds, skipped files).
    notes: list[str] = field(default_factory=list)


def write_submission(
    test_dir: Path,
    sample_submission: Path,
    out_file: Path,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel,
    options: ScanOptions,
    work: Path | None = None,
    relative: bool = True,
) -> Submission:
    """Scan ``test_dir`` into ``work`` (default: ``OUT.scan`` beside ``out_file``) and write the submission."""
    sample_ids = list(read_rle_csv(sample_submission, strict=False))
    if not sample_ids:
        raise UsageError("the sample submission lists no ImageId", path=sample_submission)
    work = work or out_file.with_name(out_file.name + ".scan")
    summary = run_scan([test_dir], work, classifier=classifier, segmenter=segmenter, options=options)
    found = {i: r.rle for i, r in by_image_id(summary.results).items() if r.status == "ok"}  # as scan's rule
    missing = [i for i in sample_ids if i not in found]
    rows = [(i, found.get(i, "-1") if relative else absolute_rle(found.get(i, "-1"))) for i in sample_ids]
    write_rle_csv(out_file, rows, relative=relative)
    with_mask = sum(1 for _, value in rows if value.strip() != "-1")
    return Submission(out_file, len(rows), with_mask, missing, list(summary.notes))

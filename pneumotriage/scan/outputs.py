"""Stage 10, outputs: the ranked worklist (CSV and JSON), the Kaggle submission, the files passed over as not
DICOM (skipped.csv), and the HTML report (:mod:`pneumotriage.scan.report`).

Everything is written atomically. With ``no_phi`` the patient ID, accession number and study date/time are left
out of every file.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from pneumotriage.io import FORMULA_START, atomic_write_text, cell, printable, strict_json
from pneumotriage.labels import write_rle_csv
from pneumotriage.models import SYNTHETIC_NOTE
from pneumotriage.models.foreign import RUNTIMES as GENERIC
from pneumotriage.outlayout import SKIPPED, SUBMISSION, WORKLIST_CSV, WORKLIST_JSON
from pneumotriage.postprocess import Thresholds
from pneumotriage.rle import EMPTY, rle_runs
from pneumotriage.scan.records import PHI_FIELDS, ImageResult, ScanSummary
from pneumotriage.scan.report import write_report
from pneumotriage.scan.tiers import reason_of

WORKLIST_FIELDS = (
    "rank",
    "tier",
    "probability",
    "area_px",
    "area_cm2",
    "side",
    "reason",
    "flag",
    "image_id",
    "sop_instance_uid",
    "study_instance_uid",
    "accession",
    "patient_id",
    "study_datetime",
    "received_at",
    "result_sent_at",
    "modality",
    "view_position",
    "path",
    "status",
    "error",
    "notes",
    "mask_file",
    "overlay_file",
    "classifier",
    "classifier_sha256",
    "segmenter",
    "segmenter_sha256",
)


def clinical_notes(models: list[dict[str, Any]]) -> list[str]:
    """What every output of a scan says of its models that are not for clinical use (synthetic ones apart)."""
    synthetic = [m["name"] for m in models if not m["clinical"] and m.get("note") == SYNTHETIC_NOTE]
    other = [m["name"] for m in models if not m["clinical"] and m["name"] not in synthetic]
    notes = []
    if synthetic:
        notes.append(f"{' and '.join(map(str, synthetic))}: {SYNTHETIC_NOTE}, not for clinical use")
    if other:
        notes.append(f"{' and '.join(map(str, other))}: not for clinical use")
    return notes


def summarise(
    out: Path,
    ranked: list[ImageResult],
    *,
    counts: dict[str, int],
    models: list[dict[str, Any]],
    thresholds: Thresholds,
    no_segment: bool,
    plan: dict[str, Any],
    skipped: list[ImageResult],
    timings: dict[str, float],
    notes: tuple[str, ...] = (),
    urgent_probability: float | None = None,
) -> ScanSummary:
    """A scan's summary from its ranked rows: the counts by tier, and the notes every output carries (what the
    run could not do, models not for clinical use, image ids shared by several files), then ``notes``."""
    roles = {m.get("role") for m in models}
    segmented = "segmenter" in roles and not no_segment
    decisions = "cascade" if segmented and "classifier" in roles else "segmenter" if segmented else "classifier"
    if not roles:  # models not named (a caller's own summary): as the options say
        decisions = "classifier" if no_segment else "cascade"
    shown = []
    if no_segment:
        shown.append("classifier only (--no-segment): no outlines, areas or sides")
    elif decisions == "classifier":
        shown.append("classifier only (no segmenter given): no outlines, areas or sides")
    shown += clinical_notes(models)
    for m in models:
        source = m.get("imported")
        if source:
            whose = "the pipeline given at convert" if source.get("format") in GENERIC else "its publisher's pipeline"
            shown.append(
                f"{m['name']}: imported from {source['title']} ({source['licence']}); its output "
                f"{source['output_label']!r} through {whose} {source['pipeline']!r}; trained by "
                "a third party, not validated by pneumotriage: clinical use is your decision"
            )
    for note in (collision_note(ranked), shared_sop_note(ranked)):
        if note:
            shown.append(note)
    return ScanSummary(
        out=out,
        results=ranked,
        counts={
            **counts,
            "errors": sum(r.status == "error" for r in ranked),  # those found before a resume too
            "not_triaged": sum(r.status == "not triaged" for r in ranked),
            "images": len(ranked),
            "urgent": sum(r.tier == "urgent" for r in ranked),
            "review": sum(r.tier == "review" for r in ranked),
            "routine": sum(r.tier == "routine" for r in ranked),
            "skipped": len(skipped),
        },
        timings=timings,
        models=models,
        thresholds=thresholds,
        notes=[*shown, *notes],
        plan=plan,
        skipped=skipped,
        urgent_probability=urgent_probability if decisions == "classifier" else None,
        decisions=decisions,
        no_segment=no_segment,
    )


def worklist_rows(summary: ScanSummary, *, no_phi: bool = False) -> list[dict[str, Any]]:
    models = {m["role"]: m for m in summary.models}
    rows = []
    own = {f.name for f in fields(ImageResult)}
    for r in summary.results:
        # A row's own fields are plain values: read, not deep-copied (asdict's copy was most of this loop's time).
        row = {k: getattr(r, k) if k in own else None for k in WORKLIST_FIELDS}
        row["reason"] = reason_of(r, summary.thresholds, summary.decisions, summary.urgent_probability)
        for role in ("classifier", "segmenter"):
            m = models.get(role)
            row[role] = m["name"] if m else None
            row[f"{role}_sha256"] = m["sha256"] if m else None
        if no_phi:
            for k in PHI_FIELDS:
                row.pop(k, None)
        rows.append({k: printable(v) if isinstance(v, str) else v for k, v in row.items()})
    return rows


def absolute_rle(relative: str) -> str:
    """SIIM's relative run-length form rewritten with absolute, 1-based starts."""
    starts, lengths = rle_runs(relative, relative=True)
    if not lengths.size:
        return EMPTY
    return " ".join(f"{s + 1} {n}" for s, n in zip(starts.tolist(), lengths.tolist(), strict=True))


def write_outputs(
    summary: ScanSummary, *, rle_relative: bool = True, no_phi: bool = False, submission: bool = True
) -> None:
    """Write the worklist (CSV, JSON), ``submission.csv`` (unless ``submission`` is False: then any earlier one
    goes, so the folder never holds one of another run), ``skipped.csv`` and the report."""
    out = summary.out
    rows = worklist_rows(summary, no_phi=no_phi)
    fields = [f for f in WORKLIST_FIELDS if not rows or f in rows[0]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows(_csv_cells([row[f] for f in fields]) for row in rows)  # every row has these fields
    atomic_write_text(out / WORKLIST_CSV, buffer.getvalue())
    atomic_write_text(out / WORKLIST_JSON, strict_json(worklist_document(summary, rows), indent=1) + "\n")
    if submission:
        write_rle_csv(
            out / SUBMISSION,
            [
                (cell(printable(r.image_id)), r.rle if rle_relative else absolute_rle(r.rle))
                for r in by_image_id(summary.results).values()
            ],
            relative=rle_relative,
        )
    else:
        (out / SUBMISSION).unlink(missing_ok=True)
    skipped = io.StringIO()
    lines = csv.writer(skipped, lineterminator="\n")
    lines.writerow(["path", "reason"])
    for r in summary.skipped:
        lines.writerow([cell(printable(r.path)), cell(printable(r.error or "not DICOM"))])
    atomic_write_text(out / SKIPPED, skipped.getvalue())
    write_report(summary, rows, no_phi=no_phi)


def _csv_cells(values: list[Any]) -> list[Any]:
    """A worklist row's values as its CSV cells (:func:`_csv_value`), in place. The common types are tested here
    without a call for each cell; csv writes None as an empty cell itself."""
    for i, value in enumerate(values):
        kind = type(value)
        if kind is str:
            if value.startswith(FORMULA_START):
                values[i] = cell(value)
        elif kind is float:
            if not math.isfinite(value):
                values[i] = ""
        elif value is not None and kind is not int and kind is not bool:
            values[i] = _csv_value(value)
    return values


def _csv_value(value: Any) -> Any:
    """A worklist value as its CSV cell: empty for None and numbers that are not finite; text that a spreadsheet
    would run as a formula (a tag value, a file name) neutralised (:func:`pneumotriage.io.cell`)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return cell(value) if isinstance(value, str) else value


def worklist_document(summary: ScanSummary, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "counts": summary.counts,
        "timings": {k: round(v, 3) for k, v in summary.timings.items()},
        "models": summary.models,
        "thresholds": summary.thresholds.as_dict(),
        "notes": summary.notes,
        "plan": summary.plan,
        "worklist": rows,
    }


def by_image_id(results: list[ImageResult]) -> dict[str, ImageResult]:
    """One result per image id, the rule ``scan`` and ``submit`` share when files in different folders have the
    same name (and so the same ImageId): the readable one ranked first wins (the most urgent: a collision never
    hides an outline), else the first error row. ``results`` are in worklist order."""
    chosen: dict[str, ImageResult] = {}
    for r in results:
        if r.image_id not in chosen or (chosen[r.image_id].status != "ok" and r.status == "ok"):
            chosen[r.image_id] = r
    return chosen


def shared_image_ids(results: list[ImageResult]) -> dict[str, list[str]]:
    """Image ids that more than one file has, with those files' paths."""
    paths: dict[str, list[str]] = {}
    for r in results:
        paths.setdefault(r.image_id, []).append(r.path)
    return {image_id: found for image_id, found in paths.items() if len(found) > 1}


def collision_note(results: list[ImageResult]) -> str | None:
    """The warning a scan gives when files share an image id, naming the first such id and its files."""
    shared = shared_image_ids(results)
    if not shared:
        return None
    image_id, paths = next(iter(shared.items()))
    return printable(
        f"{len(shared)} image ids are shared by more than one file (first: {image_id} in {', '.join(paths)}); "
        "submission.csv takes the readable one ranked first for each"
    )


def shared_sop_note(results: list[ImageResult]) -> str | None:
    """The warning a scan gives when images of different patients or studies share a SOP Instance UID (a broken
    export or a forged file): a PACS keeps one object per UID, so at most one of them is the one it shows."""
    owners: dict[str, dict[tuple[str | None, str | None], str]] = {}
    for r in results:
        if r.sop_instance_uid:
            owners.setdefault(r.sop_instance_uid, {}).setdefault((r.patient_id, r.study_instance_uid), r.path)
    shared = {uid: paths for uid, paths in owners.items() if len(paths) > 1}
    if not shared:
        return None
    uid, paths = next(iter(shared.items()))
    return printable(
        f"{len(shared)} SOP Instance UIDs are shared by images of different patients or studies (first: {uid} in "
        f"{', '.join(paths.values())}): a PACS keeps one image per UID, so check which one it holds before acting "
        "on its row; their DICOM SEG/SR objects have UIDs of their own"
    )

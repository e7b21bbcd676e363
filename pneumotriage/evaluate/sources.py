"""The two sources of predictions (a submission CSV, a scan of labelled DICOMs) scored on one path, and the
evaluation written: metrics.json, per_image.csv, the plots.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumotriage.errors import LabelError, UsageError
from pneumotriage.evaluate.figures import (
    LARGE_CM2,
    PER_IMAGE_FIELDS,
    Evaluation,
    ImageScores,
    count_overlaps,
    metrics_document,
)
from pneumotriage.io import atomic_write_bytes, atomic_write_text
from pneumotriage.labels import RleLabels, read_rle_csv

if TYPE_CHECKING:
    from pneumotriage.models import LoadedModel
    from pneumotriage.runtime import Progress
    from pneumotriage.scan import ScanOptions


def headers_of(data: Path | None) -> dict[str, Any]:
    """The DICOM headers under ``data`` (none without it) by image id: their sizes, spacings and views."""
    from pneumotriage.dicom import DicomHeader, discover

    if data is None:
        return {}
    return {found.image_id: found for found in discover(data) if isinstance(found, DicomHeader)}


def _cm2_per_px(spacing: tuple[float, float] | None) -> float:
    if not spacing:
        return float("nan")
    area = spacing[0] * spacing[1] / 100.0
    return area if np.isfinite(area) and area > 0 else float("nan")


def evaluate_submission(
    submission: str | Path,
    labels_csv: str | Path,
    *,
    data: str | Path | None = None,
    rle_relative: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    large_cm2: float = LARGE_CM2,
) -> Evaluation:
    """Score a Kaggle-format submission: every unique ImageId of the submission that the labels know, in the
    submission's order. ImageIds without a label are left out, counted in ``metrics.json`` and named in a note;
    if none has a label, that is an error."""
    submission, labels_csv = Path(submission), Path(labels_csv)
    predictions = read_rle_csv(submission, relative=rle_relative)
    labels = read_rle_csv(labels_csv)
    listed = list(predictions)
    if not listed:
        raise UsageError("the submission lists no ImageId", path=submission)
    ids = [i for i in listed if i in labels]
    unlabelled = [i for i in listed if i not in labels]
    if not ids:
        raise LabelError(
            f"none of the submission's {len(listed)} ImageIds has a label in {labels_csv} (first: {listed[0]})",
            path=submission,
            hint="score against the label file of these images; ImageIds are the DICOM file names",
        )
    headers = headers_of(Path(data) if data is not None else None)
    shapes = {i: h.shape for i, h in headers.items() if h.shape is not None}
    true_area, pred_area, inter = count_overlaps(ids, predictions, labels, shapes)
    images = ImageScores(
        ids,
        true_area,
        pred_area,
        inter,
        (pred_area > 0).astype(np.float64),
        views=[headers[i].view_position if i in headers else None for i in ids],
        cm2_per_px=np.array([_cm2_per_px(headers[i].pixel_spacing_mm) if i in headers else np.nan for i in ids]),
    )
    sized = sum(i in shapes for i in ids)
    notes = []
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} of the submission's {len(listed)} ImageIds have no label and were not scored "
            f"(first: {unlabelled[0]})"
        )
    if sized < len(ids):
        notes.append(f"{len(ids) - sized} of {len(ids)} images scored at 1024x1024 (no DICOM found for them)")
    source = {
        "mode": "submission",
        "predictions": str(submission),
        "labels": str(labels_csv),
        "rle": "relative" if rle_relative else "absolute",
        "sizes_from_dicoms": sized,
        "unlabelled_ids": len(unlabelled),
    }
    doc = metrics_document(
        images,
        threshold=0.5,
        score_name="mask non-empty (0/1)",
        bootstrap=bootstrap,
        seed=seed,
        source=source,
        large_cm2=large_cm2,
    )
    return Evaluation(images, doc, score_kind="binary", threshold=0.5, notes=notes)


def evaluate_results(
    results: Iterable[Any],
    labels_csv: str | Path,
    *,
    threshold: float,
    source: dict[str, Any],
    bootstrap: int = 1000,
    seed: int = 0,
    spacings: Mapping[str, tuple[float, float] | None] | None = None,
    large_cm2: float = LARGE_CM2,
) -> Evaluation:
    """Score a scan's results (:class:`pneumotriage.scan.ImageResult`) against the labels. Labelled images the
    scan could not read are left out, counted (``unreadable``) and named in the notes; so are files the labels do
    not mention. ``spacings`` (pixel spacing in mm by image id, from the headers) gives the labelled areas in cm²
    for the figures by size; the tiers and view positions come from the results."""
    labels = read_rle_csv(labels_csv)
    predictions = RleLabels(None, relative=True)
    ids: list[str] = []
    shapes: dict[str, tuple[int, int]] = {}
    scores: list[float] = []
    tiers: list[str] = []
    views: list[str | None] = []
    unlabelled = unreadable = 0
    seen: set[str] = set()
    for r in results:
        if r.image_id not in labels:
            unlabelled += 1
            continue
        if r.status != "ok":
            unreadable += 1
            continue
        if r.image_id in seen:
            continue
        seen.add(r.image_id)
        ids.append(r.image_id)
        predictions[r.image_id] = [r.rle] if r.rle.strip() != "-1" else []
        shapes[r.image_id] = (int(r.rows), int(r.columns))
        scores.append(float(r.probability) if r.probability is not None else 0.0)
        tiers.append(r.tier)
        views.append(r.view_position)
    if not ids:
        raise UsageError("no scanned image has a label: check that the label file's ImageIds are the file names")
    true_area, pred_area, inter = count_overlaps(ids, predictions, labels, shapes)
    spacings = spacings or {}
    images = ImageScores(
        ids,
        true_area,
        pred_area,
        inter,
        np.asarray(scores, dtype=np.float64),
        flagged=np.array([t != "routine" for t in tiers], dtype=bool),
        urgent=np.array([t == "urgent" for t in tiers], dtype=bool),
        views=views,
        cm2_per_px=np.array([_cm2_per_px(spacings.get(i)) for i in ids], dtype=np.float64),
    )
    notes = []
    if unreadable:
        notes.append(f"{unreadable} labelled images could not be read and were not scored (see the scan's worklist)")
    if unlabelled:
        notes.append(f"{unlabelled} other files were not scored: not labelled, or not DICOM")
    doc = metrics_document(
        images,
        threshold=threshold,
        score_name=source.get("score", "classifier probability"),
        bootstrap=bootstrap,
        seed=seed,
        source={**source, "labels": str(labels_csv)},
        large_cm2=large_cm2,
    )
    doc["source"]["unreadable"] = unreadable
    return Evaluation(images, doc, score_kind="probability", threshold=threshold, notes=notes, unreadable=unreadable)


def per_image_csv(images: ImageScores) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_IMAGE_FIELDS)
    dice, iou = images.dice, images.iou
    for i, image_id in enumerate(images.image_ids):
        writer.writerow(
            [
                image_id,
                int(images.labels[i]),
                int(images.true_area[i]),
                int(images.pred_area[i]),
                int(images.intersection[i]),
                f"{dice[i]:.6f}",
                f"{iou[i]:.6f}",
                f"{images.scores[i]:.6f}",
            ]
        )
    return buffer.getvalue()


def write_evaluation(evaluation: Evaluation, out: str | Path) -> list[Path]:
    """Write ``metrics.json``, ``per_image.csv`` and the plots into ``out``; returns the files written."""
    import pneumotriage.plots as plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, doc = evaluation.images, evaluation.metrics  # completed here with the plots and notes
    y, s = images.labels, images.scores
    figures: dict[str, bytes] = {
        "roc.png": plots.roc_png(y, s, evaluation.threshold),
        "pr.png": plots.pr_png(y, s, evaluation.threshold),
        "confusion.png": plots.confusion_png(doc["mask_decision"]),
        "dice_hist.png": plots.dice_histogram_png(images.dice, y),
    }
    if evaluation.score_kind == "probability":
        figures["calibration.png"] = plots.calibration_png(y, s)
    else:
        evaluation.notes.append("no calibration curve: the image-level scores are 0/1, not probabilities")
    doc["plots"] = sorted(figures)
    doc["notes"] = list(evaluation.notes)
    for name, data in figures.items():
        atomic_write_bytes(out / name, data)
    atomic_write_text(out / "per_image.csv", per_image_csv(images))
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return [out / "metrics.json", out / "per_image.csv", *(out / name for name in figures)]


def evaluate_models(
    data: Path,
    labels: str | Path,
    out: Path,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions,
    bootstrap: int = 1000,
    seed: int = 0,
    large_cm2: float = LARGE_CM2,
    progress: Progress | None = None,
) -> Evaluation:
    """Scan the labelled DICOMs under ``data`` into ``out/scan`` with the models (:func:`pneumotriage.scan.run`),
    then score the scan's rows: the image-level score is the classifier's probability (the segmenter's when there
    is none) and the operating point the scan's gate."""
    from pneumotriage.scan import clinical_notes, run

    summary = run([data], out / "scan", classifier=classifier, segmenter=segmenter, options=options, progress=progress)
    source = {
        "mode": "models",
        "data": str(data),
        "scan": str(out / "scan"),
        "models": summary.models,
        "thresholds": summary.thresholds.as_dict(),
        "score": "classifier probability" if classifier is not None else "segmenter image score",
    }
    evaluation = evaluate_results(
        summary.results + summary.skipped,  # not-DICOM files: counted as not scored
        labels,
        threshold=summary.thresholds.gate if classifier is not None else 0.5,
        source=source,
        bootstrap=bootstrap,
        seed=seed,
        spacings={i: h.pixel_spacing_mm for i, h in headers_of(data).items()},
        large_cm2=large_cm2,
    )
    evaluation.notes += clinical_notes(summary.models)  # in metrics.json too
    return evaluation

"""The whole job: :func:`tune` checks its options, predicts and counts, searches, chooses the review threshold
and writes the tuned checkpoint.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pneumotriage.errors import UsageError
from pneumotriage.folds import ImageRecord, index_dataset
from pneumotriage.labels import RleLabels, read_rle_csv
from pneumotriage.metrics import threshold_for_sensitivity
from pneumotriage.models import LoadedModel, save_checkpoint
from pneumotriage.runtime import Progress
from pneumotriage.scan import Decisions, scan_thresholds
from pneumotriage.tune.oof import Group, joined, oof_groups
from pneumotriage.tune.predictions import predict_once
from pneumotriage.tune.records import Counts, Grid, Predictions, TuneResult
from pneumotriage.tune.review import DEFAULT_REVIEW_SPECIFICITY, REVIEW_TABLE, review_figures, review_threshold
from pneumotriage.tune.search import count, figures_at, index_of, outlined_at, scores, setting_at


def tune(
    data: str | Path,
    labels_csv: str | Path,
    *,
    segmenter: LoadedModel,
    classifier: LoadedModel | None,
    out: str | Path,
    grid: Grid | None = None,
    sensitivity: float | None = None,
    cache_root: Path | None = None,
    tta: bool = False,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    top_k: int = 10,
    progress: Progress | None = None,
    force: bool = False,
    oof: bool = False,
    review_specificity: float | None = None,
    review_share: float | None = None,
) -> TuneResult:
    """Tune the thresholds on the labelled DICOMs under ``data`` and write a copy of the segmenter's checkpoint
    with them (and the figures they reach here) to ``out``; the input checkpoint is never modified. For an
    ensemble segmenter, ``out`` is an ensemble file (JSON) naming the members with the tuned thresholds.

    With ``oof`` the segmenter is a fold ensemble (or one fold run) and ``data`` its training data: each image is
    predicted only by the member whose validation fold holds it (:func:`oof_groups`), and the thresholds are
    chosen on those out-of-fold predictions.

    Where the best setting outlines none of the positive images here (sensitivity 0: a segmenter that has not
    learnt, or thresholds no outline passes), nothing is written unless ``force``: such a checkpoint would tier
    every image routine or review.

    With a classifier, the review threshold (an image with nothing outlined goes to a person from this
    probability up) is chosen last, at the chosen gate and triplet, as the lowest that keeps
    ``review_specificity`` of the negatives routine (default :data:`DEFAULT_REVIEW_SPECIFICITY`), or that sends at
    most ``review_share`` of the images to review (:func:`review_threshold`)."""
    out = Path(out)
    _check(out, segmenter, classifier, sensitivity, review_specificity, review_share)
    index = index_dataset(data, labels_csv)
    if not index.records:
        raise UsageError("no labelled DICOM found: the label file's ImageIds must be the file names", path=data)
    labels = read_rle_csv(labels_csv)
    # The thresholds the scan would use with these checkpoints: the baseline the chosen setting must beat.
    current = scan_thresholds(classifier, segmenter, Decisions()).as_dict()
    if classifier is None:
        current["gate"] = 0.0  # without a classifier the scan segments every image
    grid = (grid or Grid()).with_values(current)
    notes: list[str] = []
    groups = _groups(list(index.records), segmenter, classifier, oof, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"tta": tta, "device": device, "backend": backend, "batch_size": batch_size, "workers": workers}
    predictions, counts, cache = _predicted(groups, labels, grid, out, cache_root, run, progress)
    if not predictions.image_ids:
        raise UsageError("none of the labelled images could be read", path=data)
    y = counts.true_area > 0
    cls = predictions.classifier
    gates = _gates(grid, cls, y, sensitivity, notes)
    best_index, default_score, top = _search(counts, grid, cls, gates, current, top_k)
    chosen = setting_at(grid, gates, best_index)
    figures = figures_at(counts, grid, cls, gates, best_index)
    new_thresholds = {k: chosen[k] for k in ("top_score", "min_area", "bottom_score", "min_component")}
    review: dict[str, Any] | None = None
    if classifier is not None and cls is not None:
        new_thresholds["gate"] = chosen["gate"]
        outlined = outlined_at(counts, grid, cls, gates, best_index)[0] > 0
        r, review, unmet = _review(y, outlined, cls, review_specificity, review_share)
        new_thresholds["review"] = chosen["review"] = r
        if unmet:
            notes.append(unmet)
    elif classifier is None:
        notes.append("no classifier: the review threshold is not tuned (a scan reviews from the gate up)")
    _refuse_or_note(figures, segmenter, force, notes)
    if predictions.unreadable:
        notes.append(f"{len(predictions.unreadable)} images could not be read and were left out")
    if index.skipped:
        notes.append(
            f"{len(index.skipped)} files under {data} were skipped (not DICOM, no usable header or duplicates)"
        )
    tuning = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(data),
        "labels": str(labels_csv),
        "images": len(predictions.image_ids),
        "unreadable": len(predictions.unreadable),
        "skipped_files": len(index.skipped),
        "chosen": chosen,
        "defaults": current,
        "default_competition_dice": default_score,
        "figures": figures,
        "sensitivity_target": sensitivity,
        "tta": tta,
        "grid": {k: list(v) for k, v in asdict(grid).items() if k != "gate"} | {"gate": list(gates)},
        "segmenter_sha256": segmenter.sha256,
        "classifier_sha256": classifier.sha256 if classifier is not None else None,
        "out_of_fold": oof,
        "review": review,
    }
    _write(out, segmenter, new_thresholds, tuning)
    return TuneResult(
        thresholds=chosen,
        defaults=current,
        score=figures["competition_dice"],
        default_score=default_score,
        top=top,
        figures=figures,
        out=out,
        cache=cache,
        notes=notes,
        review=review,
    )


def _check(
    out: Path,
    segmenter: LoadedModel,
    classifier: LoadedModel | None,
    sensitivity: float | None,
    review_specificity: float | None,
    review_share: float | None,
) -> None:
    """Refuse options that cannot work together, before anything is read."""
    for m in (segmenter, classifier):
        if m is not None and m.path is not None and out.resolve() == m.path.resolve():
            raise UsageError("--out is an input checkpoint: tune writes a new file", path=out)
    if sensitivity is not None and classifier is None:
        raise UsageError("--sensitivity sets the classifier's gate: give --classifier")
    if sensitivity is not None and not 0.0 < sensitivity <= 1.0:
        raise UsageError(f"--sensitivity {sensitivity}: give a share in (0, 1]")
    for option, value in (("--review-specificity", review_specificity), ("--review-share", review_share)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UsageError(f"{option} {value}: give a share from 0 to 1")
        if value is not None and classifier is None:
            raise UsageError(f"{option} sets the review threshold on the classifier's probability: give --classifier")
    if review_specificity is not None and review_share is not None:
        raise UsageError("give --review-specificity or --review-share, not both")
    if segmenter.members and out.suffix.lower() != ".json":
        raise UsageError("an ensemble is tuned into an ensemble file: give --out a name ending in .json", path=out)


def _groups(
    records: list[ImageRecord], segmenter: LoadedModel, classifier: LoadedModel | None, oof: bool, notes: list[str]
) -> list[Group]:
    """The images with the models that predict them: all of them by the models given, or (``oof``) each fold run's
    validation images by that run."""
    if not oof:
        return [Group(records, segmenter, classifier)]
    groups = oof_groups(records, segmenter, classifier)
    notes.append(
        f"out-of-fold: {len(groups)} fold run(s), each predicting its own validation images only "
        f"({sum(len(g.records) for g in groups)} of {len(records)} images)"
    )
    if classifier is not None and not classifier.members:
        notes.append("one classifier for every fold: its probabilities are not out-of-fold")
    return groups


def _predicted(
    groups: list[Group],
    labels: RleLabels,
    grid: Grid,
    out: Path,
    cache_root: Path | None,
    run: dict[str, Any],
    progress: Progress | None,
) -> tuple[Predictions, Counts, Path | None]:
    """Each group's predictions (read from the cache where they were made before) and per-image counts, joined;
    and the cache folder. The probability maps are kept beside the output, not in /tmp (often a RAM disk: they
    may be gigabytes), and only until the counts are taken."""
    parts: list[Predictions] = []
    part_counts: list[Counts] = []
    cache: Path | None = None
    with tempfile.TemporaryDirectory(prefix=".pneumotriage-tune-", dir=out.parent) as scratch:
        for i, group in enumerate(groups):
            part, cache = predict_once(
                group.records,
                segmenter=group.segmenter,
                classifier=group.classifier,
                cache_root=cache_root,
                scratch=Path(scratch) / f"maps{i}",
                progress=progress,
                **run,
            )
            parts.append(part)
            part_counts.append(count(part, labels, grid, progress))
        predictions, counts = joined(parts, part_counts) if len(parts) > 1 else (parts[0], part_counts[0])
    return predictions, counts, cache


def _search(
    counts: Counts, grid: Grid, cls: np.ndarray | None, gates: list[float], current: dict[str, float], top_k: int
) -> tuple[tuple[int, ...], float, list[dict[str, float]]]:
    """The best setting's index in the grid (the checkpoint's own where nothing beats it), the checkpoint's own
    score, and the ``top_k`` settings with their scores."""
    table = scores(counts, grid, cls, gates)
    default_index = index_of(grid, [current["gate"]], current)
    default_score = float(scores(counts, grid, cls, [current["gate"]])[default_index])
    best_index = tuple(int(i) for i in np.unravel_index(int(np.argmax(table)), table.shape))
    if current["gate"] in gates and default_score >= float(table[best_index]):
        best_index = index_of(grid, gates, current)  # never move off the checkpoint's values without a gain
    order = np.argsort(-table, axis=None, kind="stable")[:top_k]
    top = [
        {
            **setting_at(grid, gates, tuple(int(i) for i in np.unravel_index(j, table.shape))),
            "competition_dice": float(table.flat[j]),
        }
        for j in order
    ]
    return best_index, default_score, top


def _gates(
    grid: Grid, cls: np.ndarray | None, y: np.ndarray, sensitivity: float | None, notes: list[str]
) -> list[float]:
    """The classifier gates searched: none without a classifier, the one that keeps ``sensitivity``, or the
    grid's."""
    if cls is None:
        notes.append("no classifier: every image is segmented; the gate is not tuned")
        return [0.0]
    if sensitivity is None:
        return list(grid.gate)
    if not y.any():
        raise UsageError("--sensitivity needs positive images among the labels")
    # Rounded down to 6 decimals (the worklist's precision), so no positive it lets through is lost to rounding.
    gate = math.floor(threshold_for_sensitivity(y, cls, sensitivity) * 1e6) / 1e6
    notes.append(f"gate fixed at {gate:g} for classifier sensitivity >= {sensitivity:g} on these images")
    return [gate]


def _review(
    y: np.ndarray, outlined: np.ndarray, cls: np.ndarray, specificity: float | None, share: float | None
) -> tuple[float, dict[str, Any], str | None]:
    """The review threshold at the chosen setting; it with its figures and the table of other targets; and what
    could not be met."""
    r, unmet = review_threshold(y, outlined, cls, specificity=specificity, share=share)
    review = {
        "target": {"share": share}
        if share is not None
        else {"specificity": DEFAULT_REVIEW_SPECIFICITY if specificity is None else specificity},
        "figures": review_figures(y, outlined, cls, r),
        "table": [
            {"specificity_target": target, **review_figures(y, outlined, cls, at)}
            for target in REVIEW_TABLE
            for at in [review_threshold(y, outlined, cls, specificity=target)[0]]
        ],
    }
    return r, review, unmet


def _refuse_or_note(figures: dict[str, Any], segmenter: LoadedModel, force: bool, notes: list[str]) -> None:
    """A setting that outlines none of the positives here is refused, unless ``force`` (then noted)."""
    if not figures["n_positive"] or figures["sensitivity"]:
        return
    if not force:
        raise UsageError(
            f"the best setting outlines none of the {figures['n_positive']} positive images here "
            f"(competition Dice {figures['competition_dice']:.4f} comes from the negatives alone); nothing written",
            path=segmenter.path or segmenter.name,
            hint="train the segmenter further, or pass --force to write it anyway",
        )
    notes.append("written with --force: this setting outlines none of the positive images here")


def _write(out: Path, segmenter: LoadedModel, thresholds: dict[str, float], tuning: dict[str, Any]) -> None:
    """The tuned segmenter: an ensemble file naming the members, or a copy of its checkpoint."""
    if not segmenter.members:
        _write_tuned(out, segmenter, thresholds, tuning)
        return
    from pneumotriage.models.ensemble import write_ensemble

    meta = segmenter.meta
    write_ensemble(
        out,
        segmenter.members,
        {**segmenter.thresholds, **thresholds},
        tuning=tuning,
        clinical=bool(meta.get("clinical", True)),
        note=meta.get("note"),
    )


def _write_tuned(out: Path, segmenter: LoadedModel, thresholds: dict[str, float], tuning: dict[str, Any]) -> None:
    """A copy of the segmenter's checkpoint with the tuned thresholds and how they were chosen."""
    meta = segmenter.meta
    save_checkpoint(
        out,
        segmenter.model,
        thresholds={**segmenter.thresholds, **thresholds},
        config=meta.get("config"),
        data_fingerprint=meta.get("data_fingerprint"),
        metrics=meta.get("metrics"),
        epoch=meta.get("epoch"),
        extra={
            "tuning": tuning,
            "clinical": bool(meta.get("clinical", True)),
            **{k: meta[k] for k in ("synthetic_share", "note") if k in meta},
            "tuned_from": {
                "name": segmenter.name,
                "path": str(segmenter.path) if segmenter.path else None,
                "sha256": segmenter.sha256,
            },
        },
    )

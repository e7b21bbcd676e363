"""Every figure from the per-image counts and scores: the competition Dice, the clinical figures at the scan's
decision (exact intervals), the image-level curves and fixed operating points (bootstrap intervals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumotriage.labels import SIIM_SHAPE, RleLabels
from pneumotriage.metrics import (
    binary_metrics,
    bootstrap_ci,
    calibration_bins,
    dice_from_counts,
    exact_ci,
    iou_from_counts,
    pr_auc,
    roc_auc,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)

#: The fixed points reported with bootstrap intervals.
FIXED_SPECIFICITIES = (0.90, 0.95)
FIXED_SENSITIVITIES = (0.90, 0.95)
#: The labelled area (cm²) from which a pneumothorax counts as large in the figures by size. The project's choice,
#: not a clinical standard (guidelines size a pneumothorax by the rim's depth, which a mask does not give): about 5%
#: of an adult PA film's 35 x 43 cm, a quarter of a lung field. ``evaluate --large-cm2`` changes it.
LARGE_CM2 = 20.0
PER_IMAGE_FIELDS = (
    "image_id",
    "label_positive",
    "true_area_px",
    "pred_area_px",
    "intersection_px",
    "dice",
    "iou",
    "score",
)


@dataclass
class ImageScores:
    """Per-image counts and scores, in one order."""

    image_ids: list[str]
    true_area: np.ndarray
    pred_area: np.ndarray
    intersection: np.ndarray
    scores: np.ndarray
    #: The decision the scan made of each image, when known: flagged for a person (urgent or review) ...
    flagged: np.ndarray | None = None
    #: ... and urgent alone (None for a submission, which has no tiers).
    urgent: np.ndarray | None = None
    #: The header's view position of each image (AP, PA, ...), None where it gives none.
    views: list[str | None] | None = None
    #: The area of one pixel in cm², NaN where the pixel spacing is unknown.
    cm2_per_px: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.true_area > 0

    @property
    def predicted(self) -> np.ndarray:
        return self.pred_area > 0

    @property
    def dice(self) -> np.ndarray:
        return dice_from_counts(self.intersection, self.pred_area, self.true_area)

    @property
    def iou(self) -> np.ndarray:
        return iou_from_counts(self.intersection, self.pred_area, self.true_area)


@dataclass
class Evaluation:
    images: ImageScores
    #: The ``metrics.json`` document.
    metrics: dict[str, Any]
    #: Score kind for plots: "probability" (calibrated-ish, a calibration curve makes sense) or "binary".
    score_kind: str = "probability"
    threshold: float = 0.5
    notes: list[str] = field(default_factory=list)
    #: Labelled images whose predictions are missing because their files could not be read.
    unreadable: int = 0


def count_overlaps(
    image_ids: Sequence[str],
    predictions: RleLabels,
    labels: RleLabels,
    shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelled area, predicted area, intersection) per image, each mask the OR of its rows, decoded at the
    image's size (``shapes``, else 1024 x 1024). An image with no prediction rows counts as predicted empty."""
    n = len(image_ids)
    true_area = np.zeros(n, dtype=np.int64)
    pred_area = np.zeros(n, dtype=np.int64)
    inter = np.zeros(n, dtype=np.int64)
    shapes = shapes or {}
    for i, image_id in enumerate(image_ids):
        has_true, has_pred = bool(labels.get(image_id)), bool(predictions.get(image_id))
        if not (has_true or has_pred):
            continue  # both empty: the common case, nothing to decode
        h, w = shapes.get(image_id, SIIM_SHAPE)
        true = labels.masks_for(image_id, h, w) if has_true else None
        pred = predictions.masks_for(image_id, h, w) if has_pred else None
        true_area[i] = np.count_nonzero(true) if true is not None else 0
        pred_area[i] = np.count_nonzero(pred) if pred is not None else 0
        if true is not None and pred is not None:
            inter[i] = np.count_nonzero(true & pred)
    return true_area, pred_area, inter


def _proportion(hits: np.ndarray, of: np.ndarray) -> dict[str, Any]:
    """A share with its exact 95% interval: ``hits`` among the images where ``of`` is true."""
    k, n = int(np.count_nonzero(hits & of)), int(np.count_nonzero(of))
    ci = exact_ci(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "ci95": list(ci) if ci else None}


def _decision_figures(y: np.ndarray, decided: np.ndarray) -> dict[str, Any]:
    """Sensitivity and specificity (exact 95% intervals), PPV, NPV and the counts of one yes/no decision (the
    counts and ratios are :func:`binary_metrics`' at the decision)."""
    m = binary_metrics(y, decided.astype(np.float64), 0.5)
    return {
        "sensitivity": _proportion(decided, y),
        "specificity": _proportion(~decided, ~y),
        "ppv": _finite(m["precision"]),
        "npv": _finite(m["npv"]),
        **{k: m[k] for k in ("tp", "fp", "fn", "tn")},
    }


def clinical_metrics(images: ImageScores, *, large_cm2: float = LARGE_CM2) -> dict[str, Any]:
    """The figures the clinical literature reports, at the decision the tool makes: sensitivity and specificity
    with exact 95% intervals (flagged = urgent or review, as a reader of the worklist meets it, and urgent alone);
    the same by pneumothorax size (large from ``large_cm2`` of labelled area, small below, unknown without a pixel
    spacing) and by view position; and the calibration of the image-level score (reliability bins and ECE).

    Without the scan's tiers (a submission) the decision is "an outline drawn"."""
    y = images.labels
    flagged = images.flagged if images.flagged is not None else images.predicted
    doc: dict[str, Any] = {
        "decision": "urgent or review" if images.flagged is not None else "outline drawn",
        "flagged": _decision_figures(y, flagged),
    }
    if images.urgent is not None:
        doc["urgent"] = _decision_figures(y, images.urgent)
    cm2 = images.true_area * (images.cm2_per_px if images.cm2_per_px is not None else np.full(len(y), np.nan))
    known = np.isfinite(cm2)
    dice = images.dice
    groups = {
        f"large (>= {large_cm2:g} cm²)": y & known & (cm2 >= large_cm2),
        f"small (< {large_cm2:g} cm²)": y & known & (cm2 < large_cm2),
        "size unknown (no pixel spacing)": y & ~known,
    }
    doc["by_size"] = {
        name: {
            "n_positive": int(group.sum()),
            "sensitivity": _proportion(flagged, group),
            **({"sensitivity_urgent": _proportion(images.urgent, group)} if images.urgent is not None else {}),
            "dice_mean": _finite(float(dice[group].mean())) if group.any() else None,
        }
        for name, group in groups.items()
        if group.any()
    }
    doc["large_cm2"] = large_cm2
    views = [v or "unknown" for v in images.views] if images.views is not None else ["unknown"] * len(y)
    doc["by_view"] = {}
    for view in sorted(set(views)):
        group = np.array([v == view for v in views], dtype=bool)
        doc["by_view"][view] = {
            "n": int(group.sum()),
            "n_positive": int((group & y).sum()),
            "sensitivity": _proportion(flagged, group & y),
            "specificity": _proportion(~flagged, group & ~y),
        }
    doc["calibration"] = calibration_bins(y, images.scores)
    return doc


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    return None if x is None or not np.isfinite(x) else float(x)


def _ci(values: np.ndarray, statistic: Any, bootstrap: int, seed: int) -> list[float | None] | None:
    """A 95% bootstrap interval ``[low, high]``; None when bootstrapping is off."""
    if bootstrap <= 0:
        return None
    lo, hi = bootstrap_ci(statistic, len(values), resamples=bootstrap, seed=seed)
    return [_finite(lo), _finite(hi)]


def _curve_figures(y: np.ndarray, s: np.ndarray, threshold: float) -> np.ndarray:
    """The bootstrapped image-level figures of one sample, from one ROC curve: ROC AUC, PR AUC, recall,
    specificity and precision at ``threshold``, then sensitivity at each fixed specificity and the reverse."""
    op = binary_metrics(y, s, threshold)
    fixed = [sensitivity_at_specificity(y, s, t)[0] for t in FIXED_SPECIFICITIES]
    fixed += [specificity_at_sensitivity(y, s, t)[0] for t in FIXED_SENSITIVITIES]
    return np.array([roc_auc(y, s), pr_auc(y, s), op["recall"], op["specificity"], op["precision"], *fixed])


def image_level_metrics(
    y: np.ndarray, s: np.ndarray, threshold: float, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """ROC/PR AUC, the confusion matrix and ratios at ``threshold``, sensitivity at fixed specificities and the
    reverse, each with a percentile-bootstrap 95% interval (``bootstrap`` resamples of the images, seeded)."""
    n_fixed = len(FIXED_SPECIFICITIES) + len(FIXED_SENSITIVITIES)
    if bootstrap > 0:
        lo, hi = bootstrap_ci(
            lambda idx: _curve_figures(y[idx], s[idx], threshold), len(y), resamples=bootstrap, seed=seed
        )
        cis: list[list[float | None] | None] = [[_finite(a), _finite(b)] for a, b in zip(lo, hi, strict=True)]
    else:
        cis = [None] * (5 + n_fixed)
    op = binary_metrics(y, s, threshold)
    doc: dict[str, Any] = {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "roc_auc": _finite(roc_auc(y, s)),
        "roc_auc_ci95": cis[0],
        "pr_auc": _finite(pr_auc(y, s)),
        "pr_auc_ci95": cis[1],
        "operating_point": {
            **{k: _finite(v) if isinstance(v, float) else v for k, v in op.items()},
            "recall_ci95": cis[2],
            "specificity_ci95": cis[3],
            "precision_ci95": cis[4],
        },
    }
    column = 5
    for name, fixed, fn in (
        ("sensitivity_at_specificity", FIXED_SPECIFICITIES, sensitivity_at_specificity),
        ("specificity_at_sensitivity", FIXED_SENSITIVITIES, specificity_at_sensitivity),
    ):
        doc[name] = {}
        for target in fixed:
            value, thr = fn(y, s, target)
            doc[name][f"{target:.2f}"] = {"value": _finite(value), "threshold": _finite(thr), "ci95": cis[column]}
            column += 1
    return doc


def metrics_document(
    images: ImageScores,
    *,
    threshold: float,
    score_name: str,
    bootstrap: int = 1000,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    large_cm2: float = LARGE_CM2,
) -> dict[str, Any]:
    """The ``metrics.json`` document of per-image counts and scores."""
    dice, iou, y = images.dice, images.iou, images.labels

    def mean_of(values: np.ndarray, where: np.ndarray | None = None) -> Any:
        def statistic(idx: np.ndarray) -> float:
            chosen = values[idx] if where is None else values[idx][where[idx]]
            return float(chosen.mean()) if len(chosen) else float("nan")

        return statistic

    positives = y.any()
    doc: dict[str, Any] = {
        "source": source or {},
        "n_images": int(len(y)),
        "n_positive": int(y.sum()),
        "n_predicted_positive": int(images.predicted.sum()),
        "competition_dice": _finite(float(dice.mean())) if len(dice) else None,
        "competition_dice_ci95": _ci(dice, mean_of(dice), bootstrap, seed),
        "dice_positive_mean": _finite(float(dice[y].mean())) if positives else None,
        "dice_positive_mean_ci95": _ci(dice, mean_of(dice, y), bootstrap, seed) if positives else None,
        "iou_mean": _finite(float(iou.mean())) if len(iou) else None,
        "iou_positive_mean": _finite(float(iou[y].mean())) if positives else None,
        "mask_decision": {
            k: _finite(v) if isinstance(v, float) else v
            for k, v in binary_metrics(y, images.predicted.astype(float), 0.5).items()
        },
        "image_level": {
            "score": score_name,
            **image_level_metrics(y, images.scores, threshold, bootstrap=bootstrap, seed=seed),
        },
        "clinical": clinical_metrics(images, large_cm2=large_cm2),
        "bootstrap": {"resamples": bootstrap, "seed": seed, "interval": "percentile, 95%"},
    }
    return doc

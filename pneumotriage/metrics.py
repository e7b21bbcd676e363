"""Metrics: the SIIM-ACR competition Dice, ROC AUC, binary operating-point figures, fixed-sensitivity and
fixed-specificity points and bootstrap intervals. Vectorised numpy; the ROC and PR curves come from scikit-learn."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata


def dice_from_counts(inter: Any, pred_area: Any, true_area: Any) -> np.ndarray:
    """Dice from pixel counts (any broadcastable shapes): ``2 |P & T| / (|P| + |T|)``, and 1.0 where both masks
    are empty (the competition rule)."""
    inter = np.asarray(inter, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1.0))


def iou_from_counts(inter: Any, pred_area: Any, true_area: Any) -> np.ndarray:
    """Intersection over union from pixel counts, 1.0 where both masks are empty (as for Dice)."""
    inter = np.asarray(inter, dtype=np.float64)
    union = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64) - inter
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1.0))


def dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice of each image of two ``(N, H, W)`` boolean stacks; 1.0 where both masks are empty (competition rule)."""
    pred = np.asarray(pred, dtype=bool).reshape(len(pred), -1)
    true = np.asarray(true, dtype=bool).reshape(len(true), -1)
    if pred.shape != true.shape:
        raise ValueError(f"mask stacks differ in shape: {pred.shape} vs {true.shape}")
    inter = np.count_nonzero(pred & true, axis=1)
    return dice_from_counts(inter, np.count_nonzero(pred, axis=1), np.count_nonzero(true, axis=1))


def competition_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over images of Dice, Dice = 1 when both masks are empty: the SIIM-ACR leaderboard score."""
    return float(dice_per_image(pred, true).mean()) if len(pred) else float("nan")


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing ranks); NaN if one class is absent."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and the usual ratios at ``score >= threshold``; a ratio with a zero denominator is NaN."""
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(scores) >= threshold
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    fn, tn = int((~p & y).sum()), int((~p & ~y).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises sensitivity + specificity - 1 (ties: the highest such threshold)."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return 0.5
    candidates = np.unique(s)
    # sensitivity at threshold t: share of positives with score >= t; specificity: share of negatives below t
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
    spec = np.searchsorted(neg, candidates, side="left") / len(neg)
    j = sens + spec - 1.0
    best = np.flatnonzero(j == j.max())[-1]
    return float(candidates[best])


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, starting from (0, 0) at threshold +inf:
    what ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` returns (tests check it), without its
    per-call validation, which dominated the bootstrap (about 1 ms a call)."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]]


def sensitivity_at_specificity(y_true: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, float]:
    """(sensitivity, threshold) of the most sensitive threshold whose specificity is at least ``target``
    (``score >= threshold`` is positive). (NaN, NaN) if a class is absent; sensitivity 0 at threshold +inf where
    no threshold reaches the specificity."""
    y = np.asarray(y_true, dtype=bool)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_points(y, scores)
    ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # never empty: the curve starts at fpr 0
    best = ok[np.argmax(tpr[ok])]
    return float(tpr[best]), float(thr[best])


def specificity_at_sensitivity(y_true: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, float]:
    """(specificity, threshold) of the most specific threshold whose sensitivity is at least ``target``.
    (NaN, NaN) if a class is absent."""
    y = np.asarray(y_true, dtype=bool)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_points(y, scores)
    ok = np.flatnonzero(tpr >= target - 1e-12)  # never empty: the curve ends at tpr 1
    best = ok[np.argmin(fpr[ok])]
    return float(1.0 - fpr[best]), float(thr[best])


def pr_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision, ``sum (R_k - R_k-1) P_k`` over the distinct
    thresholds (scikit-learn's ``average_precision_score``; tests check it). NaN without positives."""
    y = np.asarray(y_true, dtype=bool)
    if not y.any():
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_for_sensitivity(y_true: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold at which at least ``target`` of the positives score ``>=`` it."""
    pos = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(y_true, dtype=bool)])
    if not len(pos):
        raise ValueError("no positive image: a sensitivity cannot be set")
    # with k = floor((1 - target) n) positives allowed below the threshold, the threshold is the (k+1)-th lowest
    k = int(np.floor((1.0 - target) * len(pos) + 1e-9))
    return float(pos[min(k, len(pos) - 1)])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], Any], n: int, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[Any, Any]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``resamples`` draws of ``n`` indices with
    replacement (seeded). The statistic may return one number or a vector (one interval per entry, the same
    draws for all). Draws where a figure is undefined (NaN) are left out of its interval; NaN if all are."""
    if n == 0 or resamples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64)
    tail = (1.0 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives NaN, which is the answer
        lo, hi = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


def exact_ci(successes: int, trials: int, level: float = 0.95) -> tuple[float, float] | None:
    """The Clopper-Pearson ("exact") interval of a proportion, as diagnostic-accuracy studies report
    sensitivity and specificity; None for no trials."""
    from scipy.stats import beta

    if trials <= 0:
        return None
    tail = (1.0 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def calibration_bins(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """The reliability diagram's numbers over ``bins`` equal-width probability bins, and the expected calibration
    error: the images' share in each bin times |share positive - mean probability|, summed (Guo et al. 2017)."""
    y = np.asarray(y_true, dtype=bool)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    which = np.minimum((s * bins).astype(np.int64), bins - 1)  # a probability of 1.0 falls in the last bin
    count = np.bincount(which, minlength=bins)
    mean = np.bincount(which, weights=s, minlength=bins).astype(np.float64)
    positive = np.bincount(which, weights=y.astype(np.float64), minlength=bins).astype(np.float64)
    filled = count > 0
    mean[filled] /= count[filled]
    positive[filled] /= count[filled]
    ece = float(np.sum(count[filled] / max(len(s), 1) * np.abs(positive[filled] - mean[filled]))) if len(s) else None
    return {
        "bins": bins,
        "ece": ece,
        "count": count.tolist(),
        "mean_probability": [float(m) if f else None for m, f in zip(mean, filled, strict=True)],
        "share_positive": [float(p) if f else None for p, f in zip(positive, filled, strict=True)],
    }

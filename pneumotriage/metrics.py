"""Metrics: the SIIM-ACR competition Dice, ROC AUC and binary operating-point figures. Vectorised numpy."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def dice_per_image(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Dice of each image of two ``(N, H, W)`` boolean stacks; 1.0 where both masks are empty (competition rule)."""
    pred = np.asarray(pred, dtype=bool).reshape(len(pred), -1)
    true = np.asarray(true, dtype=bool).reshape(len(true), -1)
    if pred.shape != true.shape:
        raise ValueError(f"mask stacks differ in shape: {pred.shape} vs {true.shape}")
    inter = np.count_nonzero(pred & true, axis=1)
    total = np.count_nonzero(pred, axis=1) + np.count_nonzero(true, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))
    return dice.astype(np.float64)


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

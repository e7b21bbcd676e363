"""The review threshold: from which classifier probability an image with nothing outlined goes to a person."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The review specificity `tune` aims at unless told: nine in ten negatives with nothing outlined stay routine.
#: (The demo study's negatives, 12, then have at most 2 in review: test_demo checks it.)
DEFAULT_REVIEW_SPECIFICITY = 0.9
#: The specificities `tune` reports the review threshold's figures at, beside the chosen one.
REVIEW_TABLE = (0.5, 0.8, 0.9, 0.95, 0.99)


def review_figures(y: np.ndarray, outlined: np.ndarray, p: np.ndarray, review: float) -> dict[str, Any]:
    """The triage at a review threshold: an outlined image is urgent, one with nothing outlined is review when its
    probability ``p`` reaches ``review``, else routine. Sensitivity: the positives urgent or review; specificity:
    the negatives routine; review share: the images in review."""
    y, outlined = np.asarray(y, dtype=bool), np.asarray(outlined, dtype=bool)
    review_tier = ~outlined & (np.asarray(p) >= review)
    flagged = outlined | review_tier
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "review": float(review),
        "sensitivity": float(flagged[y].mean()) if n_pos else None,
        "specificity": float((~flagged[~y]).mean()) if n_neg else None,
        "review_share": float(review_tier.mean()) if len(y) else 0.0,
        "urgent": int(outlined.sum()),
        "in_review": int(review_tier.sum()),
        "negatives_in_review": int((review_tier & ~y).sum()),
        "positives_routine": int((~flagged & y).sum()),
        "n_images": int(len(y)),
        "n_positive": n_pos,
    }


def _shortest_above(lo: float, hi: float) -> float:
    """The number with the fewest decimals (up to 6) in (lo, hi]: a threshold that reads the same everywhere."""
    for d in range(1, 7):
        scale = 10.0**d
        c = (math.floor(lo * scale) + 1) / scale
        if lo < c <= hi:
            return c
    return hi


def review_threshold(
    y: np.ndarray, outlined: np.ndarray, p: np.ndarray, *, specificity: float | None = None, share: float | None = None
) -> tuple[float, str | None]:
    """The lowest review threshold (so the most positives the segmenter missed still reach a person) at which at
    least ``specificity`` of the negatives stay routine, or at most ``share`` of the images go to review. Returns
    it and a note where the target cannot be met (negatives the segmenter outlined are never routine)."""
    y, outlined, p = np.asarray(y, dtype=bool), np.asarray(outlined, dtype=bool), np.asarray(p, dtype=np.float64)
    free = np.sort(p[~outlined])  # the images the review threshold decides, ascending
    note = None
    if share is not None:
        allowed = math.floor(share * len(y) + 1e-9)  # images that may go to review
        if allowed >= len(free):
            return 0.0, None
        lo = float(free[len(free) - allowed - 1])  # the highest probability that must stay routine
    else:
        target = DEFAULT_REVIEW_SPECIFICITY if specificity is None else specificity
        negatives = np.sort(p[~outlined & ~y])
        need = math.ceil(target * int((~y).sum()) - 1e-9)  # negatives that must stay routine
        if need <= 0:
            return 0.0, None
        if need > len(negatives):  # out of reach: every negative left alone is made routine
            note = (
                f"review specificity {target:g} cannot be met: the segmenter outlines "
                f"{int((outlined & ~y).sum())} of the {int((~y).sum())} negatives here; every negative it leaves "
                "alone is routine"
            )
        lo = float(negatives[min(need, len(negatives)) - 1]) if len(negatives) else 0.0
    above = free[free > lo]
    hi = float(above[0]) if len(above) else 1.0
    return _shortest_above(lo, hi), note

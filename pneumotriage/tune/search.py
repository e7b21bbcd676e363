"""Steps 2 and 3: per-image counts taken as the scan post-processes an image, then the grid searched by
arithmetic on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from pneumotriage.labels import RleLabels
from pneumotriage.metrics import binary_metrics, dice_from_counts
from pneumotriage.postprocess import EIGHT_CONNECTED, min_confident, resize_window, scaled_area
from pneumotriage.runtime import Progress, progress_event
from pneumotriage.tune.records import Counts, Grid, Predictions


def count(predictions: Predictions, labels: RleLabels, grid: Grid, progress: Progress | None = None) -> Counts:
    """Per-image counts for every grid value, post-processed as the scan does (see the module docstring)."""
    emit = progress or (lambda event: None)
    tops = torch.tensor(grid.top_score, dtype=torch.float32)
    n, b_n, m_n = len(predictions.image_ids), len(grid.bottom_score), len(grid.min_component)
    true_area = np.zeros(n, dtype=np.int64)
    confident = np.zeros((n, len(tops)), dtype=np.int64)
    area = np.zeros((n, b_n, m_n), dtype=np.int64)
    inter = np.zeros((n, b_n, m_n), dtype=np.int64)
    for i, image_id in enumerate(predictions.image_ids):
        if i % 16 == 0:
            emit(progress_event("counted", done=i, total=n))
        p = torch.from_numpy(np.array(predictions.maps[i], dtype=np.float32))
        confident[i] = (p[None] > tops[:, None, None]).flatten(1).sum(1).numpy()
        rows, cols = (int(v) for v in predictions.shapes[i])
        truth = labels.masks_for(image_id, rows, cols) if labels[image_id] else None
        true_area[i] = np.count_nonzero(truth) if truth is not None else 0
        # The resized map only where the lowest bottom_score can be exceeded: the same values as the scan's.
        window = resize_window(p.numpy(), (rows, cols), min(grid.bottom_score))
        if window is None:
            continue
        h, w = window.values.shape
        if truth is not None:
            truth = truth[window.top : window.top + h, window.left : window.left + w]
        for bi, bottom in enumerate(grid.bottom_score):
            mask = window.values > bottom
            if not mask.any():
                continue
            components, k = ndimage.label(mask, structure=EIGHT_CONNECTED)
            sizes = np.bincount(components.ravel(), minlength=k + 1)
            hits = np.bincount(components[truth], minlength=k + 1) if truth is not None else np.zeros(k + 1, np.int64)
            sizes[0] = hits[0] = 0
            for mi, smallest in enumerate(grid.min_component):
                kept = sizes >= scaled_area(smallest, (rows, cols)) if smallest > 0 else sizes > 0
                area[i, bi, mi] = sizes[kept].sum()
                inter[i, bi, mi] = hits[kept].sum()
    emit(progress_event("counted", done=n, total=n))
    size = tuple(predictions.maps.shape[1:3])
    return Counts(true_area, confident, area, inter, (int(size[0]), int(size[1])))


# --------------------------------------------------------------------------------------------------------------
# 3. search


def scores(counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float]) -> np.ndarray:
    """The competition score of every combination, shape (T, A, G, B, M) over top_score, min_area, gate,
    bottom_score, min_component (G = 1 without a classifier: every image is segmented, as the scan does)."""
    n = len(counts.true_area)
    need = np.array([min_confident(a, counts.model_size) for a in grid.min_area])
    triplet = counts.confident[:, :, None] >= need[None, None, :]  # (N, T, A)
    if classifier is None:
        passed = np.ones((n, 1), dtype=bool)
    else:
        passed = classifier[:, None] >= np.asarray(gates, dtype=np.float32)[None, :]  # (N, G)
    kept = (triplet[:, :, :, None] & passed[:, None, None, :]).reshape(n, -1).astype(np.float64)
    d_empty = (counts.true_area == 0).astype(np.float64)
    d_kept = dice_from_counts(counts.inter, counts.area, counts.true_area[:, None, None])  # (N, B, M)
    gain = (d_kept - d_empty[:, None, None]).reshape(n, -1)
    table: np.ndarray = d_empty.mean() + kept.T @ gain / n
    t_n, a_n, g_n = triplet.shape[1], triplet.shape[2], passed.shape[1]
    return table.reshape(t_n, a_n, g_n, len(grid.bottom_score), len(grid.min_component))


def setting_at(grid: Grid, gates: Sequence[float], index: tuple[int, ...]) -> dict[str, float]:
    t, a, g, b, m = index
    return {
        "gate": float(gates[g]),
        "top_score": float(grid.top_score[t]),
        "min_area": float(grid.min_area[a]),
        "bottom_score": float(grid.bottom_score[b]),
        "min_component": float(grid.min_component[m]),
    }


def index_of(grid: Grid, gates: Sequence[float], setting: dict[str, float]) -> tuple[int, ...]:
    return (
        list(grid.top_score).index(setting["top_score"]),
        list(grid.min_area).index(setting["min_area"]),
        list(gates).index(setting["gate"]),
        list(grid.bottom_score).index(setting["bottom_score"]),
        list(grid.min_component).index(setting["min_component"]),
    )


def outlined_at(
    counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float], index: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Each tuning image's mask area and overlap with its label at one setting (0 where nothing is outlined)."""
    t, a, g, b, m = index
    need = min_confident(grid.min_area[a], counts.model_size)
    kept = counts.confident[:, t] >= need
    if classifier is not None:
        kept &= classifier >= gates[g]
    return np.where(kept, counts.area[:, b, m], 0), np.where(kept, counts.inter[:, b, m], 0)


def figures_at(
    counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float], index: tuple[int, ...]
) -> dict[str, Any]:
    """The scan's figures on the tuning images at one setting: competition score, Dice on positives, and the
    image-level decision "a mask was drawn" against the labels."""
    area, inter = outlined_at(counts, grid, classifier, gates, index)
    dice = dice_from_counts(inter, area, counts.true_area)
    y = counts.true_area > 0
    decision = binary_metrics(y, (area > 0).astype(float), 0.5)
    return {
        "competition_dice": float(dice.mean()),
        "dice_positive_mean": float(dice[y].mean()) if y.any() else None,
        "sensitivity": decision["recall"],
        "specificity": decision["specificity"],
        "n_images": int(len(y)),
        "n_positive": int(y.sum()),
    }

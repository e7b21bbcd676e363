"""What the steps of tuning share: the grid searched, the models' predictions, the per-image counts, the result."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pneumotriage.postprocess import Thresholds

PARAMETERS = Thresholds.NAMES
CACHE_VERSION = 2  # 2: inputs smaller than the display copy decoded as training decodes them


@dataclass(frozen=True)
class Grid:
    """The values tried for each threshold (``min_area`` and ``min_component`` in pixels at 1024²). The gate's
    grid is used only with a classifier; the input checkpoint's own values are always added."""

    top_score: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    min_area: tuple[float, ...] = (0.0, 250.0, 500.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0)
    bottom_score: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
    min_component: tuple[float, ...] = (0.0, 250.0, 500.0, 1000.0, 2000.0)
    gate: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(0, 20))

    def with_values(self, current: dict[str, float]) -> Grid:
        """This grid with ``current`` (the checkpoint's thresholds) added to each axis, each axis sorted."""
        return replace(
            self,
            **{k: tuple(sorted({*getattr(self, k), float(current[k])})) for k in PARAMETERS if k in current},
        )


@dataclass
class Predictions:
    """The models' outputs over the tuning images, in one order."""

    image_ids: list[str]
    shapes: np.ndarray  # (N, 2) rows, columns of each source image
    maps: np.ndarray  # (N, S, S) float32 segmenter probabilities at its input size
    classifier: np.ndarray | None  # (N,) classifier probabilities
    unreadable: list[str] = field(default_factory=list)


@dataclass
class Counts:
    """What the search needs, per image (see the module docstring)."""

    true_area: np.ndarray  # (N,)
    confident: np.ndarray  # (N, T) pixels above each top_score, at the model's size
    area: np.ndarray  # (N, B, M) predicted area per bottom_score and min_component
    inter: np.ndarray  # (N, B, M) overlap with the label
    model_size: tuple[int, int]


@dataclass
class TuneResult:
    thresholds: dict[str, float]
    defaults: dict[str, float]
    score: float
    default_score: float
    #: The best settings, best first: dicts of the five thresholds and ``competition_dice``.
    top: list[dict[str, float]]
    figures: dict[str, Any]
    out: Path
    cache: Path | None
    notes: list[str] = field(default_factory=list)
    #: The review threshold chosen (None without a classifier): its target, its figures here
    #: (:func:`review_figures`) and the same figures at the specificities of :data:`REVIEW_TABLE`.
    review: dict[str, Any] | None = None

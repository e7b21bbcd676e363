"""From probability maps to masks: the SIIM-ACR winners' triplet rule and small-component removal.

Training's validation, the scan and ``tune`` all decide "is this image positive" through :func:`triplet_keep`, so
the figures each reports describe the same rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

#: The image area the triplet's ``min_area`` is stated for (SIIM-ACR images are 1024 x 1024).
REFERENCE_AREA = 1024 * 1024
#: 8-connectivity, the structure every component count here uses.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def scaled_area(area: float, shape: tuple[int, ...]) -> float:
    """A pixel count stated at 1024 x 1024, scaled to an image of ``shape`` (rows, columns)."""
    return area * shape[0] * shape[1] / REFERENCE_AREA


def min_confident(min_area: float, shape: tuple[int, ...]) -> float:
    """How many pixels above ``top_score`` make an image of ``shape`` positive: ``min_area`` (stated at 1024²)
    scaled to the image, and at least one."""
    return max(scaled_area(min_area, shape), 1.0)


def triplet_keep(probs: Any, *, top_score: float, min_area: float, scale_area: bool = True) -> Any:
    """Which images of an ``(N, H, W)`` numpy array or torch tensor of probabilities the triplet rule calls
    positive: at least :func:`min_confident` pixels above ``top_score``. Returns an (N,) bool array/tensor."""
    need = min_confident(min_area, tuple(probs.shape[-2:])) if scale_area else max(min_area, 1.0)
    return (probs > top_score).reshape(probs.shape[0], -1).sum(1) >= need


def triplet(
    probs: np.ndarray, *, top_score: float, min_area: float, bottom_score: float, scale_area: bool = True
) -> np.ndarray:
    """Masks from ``(N, H, W)`` (or ``(H, W)``) probabilities: an image is positive only if at least ``min_area``
    pixels exceed ``top_score``; a positive image's mask is then the pixels above ``bottom_score``.

    ``min_area`` is in pixels at 1024 x 1024 and, with ``scale_area``, scales with the image area.
    """
    p = np.asarray(probs)
    single = p.ndim == 2
    if single:
        p = p[None]
    keep = triplet_keep(p, top_score=top_score, min_area=min_area, scale_area=scale_area)
    masks = np.asarray((p > bottom_score) & keep[:, None, None], dtype=bool)
    return masks[0] if single else masks


def remove_small_components(mask: np.ndarray, min_size: float) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_size`` pixels from one ``(H, W)`` mask."""
    if min_size <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return np.asarray(keep[labels], dtype=bool)

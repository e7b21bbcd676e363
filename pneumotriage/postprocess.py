"""From probability maps to masks: the SIIM-ACR winners' triplet rule and small-component removal."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The image area the triplet's ``min_area`` is stated for (SIIM-ACR images are 1024 x 1024).
REFERENCE_AREA = 1024 * 1024


def scaled_area(area: float, shape: tuple[int, int]) -> float:
    """A pixel count stated at 1024 x 1024, scaled to an image of ``shape``."""
    return area * shape[0] * shape[1] / REFERENCE_AREA


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
    area = scaled_area(min_area, (p.shape[1], p.shape[2])) if scale_area else min_area
    confident = np.count_nonzero(p.reshape(len(p), -1) > top_score, axis=1)
    keep = confident >= max(area, 1.0) if min_area > 0 else confident > 0
    masks = np.asarray((p > bottom_score) & keep[:, None, None], dtype=bool)
    return masks[0] if single else masks


def remove_small_components(mask: np.ndarray, min_size: float) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_size`` pixels from one ``(H, W)`` mask."""
    if min_size <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return np.asarray(keep[labels], dtype=bool)

"""From probability maps to masks: the SIIM-ACR winners' triplet rule and small-component removal.

Training's validation, the scan and ``tune`` all decide "is this image positive" through :func:`triplet_keep`, so
the figures each reports describe the same rule.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    """The cascade's three decisions, as a scan applies them:

    - the classifier ``gate``: segment an image whose probability reaches it (tuned for sensitivity, so low);
    - the triplet rule, which outlines: an image is positive when at least ``min_area`` pixels, stated at
      1024 x 1024, exceed ``top_score``; its mask is then the pixels above ``bottom_score``; mask components under
      ``min_component`` pixels (at 1024 x 1024) are dropped;
    - ``review``: an image with no outline goes to a person when its probability reaches it (tuned for a
      specificity, so that most negatives stay routine). Left unset (a checkpoint from before it existed) it is
      the gate, the one number both decisions were then.

    The defaults are the SIIM-ACR winners' triplet and a gate of 0.5; checkpoints store the ones chosen on
    validation data as a plain table of names."""

    gate: float = 0.5
    top_score: float = 0.75
    min_area: float = 2000.0
    bottom_score: float = 0.3
    min_component: float = 0.0
    review: float | None = None

    #: The numbers `tune` searches on a grid (``review`` is chosen after them, for a specificity).
    NAMES: ClassVar[tuple[str, ...]] = ("gate", "top_score", "min_area", "bottom_score", "min_component")
    #: Every number a scan applies.
    ALL: ClassVar[tuple[str, ...]] = (*NAMES, "review")

    def __post_init__(self) -> None:
        if self.review is None:
            object.__setattr__(self, "review", self.gate)

    @property
    def review_at(self) -> float:
        """``review`` as a float (never None once made)."""
        return float(self.review if self.review is not None else self.gate)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Thresholds:
        """From a table of names (a checkpoint's, a scan journal's); names it lacks keep their defaults (a missing
        ``review`` is the gate)."""
        return cls(**{k: float(values[k]) for k in cls.ALL if values.get(k) is not None})

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def shown(value: float) -> str:
    """A threshold as every output writes it (console, report, legend, tune): ``:g``, which shows the values
    `tune` chooses (at most 6 decimals) exactly, so one number never reads as 0.020, 0.0196 and 0.01958."""
    return f"{value:g}"


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
    from scipy import ndimage  # here: importing it took ~0.19 s of every scan's start, an outline or none

    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return np.asarray(keep[labels], dtype=bool)


# --------------------------------------------------------------------------------------------------------------
# Back to the image's own size, only where a mask can be


@functools.lru_cache(maxsize=64)
def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` defines it: for each output index, its two source indices and the second's weight."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    first = np.minimum(src.astype(np.int64), n_in - 1)
    second = np.minimum(first + 1, n_in - 1)
    return first, second, (src - first).astype(np.float32)


@dataclass(frozen=True)
class Window:
    """Where in an image of ``shape`` a resized map can exceed a threshold: rows ``top:bottom``, columns
    ``left:right``, and the resized values there."""

    top: int
    left: int
    values: np.ndarray
    shape: tuple[int, int]


def resize_window(probs: np.ndarray, shape: tuple[int, int], above: float) -> Window | None:
    """The (H, W) map ``probs`` resized bilinearly to ``shape``, computed only over the window that can hold
    values above ``above`` (None when none can).

    A bilinear value is a weighted mean of at most four source values, so it can exceed ``above`` only next to a
    source value that does: the window is the part of the image sampled from the source rows and columns that
    hold one. Each pixel's value depends only on its own position, never on the window, so a window holds the
    same values as the whole image resized (:func:`resize_full`), and the scan and ``tune`` agree exactly."""
    p = np.asarray(probs, dtype=np.float32)
    hot = p > above
    if not hot.any():
        return None
    rows_hot, cols_hot = np.flatnonzero(hot.any(1)), np.flatnonzero(hot.any(0))
    y0, y1, ly = _bilinear_axis(p.shape[0], shape[0])
    x0, x1, lx = _bilinear_axis(p.shape[1], shape[1])
    top = int(np.searchsorted(y1, rows_hot[0], "left"))
    bottom = int(np.searchsorted(y0, rows_hot[-1], "right"))
    left = int(np.searchsorted(x1, cols_hot[0], "left"))
    right = int(np.searchsorted(x0, cols_hot[-1], "right"))
    return Window(
        top, left, _resample(p, y0[top:bottom], y1[top:bottom], ly[top:bottom], x0, x1, lx, left, right), shape
    )


def resize_full(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The whole map resized to ``shape``, with the same arithmetic as :func:`resize_window`."""
    p = np.asarray(probs, dtype=np.float32)
    y0, y1, ly = _bilinear_axis(p.shape[0], shape[0])
    x0, x1, lx = _bilinear_axis(p.shape[1], shape[1])
    return _resample(p, y0, y1, ly, x0, x1, lx, 0, shape[1])


def _resample(
    p: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    ly: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    lx: np.ndarray,
    left: int,
    right: int,
) -> np.ndarray:
    # Along the columns first, for the source rows the window needs; then along the rows.
    needed = np.unique(np.concatenate((y0, y1)))
    src = p[needed]
    wx = lx[left:right]
    across = src[:, x0[left:right]] * (np.float32(1) - wx) + src[:, x1[left:right]] * wx
    at = np.searchsorted(needed, y0), np.searchsorted(needed, y1)
    wy = ly[:, None]
    out: np.ndarray = across[at[0]] * (np.float32(1) - wy) + across[at[1]] * wy
    return out


@dataclass(frozen=True)
class Outline:
    """A post-processed mask at the image's own size, held as its bounding window: ``mask`` covers rows
    ``top:top+h`` and columns ``left:left+w`` of an image of ``shape``; everything outside it is empty."""

    top: int
    left: int
    mask: np.ndarray
    shape: tuple[int, int]

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def full(self) -> np.ndarray:
        """The mask as a whole (rows, columns) boolean image."""
        out = np.zeros(self.shape, dtype=bool)
        h, w = self.mask.shape
        out[self.top : self.top + h, self.left : self.left + w] = self.mask
        return out


def outline(
    probs: np.ndarray,
    shape: tuple[int, int],
    *,
    top_score: float,
    min_area: float,
    bottom_score: float,
    min_component: float,
) -> Outline | None:
    """The cascade's post-processing of one (S, S) probability map for an image of ``shape``: the triplet rule at
    the model's size, then the map resized to the image, thresholded at ``bottom_score``, and 8-connected
    components smaller than ``min_component`` (px at 1024²) dropped. None when nothing is left."""
    p = np.asarray(probs, dtype=np.float32)
    if np.count_nonzero(p > top_score) < min_confident(min_area, p.shape):  # triplet_keep, for one map
        return None
    window = resize_window(p, shape, bottom_score)
    if window is None:
        return None
    mask = remove_small_components(window.values > bottom_score, scaled_area(min_component, shape))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Outline(window.top + int(rows[0]), window.left + int(cols[0]), crop, shape)

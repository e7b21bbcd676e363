"""Stage 7, finish (in a worker process): post-process one image, encode and write its files, and return its row.

Only an outlined image gets more than a mask file: its overlay and thumbnail. Everything is computed inside
the outline's bounding window (:func:`pneumotriage.postprocess.outline`) and the mask PNG is written in time
proportional to that window (:mod:`pneumotriage.scan.png`), so finishing costs far less than decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumotriage.io import atomic_write_bytes
from pneumotriage.postprocess import Outline, outline
from pneumotriage.rle import EMPTY, rle_encode
from pneumotriage.scan.png import mask_png
from pneumotriage.scan.records import ImageResult


@dataclass(frozen=True)
class FinishJob:
    """What the finisher needs for one image, besides its probability map and display copy (in its slot)."""

    name: str
    identity: dict[str, Any]
    shape: tuple[int, int]
    display_shape: tuple[int, int]
    spacing: tuple[float, float] | None
    probability: float | None
    segmented: bool
    thresholds: dict[str, float]
    overlays: bool
    out: Path


def patient_side(mask: np.ndarray, left: int = 0, width: int | None = None) -> str | None:
    """The patient's side of a frontal radiograph's mask: the image's left half is the patient's right.
    ``mask`` may be a window whose first column is column ``left`` of an image ``width`` columns wide."""
    if not mask.any():
        return None
    width = mask.shape[1] if width is None else width
    half = width // 2 - left  # the window's first column on the image's right half
    half = min(max(half, 0), mask.shape[1])
    on_image_left = int(np.count_nonzero(mask[:, :half]))
    on_image_right = int(np.count_nonzero(mask[:, half:]))
    total = on_image_left + on_image_right
    if min(on_image_left, on_image_right) >= 0.2 * total:
        return "both"
    return "right" if on_image_left > on_image_right else "left"


def overlay(display: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The radiograph (uint8 grey) with ``mask`` (same size) tinted and outlined in red, as RGB."""
    from scipy import ndimage

    rgb = np.repeat(display[:, :, None], 3, axis=2)
    if not mask.any():
        return rgb
    outline_px = mask & ~ndimage.binary_erosion(mask, iterations=2)
    fill = mask & ~outline_px
    rgb[fill] = (0.7 * rgb[fill] + 0.3 * np.array([255, 60, 60])).astype(np.uint8)
    rgb[outline_px] = (255, 40, 40)
    return rgb


def _shown_mask(found: Outline, display_shape: tuple[int, int]) -> np.ndarray:
    """The outline at the display copy's size: a display pixel is set where the mask covers at least half of the
    image pixels it stands for (nearest source pixel of each display pixel's centre, inside the window)."""
    rows, cols = found.shape
    h, w = display_shape
    ys = ((np.arange(h) + 0.5) * rows / h).astype(np.int64) - found.top
    xs = ((np.arange(w) + 0.5) * cols / w).astype(np.int64) - found.left
    mh, mw = found.mask.shape
    shown = np.zeros(display_shape, dtype=bool)
    ry, rx = np.flatnonzero((ys >= 0) & (ys < mh)), np.flatnonzero((xs >= 0) & (xs < mw))
    if ry.size and rx.size:
        shown[ry[0] : ry[-1] + 1, rx[0] : rx[-1] + 1] = found.mask[np.ix_(ys[ry], xs[rx])]
    return shown


def jpeg(rgb: np.ndarray, *, quality: int, side: int | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(rgb)
    if side is not None:
        image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def finish(job: FinishJob, probs: np.ndarray | None, display: np.ndarray) -> ImageResult:
    """Post-process one image (triplet rule, resize to the source size, small components), write its mask and,
    when outlined, its overlay and thumbnail; return its worklist row."""
    rows, cols = job.shape
    t = job.thresholds
    found = None
    if probs is not None:
        found = outline(
            probs,
            job.shape,
            top_score=t["top_score"],
            min_area=t["min_area"],
            bottom_score=t["bottom_score"],
            min_component=t["min_component"],
        )
    area = found.area if found is not None else 0
    spacing = job.spacing
    result = ImageResult(
        **job.identity,
        status="ok",
        probability=None if job.probability is None else round(job.probability, 6),
        segmented=job.segmented,
        area_px=area if job.segmented else None,
        area_cm2=round(area * spacing[0] * spacing[1] / 100.0, 3) if job.segmented and spacing else None,
        side=(patient_side(found.mask, found.left, cols) if found is not None else None) if job.segmented else None,
        rle=rle_encode(found.full(), relative=True) if found is not None else EMPTY,
        rows=rows,
        columns=cols,
    )
    if found is None:
        png = mask_png(np.zeros((0, 0), dtype=bool), 0, 0, job.shape)
    else:
        png = mask_png(found.mask, found.top, found.left, job.shape)
    atomic_write_bytes(job.out / "masks" / f"{job.name}.png", png, durable=False)
    result.mask_file = f"masks/{job.name}.png"
    if found is not None:
        rgb = overlay(display, _shown_mask(found, job.display_shape))
        if job.overlays:
            atomic_write_bytes(job.out / "overlays" / f"{job.name}.jpg", jpeg(rgb, quality=90), durable=False)
            result.overlay_file = f"overlays/{job.name}.jpg"
        write_thumbnail(job.out, job.name, rgb)
    return result


def thumbnail_path(out: Path, name: str) -> Path:
    return out / ".scan" / "thumbs" / f"{name}.jpg"


def write_thumbnail(out: Path, name: str, rgb: np.ndarray) -> None:
    atomic_write_bytes(thumbnail_path(out, name), jpeg(rgb, quality=80, side=192), durable=False)

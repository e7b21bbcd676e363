"""Stage 7, finish: post-process one image, encode and write its files, and return its row.

A segmented image is finished in a worker process; one that was not segmented has nothing to compute and is
finished where the models run. Only an outlined image gets files: its mask PNG and overlay. Everything is
computed inside the outline's bounding window (:func:`pneumotriage.postprocess.outline`) and the mask PNG is
written in time proportional to that window (:mod:`pneumotriage.scan.png`). Report thumbnails travel back as
bytes; the report writes those of its first rows.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumotriage.io import atomic_write_bytes
from pneumotriage.outlayout import OutLayout, mask_file, overlay_file
from pneumotriage.postprocess import Outline, Thresholds, outline
from pneumotriage.rle import EMPTY, rle_encode
from pneumotriage.scan.png import mask_png
from pneumotriage.scan.records import ImageResult


@dataclass(frozen=True)
class MapWindow:
    """The part of a ``side`` x ``side`` probability map an outline can come from (see
    :class:`pneumotriage.scan.infer.MapWindows`): rows ``top:top+height``, columns ``left:left+width``. The
    slot holds only this part, flat."""

    top: int
    left: int
    height: int
    width: int
    side: int

    def rebuild(self, stored: np.ndarray, into: np.ndarray) -> np.ndarray:
        """The whole map, zeros outside the window, in ``into`` (side x side), from the part ``stored`` flat."""
        into.fill(0.0)
        part = stored[: self.height * self.width].reshape(self.height, self.width)
        into[self.top : self.top + self.height, self.left : self.left + self.width] = part
        return into


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
    thresholds: Thresholds
    overlays: bool
    out: Path
    #: How the image was turned upright for the models (flip left-right, flip up-down; from its
    #: PatientOrientation): its map in the slot is turned back to the stored grid by the same flips, and on an
    #: image stored mirrored (R\\F) the patient's side is the other one.
    flip: tuple[bool, bool] = (False, False)
    #: Where its map can hold an outline (a segmented image without one has nothing to outline).
    window: MapWindow | None = None


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


def overlay(display: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The radiograph (uint8 grey) with ``mask`` (same size) tinted and outlined in red, as an RGB picture. Only
    the mask's bounding box is computed in colour; the rest is the grey image in three channels."""
    from scipy import ndimage

    grey = Image.fromarray(display)
    rgb = Image.merge("RGB", (grey, grey, grey))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return rgb
    # The box with a margin of 3 (erosion reads 2 pixels out), so the edge is the same as over the whole image.
    top, left = max(int(rows[0]) - 3, 0), max(int(cols[0]) - 3, 0)
    box = (slice(top, int(rows[-1]) + 4), slice(left, int(cols[-1]) + 4))
    m = mask[box]
    edge = m & ~ndimage.binary_erosion(m, iterations=2, border_value=0)
    fill = m & ~edge
    part = np.repeat(display[box][:, :, None], 3, axis=2)
    part[fill] = (0.7 * part[fill] + 0.3 * np.array([255, 60, 60])).astype(np.uint8)
    part[edge] = (255, 40, 40)
    rgb.paste(Image.fromarray(part), (left, top))
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


#: Longest side of a report thumbnail.
THUMBNAIL = 192
#: JPEG quality of an overlay, of the same picture without the outline (the report's "outline off"), and of a
#: report thumbnail.
OVERLAY_QUALITY, PLAIN_QUALITY, THUMBNAIL_QUALITY = 90, 85, 80


def jpeg(picture: Image.Image, *, quality: int) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def thumbnail(display: np.ndarray) -> np.ndarray:
    """A grey display copy shrunk to at most :data:`THUMBNAIL` a side by averaging whole blocks of pixels (a box
    filter: several times cheaper than a resampling filter, and as good for a picture this small)."""
    factor = -(-max(display.shape[:2]) // THUMBNAIL)
    if factor <= 1:
        return display
    return np.asarray(Image.fromarray(display).reduce(factor))


#: An outline covering more than this share of the image is implausible (a large pneumothorax fills about a
#: quarter of a chest radiograph; more is a segmenter seeing the whole lung field or the background).
MAX_OUTLINE_SHARE = 0.4
#: An outline running along one image border for more than this share of the border's length is implausible (a
#: pneumothorax lies inside the chest, not along the film's edge: that is a collimation or label artefact).
MAX_BORDER_SHARE = 0.5


def implausible(found: Outline) -> str | None:
    """Why ``found`` is not a plausible pneumothorax outline, or None."""
    rows, cols = found.shape
    share = found.area / float(rows * cols)
    if share > MAX_OUTLINE_SHARE:
        return f"implausible outline — check: it covers {share:.0%} of the image"
    h, w = found.mask.shape
    borders = []
    if found.top == 0:
        borders.append(("top", found.mask[0], cols))
    if found.top + h == rows:
        borders.append(("bottom", found.mask[-1], cols))
    if found.left == 0:
        borders.append(("left", found.mask[:, 0], rows))
    if found.left + w == cols:
        borders.append(("right", found.mask[:, -1], rows))
    for side, line, length in borders:
        along = int(np.count_nonzero(line)) / float(length)
        if along > MAX_BORDER_SHARE:
            return f"implausible outline — check: it runs along {along:.0%} of the image's {side} border"
    return None


def _side(found: Outline | None, cols: int, mirrored: bool) -> str | None:
    side = patient_side(found.mask, found.left, cols) if found is not None else None
    if mirrored and side in ("left", "right"):
        return "right" if side == "left" else "left"
    return side


def _area_cm2(area: int, spacing: tuple[float, float] | None) -> float | None:
    """The area in cm² where the pixel spacing gives a finite one (a header's spacing of 1e200 mm does not)."""
    if not spacing:
        return None
    cm2 = area * spacing[0] * spacing[1] / 100.0
    return round(cm2, 3) if math.isfinite(cm2) else None


def finish(job: FinishJob, probs: np.ndarray | None, display: np.ndarray) -> tuple[ImageResult, bytes | None]:
    """Post-process one image (triplet rule, resize to the source size, small components) and return its worklist
    row and, when outlined without an overlay, its report thumbnail (JPEG bytes; the report keeps those of its
    first rows, and cuts those of outlined images from their overlays). An outlined image gets its mask PNG and
    overlay written; one with nothing outlined gets no file: its empty mask is its run-length code, -1."""
    rows, cols = job.shape
    t = job.thresholds
    found = None
    if probs is not None:
        found = outline(
            probs,
            job.shape,
            top_score=t.top_score,
            min_area=t.min_area,
            bottom_score=t.bottom_score,
            min_component=t.min_component,
        )
    area = found.area if found is not None else 0
    spacing = job.spacing
    result = ImageResult(
        **job.identity,
        status="ok",
        probability=None if job.probability is None else round(job.probability, 6),
        segmented=job.segmented,
        area_px=area if job.segmented else None,
        area_cm2=_area_cm2(area, spacing) if job.segmented else None,
        side=_side(found, cols, job.flip[0]) if job.segmented else None,
        rle=rle_encode(found.mask, origin=(found.top, found.left), shape=found.shape) if found is not None else EMPTY,
        rows=rows,
        columns=cols,
        file_stem=job.name,
        flag=implausible(found) if found is not None else None,
    )
    if found is not None:
        layout = OutLayout(job.out)
        png = mask_png(found.mask, found.top, found.left, job.shape)
        atomic_write_bytes(layout.mask(job.name), png, durable=False)
        result.mask_file = mask_file(job.name)
        if job.overlays:
            shown = overlay(display, _shown_mask(found, job.display_shape))
            atomic_write_bytes(layout.overlay(job.name), jpeg(shown, quality=OVERLAY_QUALITY), durable=False)
            result.overlay_file = overlay_file(job.name)
            # The same picture without the outline, for the report's "outline off" (outlined images only).
            atomic_write_bytes(
                layout.plain_thumbnail(job.name), jpeg(Image.fromarray(display), quality=PLAIN_QUALITY), durable=False
            )
            # Its report thumbnail is cut from the overlay at the end, only if the report shows it.
            return result, None
        # No overlay to cut it from: the thumbnail is drawn at its own size (the grey copy shrunk, the outline
        # sampled there), as thumbnail_task draws it.
        small = thumbnail(display)
        return result, thumbnail_jpeg(overlay(small, _shown_mask(found, (small.shape[0], small.shape[1]))))
    return result, None


def thumbnail_jpeg(picture: Image.Image) -> bytes:
    """A report thumbnail drawn at :data:`THUMBNAIL` size as its file's bytes: every way one is drawn (a grey
    image, an outline drawn at the thumbnail's size, one cut from an overlay or decoded again) ends here."""
    return jpeg(picture, quality=THUMBNAIL_QUALITY)


def grey_thumbnail(display: np.ndarray) -> bytes:
    """A report thumbnail (JPEG) of a display copy with nothing outlined."""
    return thumbnail_jpeg(Image.fromarray(thumbnail(display)))


def write_thumbnail(out: Path, name: str, picture: Image.Image) -> None:
    """Write a report thumbnail drawn at :data:`THUMBNAIL` size (see :func:`workers.thumbnail_task`)."""
    atomic_write_bytes(OutLayout(out).thumbnail(name), thumbnail_jpeg(picture), durable=False)

"""Synthetic chest-radiograph phantoms with and without pneumothorax, written as a SIIM-style study.

The phantom is a density map built from simple anatomy: a soft-tissue body with fall-off towards its edges, two
lungs (apex, lateral border, diaphragm domes), mediastinum and spine, heart, clavicles, posterior and anterior
ribs with bright cortices, branching pulmonary vessels that taper from the hila, and fine parenchymal texture.

A pneumothorax is a peripheral region of one lung (apical, lateral or basal) where lung markings vanish and the
air is slightly more lucent, bounded on the lung side by the thin bright visceral pleural line. Procedural
regions are crescents hugging the chest wall; with ``mask_shapes`` the regions are real SIIM outlines.

Confounders appear in positives and negatives at the same rate, so they carry no label information: skin folds
(a step edge with markings continuing across it) and line-like edges (tubes, the medial scapular border).
Everything is deterministic given the seed.

Why one module of ~720 lines: the phantom's anatomy, pathology and confounders are one generator whose parts
share the same coordinate frame and random streams (golden figures in the tests pin its output); splitting it
would scatter one drawing across files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from pneumotriage.dicom import SYNTHETIC_MARK
from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes, atomic_write_text
from pneumotriage.labels import SIIM_SHAPE, read_rle_csv
from pneumotriage.rle import rle_decode, rle_encode
from pneumotriage.runtime import usable_cores
from pneumotriage.version import __version__

__all__ = ["Phantom", "StudyImage", "StudySummary", "make_phantom", "parse_size", "write_study"]

SITES = ("apex", "lateral", "base")


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body geometry in normalised image coordinates (x across, y down, both 0..1)."""

    cx: float
    body_half_width: float
    gap: float  # half-width of the mediastinum
    lung_width: float
    lung_top: float
    lung_bottom: float
    heart_rx: float
    heart_ry: float
    rib_start: float
    rib_step: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        return cls(
            cx=0.5 + rng.normal(0, 0.012),
            body_half_width=rng.uniform(0.42, 0.49),
            gap=rng.uniform(0.045, 0.07),
            lung_width=rng.uniform(0.28, 0.34),
            lung_top=rng.uniform(0.09, 0.15),
            lung_bottom=rng.uniform(0.80, 0.89),
            heart_rx=rng.uniform(0.12, 0.17),
            heart_ry=rng.uniform(0.11, 0.15),
            rib_start=rng.uniform(0.10, 0.14),
            rib_step=rng.uniform(0.066, 0.078),
        )

    def jitter(self, rng: np.random.Generator) -> Anatomy:
        """The same patient on another day: small changes of position and inspiration."""
        return Anatomy(
            cx=self.cx + rng.normal(0, 0.006),
            body_half_width=self.body_half_width,
            gap=self.gap,
            lung_width=self.lung_width * rng.uniform(0.97, 1.03),
            lung_top=self.lung_top + rng.normal(0, 0.005),
            lung_bottom=self.lung_bottom + rng.normal(0, 0.01),
            heart_rx=self.heart_rx,
            heart_ry=self.heart_ry,
            rib_start=self.rib_start + rng.normal(0, 0.004),
            rib_step=self.rib_step,
        )


@dataclass
class Phantom:
    """One rendered radiograph: ``image`` float32 in [0, 1] (bone bright), ``mask`` the pneumothorax."""

    image: np.ndarray
    mask: np.ndarray
    #: The pneumothorax as separate annotation rows (their union is ``mask``); empty for a negative.
    rows: list[np.ndarray]
    side: str | None  # the patient's side: "right" is on the image's left (PA/AP convention)
    site: str | None
    confounders: list[str] = field(default_factory=list)


def _smoothstep(edge0: float, edge1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _lung_masks(anat: Anatomy, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the image-left (patient right) and image-right (patient left) lungs."""
    h, w = shape
    y = ((np.arange(h) + 0.5) / h)[:, None]
    x = ((np.arange(w) + 0.5) / w)[None, :]
    masks = []
    for s in (-1, 1):
        medial = anat.cx + s * anat.gap
        u = (x - medial) * s / anat.lung_width  # 0 at the mediastinum, 1 at the chest wall
        v = (y - anat.lung_top) / (anat.lung_bottom - anat.lung_top)
        top = 0.32 * ((u - 0.45) / 0.55) ** 2  # rounded apex
        bottom = 0.80 + 0.20 * np.clip(u, 0, 1) ** 2  # diaphragm dome, deepest at the costophrenic angle
        lateral = 0.84 + 0.16 * np.sin(np.pi * np.clip(0.15 + 0.8 * v, 0, 1))  # convex chest wall
        masks.append((u > 0) & (u < lateral) & (v > top) & (v < bottom))
    return masks[0], masks[1]


def _ribs(anat: Anatomy, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    out = np.zeros(shape, dtype=np.float32)
    x = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    thick = 0.016
    for s in (-1, 1):
        medial = anat.cx + s * anat.gap * 0.6
        u = (x - medial) * s / (anat.lung_width + anat.gap)
        inside = (u > -0.05) & (u < 1.12)
        for i in range(10):
            y0 = anat.rib_start + i * anat.rib_step
            # Posterior ribs: arcs convex upwards. Anterior ribs: fainter, descending towards the midline.
            for centre, amp in (
                (y0 - 0.05 * u + 0.22 * u**2 - 0.03, 0.06),
                (y0 + 0.04 + 0.09 * (1 - np.clip(u, 0, 1)) ** 1.5, 0.025),
            ):
                r0 = max(int((centre[inside].min() - 2 * thick) * h), 0) if inside.any() else 0
                r1 = min(int((centre[inside].max() + 2 * thick) * h) + 1, h) if inside.any() else 0
                if r1 <= r0:
                    continue
                d = np.abs(ys[r0:r1, None] - centre[None, :]) / (thick * rng.uniform(0.85, 1.15))
                band = np.clip(1.0 - d, 0.0, 1.0)
                cortex = np.exp(-(((d - 0.85) / 0.18) ** 2))
                out[r0:r1] += (amp * (0.6 * (band > 0) * np.sqrt(band) + 0.5 * cortex) * inside[None, :]).astype(
                    np.float32
                )
    return out


def _vessels(anat: Anatomy, lungs: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Branching vessel trees from each hilum, drawn as points and blurred by calibre."""
    h, w = shape
    unit = math.sqrt(h * w)
    buckets = [
        (0.0, 1.3, 0.6),
        (1.3, 2.6, 1.1),
        (2.6, 5.0, 1.9),
        (5.0, 1e9, 3.0),
    ]  # (min px, max px, sigma px)
    scale = unit / 1024
    flat_idx: list[list[np.ndarray]] = [[] for _ in buckets]
    counts: list[list[int]] = [[] for _ in buckets]
    calibres: list[list[float]] = [[] for _ in buckets]
    # Each image draws thousands of short segments: the loop avoids numpy's per-call overhead (linspace, clip,
    # full) with the same arithmetic, so the pixels are bit-for-bit those np.linspace/np.clip would give.
    ramp = np.arange(max(int(0.07 * unit * 1.2) + 2, 2), dtype=np.float64)
    for s in (-1, 1):
        hilum_x = (anat.cx + s * (anat.gap + 0.05)) * w
        hilum_y = (anat.lung_top + 0.42 * (anat.lung_bottom - anat.lung_top)) * h
        stack = []
        for angle in np.linspace(-1.5, 1.6, 6) + rng.normal(0, 0.1, 6):
            direction = (math.cos(angle) * s, math.sin(angle))
            stack.append((hilum_x, hilum_y, direction, 0.07 * unit * rng.uniform(0.8, 1.2), 11.0 * scale, 0))
        while stack:
            x0, y0, (dx, dy), length, calibre, depth = stack.pop()
            x1, y1 = x0 + dx * length, y0 + dy * length
            n = max(int(length) + 1, 2)
            steps = ramp[:n] if n <= len(ramp) else np.arange(n, dtype=np.float64)
            xs = steps * ((x1 - x0) / (n - 1)) + x0  # np.linspace(x0, x1, n), which also ends exactly on x1
            ys = steps * ((y1 - y0) / (n - 1)) + y0
            xs[-1], ys[-1] = x1, y1
            rr = np.minimum(np.maximum(ys.astype(np.int64), 0), h - 1)
            cc = np.minimum(np.maximum(xs.astype(np.int64), 0), w - 1)
            keep = lungs[rr, cc]
            px = max(calibre, 0.5)
            b = 0 if px < 1.3 else 1 if px < 2.6 else 2 if px < 5.0 else 3
            flat_idx[b].append(rr[keep] * w + cc[keep])
            counts[b].append(int(np.count_nonzero(keep)))
            calibres[b].append(px)
            inside_end = 0 <= int(y1) < h and 0 <= int(x1) < w and lungs[int(y1), int(x1)]
            if depth >= 8 or calibre < 0.3 * scale or not inside_end:
                continue
            base = math.atan2(dy, dx)
            for sign in (-1, 1):
                turn = base + sign * rng.uniform(0.15, 0.5)
                stack.append(
                    (
                        x1,
                        y1,
                        (math.cos(turn), math.sin(turn)),
                        length * rng.uniform(0.7, 0.9),
                        calibre * rng.uniform(0.66, 0.8),
                        depth + 1,
                    )
                )
    weights = [np.repeat(np.asarray(c, dtype=np.float64), k) for c, k in zip(calibres, counts, strict=True)]
    out = np.zeros(shape, dtype=np.float64)
    for b, (_lo, _hi, sigma) in enumerate(buckets):
        if not flat_idx[b]:
            continue
        layer = np.bincount(np.concatenate(flat_idx[b]), weights[b], minlength=h * w)
        sig = max(sigma * scale, 0.5)
        out += ndimage.gaussian_filter(layer.reshape(shape), sig) * sig
    peak = np.percentile(out[lungs], 98) if lungs.any() else 1.0
    return (out / max(peak, 1e-9)).astype(np.float32)


def _procedural_region(
    lung: np.ndarray, anat: Anatomy, side_sign: int, site: str, rng: np.random.Generator, scale: float = 1.0
) -> np.ndarray:
    """A crescent along the chest wall of one lung, thickest at an anchor point on its boundary; ``scale``
    multiplies its thickness and extent."""
    h, w = lung.shape
    depth_px = ndimage.distance_transform_edt(lung)
    rows, cols = np.nonzero(lung)
    u = (cols / w - (anat.cx + side_sign * anat.gap)) * side_sign / anat.lung_width
    v = (rows / h - anat.lung_top) / (anat.lung_bottom - anat.lung_top)
    if site == "apex":
        target = (0.45 + rng.uniform(-0.1, 0.2), 0.0)
    elif site == "lateral":
        target = (1.0, rng.uniform(0.3, 0.65))
    else:
        target = (0.95, rng.uniform(0.75, 0.92))
    boundary = depth_px[rows, cols] <= 1.5
    k = np.argmin((u[boundary] - target[0]) ** 2 + (v[boundary] - target[1]) ** 2)
    ay, ax = rows[boundary][k], cols[boundary][k]
    unit = math.sqrt(h * w)
    thickness = scale * unit * math.exp(rng.uniform(math.log(0.012), math.log(0.09)))
    extent = scale * unit * math.exp(rng.uniform(math.log(0.09), math.log(0.32)))
    yy, xx = np.ogrid[:h, :w]
    dist = np.sqrt((yy - ay) ** 2 + (xx - ax) ** 2)
    taper = np.sqrt(np.clip(1.0 - (dist / extent) ** 2, 0.0, 1.0))
    wobble = ndimage.gaussian_filter(rng.standard_normal(lung.shape), max(unit * 0.02, 1.0))
    wobble /= max(float(np.abs(wobble).max()), 1e-9)
    region = lung & (depth_px < thickness * taper * (1.0 + 0.25 * wobble))
    return np.asarray(region, dtype=bool)


def _disk(radius: int) -> np.ndarray:
    r = max(radius, 1)
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx * xx + yy * yy <= r * r)


def make_phantom(
    shape: tuple[int, int],
    *,
    positive: bool,
    rng: np.random.Generator,
    anatomy: Anatomy | None = None,
    region_rows: Sequence[np.ndarray] | None = None,
    ptx_scale: float = 1.0,
) -> Phantom:
    """Render one phantom. ``region_rows`` (boolean masks of ``shape``) replaces the procedural pneumothorax;
    ``ptx_scale`` makes procedural ones larger (> 1: moderate to large) or smaller."""
    h, w = shape
    anat = anatomy or Anatomy.sample(rng)
    unit = math.sqrt(h * w)
    y = ((np.arange(h) + 0.5) / h)[:, None].astype(np.float32)
    x = ((np.arange(w) + 0.5) / w)[None, :].astype(np.float32)

    # Soft tissue: an elliptic body cross-section, air above the shoulders, denser abdomen below the domes.
    across = np.clip(1.0 - ((x - anat.cx) / anat.body_half_width) ** 2, 0.0, 1.0)
    shoulders = _smoothstep(0.0, 0.06 + 0.5 * (x - anat.cx) ** 2, y)
    density = 0.42 * np.sqrt(across) * shoulders + 0.12 * _smoothstep(0.75, 0.95, y) * (across > 0)
    mediastinum = np.exp(-(((x - anat.cx) / (anat.gap * 1.05)) ** 6))
    density = density + 0.17 * mediastinum + 0.07 * np.exp(-(((x - anat.cx) / (anat.gap * 0.45)) ** 2))
    heart = ((x - anat.cx - 0.055) / anat.heart_rx) ** 2 + ((y - 0.63) / anat.heart_ry) ** 2
    density = density + 0.13 * _smoothstep(1.35, 0.7, heart)
    hila = sum(
        np.exp(-(((x - anat.cx - s * (anat.gap + 0.045)) / 0.03) ** 2 + ((y - 0.45) / 0.06) ** 2)) for s in (-1, 1)
    )
    density = density + 0.05 * hila

    left, right = _lung_masks(anat, shape)
    lungs = left | right
    side_masks = {"right": left, "left": right}  # the patient's right lung is on the image's left

    rows: list[np.ndarray] = []
    side = site = None
    if positive:
        if region_rows:
            rows = [np.asarray(r, dtype=bool) for r in region_rows]
            region = np.logical_or.reduce(rows)
            cols = np.nonzero(region)[1]
            side = "right" if cols.mean() < anat.cx * w else "left"
            site = "real-outline"
        else:
            side = str(rng.choice(["right", "left"]))
            site = str(rng.choice(SITES, p=[0.4, 0.45, 0.15]))
            # Thin crescents can vanish at small sizes: draw again until the region is visible.
            min_area = max(12, int(h * w * 0.0015))
            for _ in range(50):
                region = _procedural_region(side_masks[side], anat, -1 if side == "right" else 1, site, rng, ptx_scale)
                if region.sum() >= min_area:
                    break
            rows = [region]
        lungs = lungs | region
    else:
        region = np.zeros(shape, dtype=bool)

    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), max(unit * 0.004, 0.6))
    density = density - 0.26 * lung_soft
    density = density + _ribs(anat, shape, rng) * (0.6 + 0.4 * lung_soft)
    # Clavicles: two bright bars sloping up laterally across the apices.
    for s in (-1, 1):
        centre = anat.lung_top + 0.02 - 0.12 * np.clip((x - anat.cx) * s - anat.gap, 0, 0.35)
        clav = np.exp(-(((y - centre) / 0.012) ** 2)) * (np.abs(x - anat.cx) > anat.gap * 0.5)
        density = density + 0.09 * clav * (np.abs(x - anat.cx) < anat.body_half_width * 0.85)

    markings = _vessels(anat, lungs & ~region, shape, rng) * rng.uniform(0.10, 0.15)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(unit * 0.004, 0.7))
    texture *= 0.016 / max(float(texture.std()), 1e-9)
    parenchyma = (markings + texture) * lung_soft

    confounders: list[str] = []
    if positive:
        lucent = ndimage.gaussian_filter(region.astype(np.float32), max(unit * 0.002, 0.5))
        parenchyma = parenchyma * (1.0 - 0.9 * lucent)
        density = density - rng.uniform(0.03, 0.06) * lucent
        # The visceral pleural line: region pixels within a line width of the remaining (collapsed) lung.
        line_px = max(int(round(unit * 0.0018)), 1)
        pleura = region & ndimage.binary_dilation(lungs & ~region, structure=_disk(line_px))
        line = ndimage.gaussian_filter(pleura.astype(np.float32), max(unit * 0.0012, 0.5))
        line /= max(float(line.max()), 1e-9)
        density = density + rng.uniform(0.05, 0.10) * line
    density = density + parenchyma

    # Confounders, independent of the label.
    if rng.random() < 0.4:
        confounders.append("skin-fold")
        s = rng.choice([-1, 1])
        xc = anat.cx + s * (anat.gap + anat.lung_width * rng.uniform(0.75, 1.05))
        curve = xc + 0.05 * np.sin((y - rng.uniform(0, 1)) * rng.uniform(2, 5))
        step = _smoothstep(-0.002, 0.004, (x - curve) * s)
        vertical = _smoothstep(0.15, 0.3, y) * _smoothstep(0.95, 0.8, y)
        density = density + rng.uniform(0.025, 0.05) * (1 - step) * vertical * lungs
    if rng.random() < 0.4:
        confounders.append("line")
        # A thin bright line (tube, scapular border) with lung markings continuing on both sides.
        s = rng.choice([-1, 1])
        x0 = anat.cx + s * (anat.gap + anat.lung_width * rng.uniform(0.55, 0.95))
        slope = rng.uniform(-0.25, 0.25)
        d = np.abs(x - (x0 + slope * (y - 0.5))) * unit
        width = max(unit * 0.0015, 0.6)
        density = density + rng.uniform(0.05, 0.09) * np.exp(-((d / width) ** 2)) * _smoothstep(0.12, 0.25, y)

    density = ndimage.gaussian_filter(density, max(unit * 0.0008, 0.4))
    gain, offset, gamma = rng.uniform(1.05, 1.25), rng.normal(0.16, 0.03), rng.uniform(0.85, 1.2)
    image = np.clip(density * gain + offset, 0.0, 1.0) ** gamma
    image = image + rng.normal(0.0, rng.uniform(0.004, 0.010), shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    mask = np.logical_or.reduce(rows) if rows else np.zeros(shape, dtype=bool)
    return Phantom(image=image, mask=mask, rows=rows, side=side, site=site, confounders=confounders)


# --------------------------------------------------------------------------------------------------------------
# Writing a study


@dataclass(frozen=True)
class StudyImage:
    image_id: str
    path: str  # relative to the study folder
    patient_id: str
    positive: bool
    side: str | None
    site: str | None
    mask_area: int
    confounders: list[str]


@dataclass
class StudySummary:
    out: Path
    labels_csv: Path
    images: list[StudyImage]

    @property
    def n_positive(self) -> int:
        return sum(i.positive for i in self.images)


def _patient_id(seed: int, index: int) -> str:
    """A UUID-shaped patient id, as SIIM's anonymised ids are, derived from the seed."""
    digest = hashlib.sha256(f"pneumotriage-synth:{seed}:{index}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def parse_size(text: str | int) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"880x1024"`` -> 880 rows by 1024 columns."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"size {text!r} is not N or ROWSxCOLS", hint="e.g. --size 1024 or --size 880x1024") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32 or max(values) > 8192:
        raise UsageError(f"size {text!r} must be N or ROWSxCOLS between 32 and 8192", hint="e.g. --size 256")
    return values[0], values[1]


#: Where the thorax sits in a typical SIIM image (normalised y0, y1, x0, x1): real outlines are mapped from this
#: box onto the phantom's own lungs, then clipped to them, so a real shape lands where a pneumothorax can be.
_SIIM_THORAX = (0.10, 0.86, 0.10, 0.90)


def _sample_shapes(
    path: Path,
) -> tuple[list[str], Callable[[str, Anatomy, tuple[int, int]], list[np.ndarray]]]:
    labels = read_rle_csv(path)
    positives = sorted(i for i, rows in labels.items() if rows)
    if not positives:
        raise UsageError(f"{path} holds no positive mask", hint="give a label file with pneumothorax outlines")

    def rows_for(image_id: str, anat: Anatomy, shape: tuple[int, int]) -> list[np.ndarray]:
        h, w = shape
        y0, y1 = anat.lung_top, anat.lung_bottom
        x0, x1 = anat.cx - anat.gap - anat.lung_width, anat.cx + anat.gap + anat.lung_width
        sy0, sy1, sx0, sx1 = _SIIM_THORAX
        yn = (np.arange(h) + 0.5) / h
        xn = (np.arange(w) + 0.5) / w
        # Nearest-neighbour, pointwise sampling: the OR of the mapped rows equals the mapped union, so the CSV
        # rows and the mask stay consistent.
        ri = np.clip((sy0 + (yn - y0) / (y1 - y0) * (sy1 - sy0)) * SIIM_SHAPE[0], 0, SIIM_SHAPE[0] - 1)
        ci = np.clip((sx0 + (xn - x0) / (x1 - x0) * (sx1 - sx0)) * SIIM_SHAPE[1], 0, SIIM_SHAPE[1] - 1)
        left, right = _lung_masks(anat, shape)
        lungs = left | right
        grid = np.ix_(ri.astype(np.int64), ci.astype(np.int64))
        mapped = (rle_decode(r, *SIIM_SHAPE, relative=labels.relative)[grid] & lungs for r in labels[image_id])
        return [m for m in mapped if m.sum() >= 4]

    return positives, rows_for


def _dataset(
    pixels: np.ndarray,
    *,
    photometric: str,
    bits: int,
    uids: dict[str, str],
    patient: dict[str, str],
    spacing: float,
    study_day: date,
    index: int,
    view: str,
) -> Dataset:
    h, w = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(uids["sop"])
    meta.ImplementationVersionName = f"PNEUMOTRIAGE_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyDate = study_day.strftime("%Y%m%d")
    ds.StudyTime = f"{(index * 7) % 24:02d}{(index * 13) % 60:02d}00"
    ds.AccessionNumber = f"SYN{int(uids['sop'].split('.')[-1]) % 10**9:09d}"
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.InstitutionName = "pneumotriage synthetic phantom"
    ds.SeriesDescription = f"view: {view}"
    ds.ImageComments = SYNTHETIC_MARK  # what training reads: a model trained on these is never clinical
    ds.PatientName = patient["id"]
    ds.PatientID = patient["id"]
    ds.PatientSex = patient["sex"]
    ds.PatientAge = patient["age"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = h, w
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    top = (1 << bits) - 1
    stored = np.rint(pixels * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits == 8:
        buf = io.BytesIO()
        Image.fromarray(stored.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=92)
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated = 8
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.BitsAllocated = 16
        ds.WindowCenter = f"{(top + 1) // 2}"
        ds.WindowWidth = f"{top + 1}"
        ds.PixelData = stored.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    return ds


@dataclass
class _Job:
    """Everything one image needs, its random stream included (drawn in order by :func:`write_study`)."""

    index: int
    size: tuple[int, int]
    positive: bool
    rng: np.random.Generator
    anatomy: Anatomy
    region_rows: Sequence[np.ndarray] | None
    ptx_scale: float
    uids: dict[str, str]
    patient: dict[str, str]
    photometric: str
    bits: int


def synth_workers(n: int) -> int:
    """Worker processes worth starting for ``n`` images: the CPUs, at most 4, from 32 images up (fewer images do
    not repay starting the processes)."""
    return min(usable_cores(), 4) if n >= 32 else 1


def _render(job: _Job) -> tuple[Path, bytes, list[str], StudyImage]:
    """One image: the phantom, its DICOM bytes, its label CSV rows and its manifest entry."""
    rng = job.rng
    phantom = make_phantom(
        job.size,
        positive=job.positive,
        rng=rng,
        anatomy=job.anatomy,
        region_rows=job.region_rows,
        ptx_scale=job.ptx_scale,
    )
    uids, patient = job.uids, job.patient
    spacing = float(rng.choice([0.139, 0.143, 0.168, 0.194311])) * SIIM_SHAPE[0] / max(job.size)
    ds = _dataset(
        phantom.image,
        photometric=job.photometric,
        bits=job.bits,
        uids=uids,
        patient=patient,
        spacing=spacing,
        study_day=date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 700))),
        index=job.index,
        view=str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
    )
    rel = Path(uids["study"]) / uids["series"] / f"{uids['sop']}.dcm"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    if phantom.rows:
        # SIIM form: one row per annotated region, a leading space before each run-length string.
        lines = [f"{uids['sop']}, {rle_encode(r)}" for r in phantom.rows]
    else:
        lines = [f"{uids['sop']},-1"]
    image = StudyImage(
        image_id=uids["sop"],
        path=str(rel),
        patient_id=patient["id"],
        positive=bool(phantom.mask.any()),
        side=phantom.side,
        site=phantom.site,
        mask_area=int(phantom.mask.sum()),
        confounders=phantom.confounders,
    )
    return rel, buf.getvalue(), lines, image


def _refuse_a_study_in(out: Path) -> None:
    """Refuse ``out`` when it holds a study already (labels, a manifest, or DICOM files)."""
    if not out.is_dir():
        return
    held = [name for name in ("train-rle.csv", "manifest.json") if (out / name).exists()]
    dicoms = next((p for p in out.rglob("*.dcm")), None)
    if held or dicoms is not None:
        what = ", ".join(held + (["DICOM files"] if dicoms is not None else []))
        raise UsageError(
            f"{out} already holds a study ({what}): a new one there would leave labels for some images only",
            hint="write into a new or empty folder, or remove the old study first",
        )


def write_study(
    out: str | Path,
    n: int,
    *,
    positive_rate: float = 0.3,
    size: tuple[int, int] = SIIM_SHAPE,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    mask_shapes: str | Path | None = None,
    second_image_rate: float = 0.15,
    ptx_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> StudySummary:
    """Write ``n`` phantom DICOMs as ``OUT/<study>/<series>/<sop>.dcm`` plus ``OUT/train-rle.csv`` (SIIM form).

    With ``workers`` > 1 the images render in that many spawned processes (:func:`synth_workers` suggests a
    number); the files do not depend on it. Spawning re-imports the calling script, so a script that passes
    ``workers`` must guard its entry point with ``if __name__ == "__main__":``; the CLI does.

    Exactly ``round(n * positive_rate)`` images are positive. A ``manifest.json`` records, per image, the
    patient, side, site, area and confounders, for tests and curious users; ``sample_submission.csv`` lists every
    ImageId with ``-1``, as the competition's sample submission does (the ``submit`` walk-through reads it).

    A folder that already holds a study (its label CSV, manifest or any DICOM) is refused: writing another one
    there would leave labels for some of its images only.
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 0.0 <= positive_rate <= 1.0:
        raise UsageError(f"--positive-rate must be within 0..1, got {positive_rate}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UsageError(f"photometric {photometric!r} must be MONOCHROME1 or MONOCHROME2")
    if bits not in (8, 12, 16):
        raise UsageError(f"bits must be 8 (JPEG Baseline), 12 or 16 (native), got {bits}")
    if not 0.25 <= ptx_scale <= 4.0:
        raise UsageError(f"--ptx-scale must be within 0.25..4, got {ptx_scale}")
    out = Path(out)
    _refuse_a_study_in(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = _sample_shapes(Path(mask_shapes)) if mask_shapes is not None else None

    master = np.random.default_rng(seed)
    n_pos = int(round(n * positive_rate))
    positives = np.zeros(n, dtype=bool)
    positives[master.permutation(n)[:n_pos]] = True
    root = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, with deterministic entropy below
    csv_lines = ["ImageId, EncodedPixels"]
    images: list[StudyImage] = []
    patient_index = -1
    anatomy: Anatomy | None = None
    images_of_patient = 0
    patient: dict[str, str] = {}
    jobs: list[_Job] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        new_patient = patient_index < 0 or images_of_patient >= 2 or rng.random() >= second_image_rate
        if new_patient:
            patient_index += 1
            prng = np.random.default_rng([seed, 1_000_000 + patient_index])
            anatomy = Anatomy.sample(prng)
            patient = {
                "id": _patient_id(seed, patient_index),
                "sex": str(prng.choice(["F", "M"])),
                "age": f"{int(prng.integers(18, 90)):03d}Y",
            }
            images_of_patient = 0
            this_anatomy = anatomy
        else:
            assert anatomy is not None
            this_anatomy = anatomy.jitter(rng)
        images_of_patient += 1
        region_rows = None
        if positives[i] and shapes is not None:
            ids, rows_for = shapes
            for _ in range(20):
                region_rows = rows_for(ids[int(rng.integers(len(ids)))], this_anatomy, size)
                if region_rows:
                    break
        uids = {
            key: str(generate_uid(prefix=root, entropy_srcs=[f"{seed}", f"{i}", key]))
            for key in ("study", "series", "sop")
        }
        jobs.append(
            _Job(i, size, bool(positives[i]), rng, this_anatomy, region_rows, ptx_scale, uids, dict(patient),
                 photometric, bits)
        )  # fmt: skip
    # Each image's random stream is its own (its state is carried in the job), so rendering in worker processes
    # gives the same files as rendering here, in the same order.
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        rendered = pool.map(_render, jobs, chunksize=4)
    else:
        pool, rendered = None, map(_render, jobs)
    try:
        for job, (rel, data, lines, image) in zip(jobs, rendered, strict=True):
            atomic_write_bytes(out / rel, data)
            csv_lines.extend(lines)
            images.append(image)
            if progress is not None:
                progress(job.index + 1, n)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    labels_csv = out / "train-rle.csv"
    atomic_write_text(labels_csv, "\n".join(csv_lines) + "\n")
    manifest = {
        "generator": f"pneumotriage {__version__}",
        "seed": seed,
        "size": list(size),
        "photometric": photometric,
        "bits": bits,
        "positive_rate": positive_rate,
        "mask_shapes": str(mask_shapes) if mask_shapes is not None else None,
        "ptx_scale": ptx_scale,
        "note": "synthetic phantoms, not patient images",
        "images": [asdict(im) for im in images],
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    once = dict.fromkeys(im.image_id for im in images)  # an image's id once, in the order written
    atomic_write_text(out / "sample_submission.csv", "ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in once))
    return StudySummary(out=out, labels_csv=labels_csv, images=images)

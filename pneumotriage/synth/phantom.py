"""One phantom: a density map of simple anatomy, with or without a pneumothorax, and its confounders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

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


def lung_masks(anat: Anatomy, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
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

    left, right = lung_masks(anat, shape)
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

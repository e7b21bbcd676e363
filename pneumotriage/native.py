"""The tool's own input pipeline (``pneumotriage``), its arithmetic in one place: numpy for a file read on the CPU,
torch for a batch decoded on a device, side by side, so the two cannot drift apart (a model must see in a scan the
pixels it was trained on).

1. grey values (after the LUTs, denser = larger) to [0, 1]: clipped at robust percentiles estimated on a sub-grid
   (robust to burned-in labels and collimator edges; exact enough and fast) — :func:`unit_range`,
   :func:`unit_range_batch`;
2. to the model's square: bilinear, antialiased, clamped to [0, 1] — :func:`square`, :func:`square_batch`.

Which files may be decoded by a JPEG codec directly (reduced in the codec, or on the GPU) is
:func:`pneumotriage.dicom.plain_jpeg8`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Low and high percentiles of the grey values that become 0 and 1.
NORM_PERCENTILES = (0.5, 99.5)


def sample_step(shape: tuple[int, ...]) -> int:
    """The stride of the sub-grid the percentiles are estimated on: about 256 samples along the short side."""
    return max(1, min(shape) // 256)


def unit_range(grey: np.ndarray, notes: list[str], padding: np.ndarray | None = None) -> np.ndarray:
    """A (H, W) grey image in [0, 1] (float32). ``padding`` marks pixels outside the image proper
    (PixelPaddingValue): they take no part in the percentiles and come out 0, as a viewer shows them
    (background). What went wrong (no finite value, a constant image) is appended to ``notes``."""
    step = sample_step(grey.shape)
    sample = grey[::step, ::step]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        notes.append("no finite pixel values")
        return np.zeros(grey.shape, dtype=np.float32)
    lo, hi = np.percentile(finite, NORM_PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        notes.append("constant image")
        return np.zeros(grey.shape, dtype=np.float32)
    out: np.ndarray = ((grey - np.float32(lo)) * np.float32(1.0 / (hi - lo))).astype(np.float32, copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    if not np.isfinite(out).all():  # only float pixel data can carry NaN; nan_to_num alone costs ~5 ms/MPixel
        np.nan_to_num(out, copy=False, nan=0.0)
    if padding is not None:
        out[padding] = 0.0
    return out


def unit_range_batch(grey: torch.Tensor) -> torch.Tensor:
    """:func:`unit_range` for a batch of same-size images (B, H, W) on any device (8-bit JPEG frames: always
    finite, no padding)."""
    import torch

    step = sample_step(tuple(grey.shape[-2:]))
    sample = grey[:, ::step, ::step].flatten(1)
    q = torch.tensor([p / 100.0 for p in NORM_PERCENTILES], device=grey.device)
    lo_hi = torch.quantile(sample, q, dim=1)  # (2, B), linear interpolation like numpy's percentile
    lo, hi = lo_hi[0], lo_hi[1]
    flat = hi <= lo
    if bool(flat.any()):
        lo = torch.where(flat, sample.amin(1), lo)
        hi = torch.where(flat, sample.amax(1), hi)
    span = hi - lo
    scale = torch.where(span > 0, 1.0 / span.clamp_min(1e-12), torch.zeros_like(span))
    out = (grey - lo[:, None, None]) * scale[:, None, None]
    return out.clamp_(0.0, 1.0)


def square(pixels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """A (H, W) image in [0, 1] as the model's (1, size, size) float32 input (training's and the scan's)."""
    import torch

    return square_batch(torch.as_tensor(pixels, dtype=torch.float32)[None, None], size)[0]


def square_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`square` for a batch (B, 1, H, W) of same-size images on any device."""
    import torch.nn.functional as F  # noqa: N812 (the usual name)

    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return pixels.clamp_(0.0, 1.0)

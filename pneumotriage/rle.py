"""Run-length encoding of masks as used by the SIIM-ACR Pneumothorax Segmentation challenge.

Pixels are numbered **column-major** (down the first column, then the next): a flat array of H*W values is
reshaped to (W, H) and transposed to get (row, col). A string is pairs ``start length``; ``-1`` is an empty mask.

Two forms exist, and the API makes the choice explicit:

- ``relative=True`` (the SIIM training labels and the competition's expected submissions): each start counts
  from the end of the previous run, the first from pixel 0.
- ``relative=False`` (the standard Kaggle form some solutions used): starts are absolute and 1-based.

Everything is vectorised with numpy: the cost is per run, never per pixel in Python.
"""

from __future__ import annotations

import numpy as np

from pneumotriage.errors import RleError

__all__ = ["EMPTY", "rle_decode", "rle_encode", "rle_runs"]

#: The encoding of an empty mask.
EMPTY = "-1"


def _parse(rle: str) -> np.ndarray:
    parts = rle.split()
    try:
        return np.array(parts, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((p for p in parts if not p.lstrip("-").isdigit()), parts[0] if parts else "")
        raise RleError(f"run-length string holds a non-integer value {bad[:20]!r}") from None


def rle_runs(rle: str, *, relative: bool = True, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` and return its runs as (0-based absolute column-major starts, lengths).

    ``size`` (H*W), when given, bounds-checks the runs. Raises :class:`RleError` for an odd count, a negative
    value, runs that overlap or go backwards, or runs past the end of the image. Zero-length runs are dropped.
    """
    text = rle.strip()
    if text in ("", EMPTY):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    values = _parse(text)
    if values.size % 2:
        raise RleError(f"odd number of values ({values.size}): runs come in 'start length' pairs")
    if (values < 0).any():
        raise RleError(f"negative value {int(values[values < 0][0])} (only an empty mask is written '-1')")
    starts, lengths = values[0::2], values[1::2]
    if relative:
        ends = np.cumsum(starts + lengths)
        starts = ends - lengths
    else:
        if (starts < 1).any():
            raise RleError("absolute starts are 1-based, found 0 (is this the relative SIIM form?)")
        starts = starts - 1
        ends = starts + lengths
        backwards = np.flatnonzero(starts[1:] < ends[:-1])
        if backwards.size:
            k = int(backwards[0]) + 1
            raise RleError(f"run {k + 1} starts at pixel {int(starts[k]) + 1}, inside or before run {k}")
    if size is not None and ends.size and int(ends.max()) > size:
        raise RleError(f"a run ends at pixel {int(ends.max())}, past the image's {size} pixels")
    keep = lengths > 0
    return starts[keep], lengths[keep]


def rle_decode(rle: str, height: int, width: int, *, relative: bool = True) -> np.ndarray:
    """Decode one run-length string to a boolean mask of shape (height, width)."""
    starts, lengths = rle_runs(rle, relative=relative, size=height * width)
    mask = np.zeros((height, width), dtype=bool)
    if lengths.size:
        # Index of every covered pixel without a Python loop: run k contributes starts[k] + 0..lengths[k]-1.
        # Scattering (row, col) pairs straight into the C-ordered mask costs per covered pixel; building a
        # column-major buffer and transposing it would cost a full-image copy per mask.
        offsets = np.cumsum(lengths) - lengths
        flat = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
        cols = flat // height  # np.divmod is several times slower than // and a multiply
        mask[flat - cols * height, cols] = True
    return mask


def rle_encode(
    mask: np.ndarray,
    *,
    relative: bool = True,
    origin: tuple[int, int] = (0, 0),
    shape: tuple[int, int] | None = None,
) -> str:
    """Encode a 2-D mask (any dtype; non-zero is foreground) to a run-length string, ``"-1"`` when empty.

    ``mask`` may be a window of a larger image: its first pixel at ``origin`` (row, column) of an image of
    ``shape``, everything outside the window empty. The code is the whole image's, in time proportional to the
    window."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {arr.shape}")
    top, left = origin
    height, width = arr.shape if shape is None else shape
    if top < 0 or left < 0 or top + arr.shape[0] > height or left + arr.shape[1] > width:
        raise ValueError(f"a {arr.shape} window at {origin} does not fit an image of {(height, width)}")
    c_order = np.flatnonzero(arr)
    if c_order.size == 0:
        return EMPTY
    # Column-major index of each foreground pixel; sorting the (few) foreground pixels is cheaper than a
    # transposed copy of the whole image.
    rows = c_order // arr.shape[1]
    flat = np.sort((c_order - rows * arr.shape[1] + left) * height + rows + top)
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    starts = flat[np.concatenate(([0], breaks))]
    ends = flat[np.concatenate((breaks - 1, [flat.size - 1]))] + 1
    lengths = ends - starts
    if relative:
        gaps = starts.copy()
        gaps[1:] -= ends[:-1]
        pairs = np.column_stack((gaps, lengths))
    else:
        pairs = np.column_stack((starts + 1, lengths))
    return " ".join(map(str, pairs.ravel().tolist()))

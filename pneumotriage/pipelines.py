"""Input pipelines: how the pixels a model sees are made from a DICOM, by name.

A model trained here sees the tool's own pipeline (``pneumotriage``: LUTs, robust percentiles, a square resize;
:func:`pneumotriage.dicom.read_dicom` and :mod:`pneumotriage.native`). A model brought from
elsewhere was trained on other pixels, and its published figures hold only for those: its checkpoint names the
pipeline its publisher's code uses, and the scan, tune and evaluate make exactly that input for it.

- ``xrv``: TorchXRayVision's ``read_xray_dcm`` → ``XRayCenterCrop`` → ``XRayResizer``. The stored values (no
  modality or VOI LUT) over ``2**BitsStored - 1`` mapped to [-1024, 1024], MONOCHROME1 inverted about that
  maximum first; the centred square of the short side; ``skimage.transform.resize`` to the model's size
  (``mode="constant"``, ``preserve_range=True``, skimage's default anti-aliasing). The values are the network's
  input as they are.
- ``png8``: an 8-bit grey image as a model trained on PNGs (CheXNet, Kaggle notebooks) saw it, then
  torchvision's ``Resize(size)`` on it (the short side to ``size``, Pillow's bilinear filter) and ``ToTensor``
  (/255). An 8-bit MONOCHROME2 file without a LUT (SIIM, NIH ChestX-ray14) gives its stored bytes, exactly the
  PNG the publisher's dataset holds; any other file is made 8-bit here (modality and VOI LUTs, MONOCHROME1
  inverted, min-max to 0-255), the publisher's code having no DICOM reader. A non-square image keeps the centred
  square of the resized image, where torchvision would crop from the whole rectangle.
- ``png8-square``: the same 8-bit image resized whole to the model's square (no crop, so that a segmenter's map
  covers the image): what SIIM-ACR notebooks training segmentation_models_pytorch networks on 8-bit images did.
- ``png8-skimage``: the same 8-bit image as CheXNet-Keras read its PNGs (``convert("RGB")``, /255) and resized
  whole to the model's square with ``skimage.transform.resize`` as the scikit-image of its time (0.13, 2018) did:
  bilinear, ``mode="constant"``, no anti-aliasing (later releases smooth before downsampling by default).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pneumotriage.dicom import DicomHeader, grey_values, stored_pixels
from pneumotriage.errors import DicomError

NATIVE = "pneumotriage"

#: name -> what the pipeline does, in one line (shown by `pneumotriage convert` and kept in checkpoints).
PIPELINES: dict[str, str] = {
    NATIVE: "pneumotriage's own: modality and VOI LUTs, MONOCHROME1 inverted, robust percentiles to [0, 1], "
    "resized to a square",
    "xrv": "TorchXRayVision's read_xray_dcm, XRayCenterCrop, XRayResizer: stored values over 2**BitsStored-1 "
    "mapped to [-1024, 1024] (no LUT; MONOCHROME1 inverted), the centred square, skimage resize",
    "png8": "an 8-bit grey image (the stored bytes of an 8-bit MONOCHROME2 file; else LUTs, inversion and min-max "
    "to 0-255), torchvision Resize(short side) with Pillow's bilinear filter, centred square, /255",
    "png8-square": "the same 8-bit grey image resized whole to the model's square with Pillow's bilinear filter, /255 "
    "(a segmenter's map then covers the whole image)",
    "png8-skimage": "the same 8-bit grey image /255, resized whole to the model's square by skimage.transform.resize "
    "as scikit-image 0.13 did (bilinear, mode constant, no anti-aliasing): CheXNet-Keras's generator",
}


@dataclass(frozen=True, order=True)
class InputKey:
    """One model input a decoded image is made into: a square of ``size`` pixels by ``pipeline``."""

    size: int
    pipeline: str = NATIVE

    def __str__(self) -> str:
        return f"{self.size}" if self.pipeline == NATIVE else f"{self.pipeline}@{self.size}"


def make_input(ds: Dataset, header: DicomHeader, key: InputKey, stored: np.ndarray | None = None) -> np.ndarray:
    """The (size, size) float32 input of a foreign pipeline (not :data:`NATIVE`, which the scan's decoder makes
    with the display copy) for one image; ``stored``: its :func:`~pneumotriage.dicom.stored_pixels` where the
    caller has them already (one decode for every imported model's input). Raises
    :class:`~pneumotriage.errors.DicomError` naming the file."""
    if key.pipeline == "xrv":
        return xrv_input(ds, header, key.size, stored)
    if key.pipeline == "png8":
        return png8_input(ds, header, key.size, stored)
    if key.pipeline == "png8-square":
        return png8_square_input(ds, header, key.size, stored)
    if key.pipeline == "png8-skimage":
        return png8_skimage_input(ds, header, key.size, stored)
    raise KeyError(f"unknown pipeline {key.pipeline!r}; valid: {', '.join(PIPELINES)}")


GREY = ("MONOCHROME1", "MONOCHROME2")


def _grey_stored(ds: Dataset, header: DicomHeader, name: str, stored: np.ndarray | None) -> tuple[str, np.ndarray]:
    """The photometric interpretation and stored values of a grey image (decoded here unless given); a colour
    image is refused before anything is decoded."""
    photometric = (header.photometric or "").strip().upper()
    if photometric not in GREY:
        raise DicomError(
            f"{name}'s pipeline reads grey images only, and this one is {photometric or 'of no stated kind'}",
            path=header.path,
            hint="triage it with a model of this tool's own pipeline",
        )
    data = stored if stored is not None else stored_pixels(ds, header)
    if data.ndim != 2:
        raise DicomError(f"pixel array of shape {data.shape} is not one grey image", path=header.path)
    return photometric, data


def xrv_input(ds: Dataset, header: DicomHeader, size: int, stored: np.ndarray | None = None) -> np.ndarray:
    """TorchXRayVision's input for one image (see the module docstring), in [-1024, 1024]."""
    photometric, data = _grey_stored(ds, header, "TorchXRayVision", stored)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    maxval = 2**bits - 1
    if photometric == "MONOCHROME1":
        data = maxval - data.astype(np.int64)
    if data.size and data.max() > maxval:
        raise DicomError(
            f"stored values up to {int(data.max())} exceed {maxval}, the most {bits} bits stored can hold "
            "(TorchXRayVision refuses such a file too)",
            path=header.path,
            hint="the header's BitsStored is wrong; re-export the image",
        )
    # (2 * (data / maxval) - 1) * 1024 in float32, as TorchXRayVision computes it, in place (~0.6 ms less than
    # four new arrays of 4 MB at 1,024 px).
    img = data.astype(np.float32)
    img /= maxval
    img *= 2
    img -= 1.0
    img *= 1024
    rows, cols = img.shape
    side = min(rows, cols)
    top, left = rows // 2 - side // 2, cols // 2 - side // 2
    img = img[top : top + side, left : left + side]
    if side >= size:
        return xrv_resize(img, size)
    from skimage.transform import resize  # only here: importing it costs a worker ~0.1 s before its first file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resized = resize(img[None], (1, size, size), mode="constant", preserve_range=True)  # type: ignore[no-untyped-call]
        out = np.asarray(resized, dtype=np.float32)
    return np.ascontiguousarray(out[0])


def xrv_resize(img: np.ndarray, size: int) -> np.ndarray:
    """``skimage.transform.resize(img[None], (1, size, size), mode="constant", preserve_range=True)[0]`` of a
    float32 image no smaller than ``size`` on either side, bit for bit, in about a third of its time.

    skimage smooths with ``scipy.ndimage.gaussian_filter`` (sigma ``(factor - 1) / 2`` on each axis, truncated at
    4 sigma, zeros outside) and then zooms with ``scipy.ndimage.zoom`` (order 1, grid mode). Here the smoothing
    down the columns is done with numpy over whole rows at once, where scipy walks each column with a stride (7x
    slower): the same products and sums in float64, in scipy's order (the centre tap, then the pairs of taps from
    the outermost in), rounded to float32 where scipy rounds. The rest is scipy's own call, on the 2-D image
    (skimage's third axis of one only adds zeros), except for a square halved (SIIM's 1,024 px to 512, the common
    case): :func:`_halved`. tests/test_imports.py holds it to skimage's output."""
    rows, cols = img.shape
    if rows == cols == 2 * size:
        return _halved(img)
    from scipy import ndimage

    a = np.ascontiguousarray(img, dtype=np.float32)
    sigma_rows, sigma_cols = (max(0.0, (n / size - 1) / 2) for n in (rows, cols))
    if sigma_rows > 1e-15:  # gaussian_filter's own test for an axis to smooth
        a = _smooth_columns(a, sigma_rows)
    if sigma_cols > 1e-15:
        a = ndimage.gaussian_filter1d(a, sigma_cols, axis=1, mode="constant", cval=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy suggests grid-constant; skimage passes constant
        out = ndimage.zoom(a, (1 / (rows / size), 1 / (cols / size)), order=1, mode="constant", grid_mode=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def _kernel(sigma: float) -> tuple[int, np.ndarray]:
    """scipy's Gaussian kernel for ``sigma`` (truncated at 4 sigma): its radius and its taps, in float64."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * taps**2)
    return radius, kernel / kernel.sum()


def _smooth_columns(a: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d(a, sigma, axis=0, mode="constant")`` of a float32 image (see
    :func:`xrv_resize`): the kernel as scipy makes it, each output ``x[i] * w[0] + (x[i-r] + x[i+r]) * w[r] + ...``
    down to ``r = 1``, in float64.

    A band of rows at a time (~0.5 MB of float64 each): the whole image's float64 copies (8 MB at 1,024 px) went
    through memory once a tap, 3x slower, and took the memory bandwidth the models beside it need."""
    radius, kernel = _kernel(sigma)
    n, cols = a.shape
    band = max(8, (1 << 16) // max(cols, 1))
    result = np.empty((n, cols), dtype=np.float32)
    rows = np.empty((band + 2 * radius, cols), dtype=np.float64)  # the band's input, zeros beyond the image
    out, pair = np.empty((band, cols), dtype=np.float64), np.empty((band, cols), dtype=np.float64)
    for first in range(0, n, band):
        m = min(band, n - first)
        _band(a, first, m, radius, rows)
        _taps(rows, radius, kernel, m, out[:m], pair[:m])
        result[first : first + m] = out[:m]
    return result


def _band(a: np.ndarray, first: int, m: int, radius: int, rows: np.ndarray) -> None:
    """Rows ``first`` to ``first + m`` of ``a`` with ``radius`` rows of margin each side into ``rows`` (float64),
    zeros above the image's first row and below its last, as scipy's "constant" mode reads them."""
    n = a.shape[0]
    lo, hi = first - radius, first + m + radius
    inside_lo, inside_hi = max(lo, 0) - lo, min(hi, n) - lo
    rows[:inside_lo] = 0.0
    rows[inside_hi : hi - lo] = 0.0
    rows[inside_lo:inside_hi] = a[lo + inside_lo : lo + inside_hi]


def _taps(x: np.ndarray, radius: int, kernel: np.ndarray, m: int, out: np.ndarray, pair: np.ndarray) -> None:
    """scipy's symmetric correlation down the first axis of ``x`` (float64, ``radius`` rows of margin each side)
    into ``out`` (``m`` rows): the centre tap, then the pairs of taps from the outermost in."""
    np.multiply(x[radius : radius + m], kernel[radius], out=out)
    for k in range(radius, 0, -1):
        np.add(x[radius - k : radius - k + m], x[radius + k : radius + k + m], out=pair)
        pair *= kernel[radius - k]
        out += pair


def _halved(img: np.ndarray) -> np.ndarray:
    """:func:`xrv_resize` of an ``n`` x ``n`` image to ``n / 2``: scipy's three steps done together on a band of
    rows at a time, while it is in the cache (~7.5 ms at 1,024 px on a 2-core Xeon, against ~10.5 for
    :func:`xrv_resize`'s three passes over the image), to the same bits. The smoothing (sigma 0.5) down the columns
    and then along the rows, each rounded to float32 as scipy rounds it; then the zoom, each of whose outputs reads
    a 2 x 2 block at weights of exactly 1/2 x 1/2: scipy's four products are exact quarters, so its sum is
    ``((a + b) + c) + d`` times 1/4, in float64."""
    n = img.shape[0]
    radius, kernel = _kernel((n / (n // 2) - 1) / 2)
    band = 32  # rows, even: each band's rows make whole output rows
    out = np.empty((n // 2, n // 2), dtype=np.float32)
    rows = np.zeros((band + 2 * radius, n), dtype=np.float64)  # the band's input, zeros beyond the image
    wide = np.zeros((band, n + 2 * radius), dtype=np.float64)  # its columns smoothed, zeros beyond each end
    along, pair = np.empty((band, n), dtype=np.float64), np.empty((band, n), dtype=np.float64)
    smooth = np.empty((band, n), dtype=np.float32)
    for first in range(0, n, band):
        m = min(band, n - first)
        _band(img, first, m, radius, rows)
        o, p, s = along[:m], pair[:m], smooth[:m]
        _taps(rows, radius, kernel, m, o, p)
        s[...] = o  # float32, as scipy's first pass writes it
        w = wide[:m]
        w[:, radius : radius + n] = s
        np.multiply(w[:, radius : radius + n], kernel[radius], out=o)  # the same taps along the rows
        for k in range(radius, 0, -1):
            np.add(w[:, radius - k : radius - k + n], w[:, radius + k : radius + k + n], out=p)
            p *= kernel[radius - k]
            o += p
        s[...] = o  # and its second
        block = along[: m // 2, : n // 2]
        np.add(s[0::2, 0::2], s[0::2, 1::2], out=block, dtype=np.float64)
        block += s[1::2, 0::2]
        block += s[1::2, 1::2]
        block *= 0.25
        out[first // 2 : (first + m) // 2] = block
    return out


def _grey8(ds: Dataset, header: DicomHeader, stored: np.ndarray | None) -> np.ndarray:
    """The 8-bit grey image of the ``png8`` pipelines (see the module docstring)."""
    photometric, data = _grey_stored(ds, header, "An 8-bit PNG model", stored)
    plain = (
        data.dtype == np.uint8
        and photometric == "MONOCHROME2"
        and not any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))
        and not any(k in ds for k in ("WindowCenter", "VOILUTSequence"))
    )
    if plain:
        return data
    grey = grey_values(data, ds, photometric)
    lo, hi = float(np.nanmin(grey)), float(np.nanmax(grey))
    scaled = (grey - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(grey)
    return np.clip(np.round(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def png8_input(ds: Dataset, header: DicomHeader, size: int, stored: np.ndarray | None = None) -> np.ndarray:
    """The ``png8`` input for one image (see the module docstring), in [0, 1]."""
    from PIL import Image

    grey8 = _grey8(ds, header, stored)
    rows, cols = grey8.shape
    short, long = min(rows, cols), max(rows, cols)
    # torchvision's Resize(int): the short side becomes `size`, the long one int(size * long / short)
    new_long = int(size * long / short)
    new_rows, new_cols = (size, new_long) if rows <= cols else (new_long, size)
    image = Image.fromarray(np.ascontiguousarray(grey8), mode="L")
    if (new_rows, new_cols) != (rows, cols):
        image = image.resize((new_cols, new_rows), Image.Resampling.BILINEAR)
    out = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    # torchvision's center_crop rounding: top = int(round((h - size) / 2))
    top, left = int(round((new_rows - size) / 2.0)), int(round((new_cols - size) / 2.0))
    return np.ascontiguousarray(out[top : top + size, left : left + size])


def png8_square_input(ds: Dataset, header: DicomHeader, size: int, stored: np.ndarray | None = None) -> np.ndarray:
    """The ``png8-square`` input for one image: the whole 8-bit image resized to ``size`` x ``size`` (Pillow's
    bilinear filter), /255, in [0, 1]."""
    from PIL import Image

    grey8 = _grey8(ds, header, stored)
    image = Image.fromarray(np.ascontiguousarray(grey8), mode="L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def png8_skimage_input(ds: Dataset, header: DicomHeader, size: int, stored: np.ndarray | None = None) -> np.ndarray:
    """The ``png8-skimage`` input for one image: the whole 8-bit image /255 (in float64, as numpy divides), resized
    to ``size`` x ``size`` by scikit-image with its 2018 defaults (order 1, ``mode="constant"``, no anti-aliasing),
    in [0, 1]."""
    from skimage.transform import resize

    grey = _grey8(ds, header, stored) / 255.0
    if grey.shape != (size, size):
        grey = resize(grey, (size, size), order=1, mode="constant", anti_aliasing=False)  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(grey, dtype=np.float32)

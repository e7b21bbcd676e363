"""The full decode: pixel data to a float32 image in [0, 1] where higher means denser, through DICOM's
grayscale pipeline (PS3.3 C.11: Modality LUT -> VOI LUT or window -> presentation, MONOCHROME1 inverted
after the LUTs), then :func:`pneumotriage.native.unit_range`.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from pneumotriage.dicom.base import PARSE_ERRORS, DicomHeader, DicomImage
from pneumotriage.dicom.files import cut_pixel_data, first_line, open_dataset, reason_of_error
from pneumotriage.dicom.header import header_from, text_of
from pneumotriage.dicom.jpeg import check_jpeg_size, check_pixel_data, codec_reduces
from pneumotriage.errors import (
    CorruptPixelDataError,
    NoPixelDataError,
    UnsupportedTransferSyntaxError,
)
from pneumotriage.native import unit_range


def read_dicom(path: str | Path, *, reduce_to: int | None = None) -> DicomImage:
    """Decode one radiograph to float32 H x W in [0, 1], bone bright.

    ``reduce_to``: the caller will shrink the image to about this many pixels a side, so an 8-bit JPEG Baseline
    image (all of SIIM) may be decoded straight to a smaller size with the codec's DCT scaling (1/2, 1/4 or 1/8,
    never below ``reduce_to`` on either side), which is several times faster. ``pixels`` is then smaller than
    ``original_shape``; every other encoding decodes in full.

    Raises a :class:`~pneumotriage.errors.DicomError` subclass naming the file and the remedy.
    """
    return decode_pixels(*open_image(path), reduce_to=reduce_to)


def open_image(path: str | Path) -> tuple[Dataset, DicomHeader, list[str]]:
    """Parse a file holding an image that can be decoded here (pixel data read, not decoded): the data set, its
    header and notes for the user. Raises a :class:`~pneumotriage.errors.DicomError` subclass naming the file and
    the remedy for anything else (not DICOM, no pixels, a codec missing, a damaged or oversized header)."""
    path = Path(path)
    ds, notes, has_pixels = open_dataset(path, header_only=False)
    header = header_from(ds, path, notes, has_pixels)
    if header.problem is not None:
        if not has_pixels:
            at = cut_pixel_data(path)
            if at is None and "Rows" in ds and "Columns" in ds:
                raise CorruptPixelDataError(
                    f"truncated or damaged: an image header ({ds.get('Rows')} x {ds.get('Columns')}) with no pixel "
                    f"data, the file ending at byte {path.stat().st_size}",
                    path=path,
                    hint="the copy is incomplete; copy or export it again",
                )
            if at is not None:
                raise CorruptPixelDataError(
                    f"truncated: its pixel data element starts at byte {at} but the file ends at byte "
                    f"{path.stat().st_size}",
                    path=path,
                    hint="the copy is incomplete; copy or export it again",
                )
            raise NoPixelDataError(header.problem, path=path, hint="only image objects can be triaged")
        if header.problem.startswith("declared size"):
            raise CorruptPixelDataError(header.problem, path=path, hint="the header is damaged; re-export the image")
        # The problem text already names the extra to install where one exists.
        hint = None if "pip install" in header.problem else "convert it to an uncompressed transfer syntax"
        raise UnsupportedTransferSyntaxError(header.problem, path=path, hint=hint)
    for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if keyword not in ds:
            raise CorruptPixelDataError(
                f"required image element {keyword} is missing", path=path, hint="re-export the image"
            )
    return ds, header, notes


def decode_pixels(
    ds: Dataset, header: DicomHeader, notes: list[str], *, reduce_to: int | None = None, again: DicomImage | None = None
) -> DicomImage:
    """The pixels of a data set from :func:`open_image`, decoded as :func:`read_dicom` describes. ``again``: this
    data set decoded before (at another size), whose pixel data checks need not run twice."""
    path = header.path
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if again is None:
        source_shape = check_jpeg_size(ds, header)
        check_pixel_data(ds, header)
    else:
        source_shape = again.original_shape
    try:
        _check_rescale(ds)
    except ValueError as exc:
        raise CorruptPixelDataError(str(exc), path=path, hint="re-export the image from the PACS") from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = _reduced_jpeg(ds, header, reduce_to) if reduce_to else None
            if arr is None:
                arr = pixel_array(ds, index=0) if header.frames > 1 else ds.pixel_array
                source_shape = (int(arr.shape[0]), int(arr.shape[1]))
            padding = _padding(arr, ds)
            grey = _to_grey(arr, ds, photometric, notes)
    except LutError as exc:
        raise CorruptPixelDataError(str(exc), path=path, hint="the header is damaged; re-export the image") from None
    except PARSE_ERRORS as exc:
        raise CorruptPixelDataError(
            f"pixel data does not decode ({reason_of_error(exc)})",
            path=path,
            hint="the file is truncated or damaged; re-export it",
        ) from None
    notes.extend(first_line(w.message) for w in caught)
    if header.frames > 1:
        notes.append(f"{header.frames} frames; using the first")
    pixels = unit_range(grey, notes, padding)
    return DicomImage(
        **header.identity(),
        pixels=pixels,
        original_shape=source_shape or (int(pixels.shape[0]), int(pixels.shape[1])),
        photometric=photometric,
        transfer_syntax=header.transfer_syntax or "",
        warnings=notes,
    )


def stored_pixels(ds: Dataset, header: DicomHeader) -> np.ndarray:
    """The first frame's stored values as the file holds them, decoded in full: no LUT, no inversion, no
    scaling (what ``ds.pixel_array`` gives, as an imported model's own pipeline reads it). Raises
    :class:`CorruptPixelDataError` naming the file where the pixel data does not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0) if header.frames > 1 else ds.pixel_array
    except PARSE_ERRORS as exc:
        raise CorruptPixelDataError(
            f"pixel data does not decode ({reason_of_error(exc)})",
            path=header.path,
            hint="the file is truncated or damaged; re-export it",
        ) from None
    return np.asarray(arr)


def _reduced_jpeg(ds: Dataset, header: DicomHeader, reduce_to: int) -> np.ndarray | None:
    """Decode a single-frame, 8-bit, grey JPEG Baseline image at a reduced size with Pillow's ``draft``, or return
    None where that does not apply (the caller then decodes in full)."""
    if not codec_reduces(ds, header, reduce_to):
        return None
    from PIL import Image

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as img:
            img.draft("L", (reduce_to, reduce_to))
            arr = np.asarray(img)
    except (OSError, ValueError, StopIteration, SyntaxError):
        return None  # let the full decoder report what is wrong
    if arr.ndim != 2 or min(arr.shape) < reduce_to:
        return None
    return arr


def _to_grey(arr: np.ndarray, ds: Dataset, photometric: str, notes: list[str]) -> np.ndarray:
    """Stored values -> display values (denser = larger) as float32, following the grayscale pipeline."""
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except PARSE_ERRORS as exc:
            raise LutError(f"its palette colour lookup table is damaged ({first_line(exc)})") from None
        notes.append("palette colour image converted to grey")
        photometric = "RGB"
    if arr.ndim == 3:
        # pydicom hands back RGB for YBR_* by default; reduce with Rec. 601 luma weights.
        notes.append(f"{photometric} colour image converted to grey")
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.asarray(arr[..., :3], dtype=np.float32) @ weights
    if arr.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    try:
        out = apply_modality_lut(arr, ds)
    except PARSE_ERRORS as exc:
        # Not optional: the Modality LUT says what the stored values stand for; without it they would be misread.
        raise LutError(f"its Modality LUT is damaged ({first_line(exc)}): the stored values cannot be read") from None
    if "WindowCenter" in ds and "VOILUTSequence" not in ds and not _window_usable(ds):
        notes.append(f"window {ds.get('WindowCenter')}/{ds.get('WindowWidth')} is not usable; not applied")
    elif "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        except PARSE_ERRORS as exc:  # optional (how to display, not what the values are): a note, not a refusal
            notes.append(f"VOI LUT/window not applied ({first_line(exc)})")
    out = np.asarray(out, dtype=np.float32)
    if photometric == "MONOCHROME1" or inverse_presentation(ds):
        # MONOCHROME1: the minimum value is displayed white. Invert after the LUTs (PS3.3 C.7.6.3.1.2). A
        # Presentation LUT Shape of INVERSE asks the same of any grey image (PS3.3 C.11.6.1.2; a DX MONOCHROME1
        # image declares INVERSE for the one inversion it needs, so the two never make a second).
        out = -out
    return out


class LutError(ValueError):
    """A lookup table the image cannot be read without (palette, Modality LUT) is damaged."""


def inverse_presentation(ds: Dataset) -> bool:
    """Whether the header's Presentation LUT Shape is INVERSE."""
    return text_of(ds, "PresentationLUTShape") == "INVERSE"


#: The largest rescale slope and intercept believed: radiographs carry 1 and 0 (CT ~1 and -1024); a slope of 1e300
#: turns every pixel infinite, one of 0 makes the image constant.
MAX_RESCALE = 1e6


def _check_rescale(ds: Dataset) -> None:
    """Refuse a Modality LUT rescale that cannot be meant (0, not finite, absurdly large): it would make the image
    constant or infinite, and a constant image has no answer."""
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        if keyword not in ds:
            continue
        raw = ds.get(keyword)
        try:
            value = float(raw) if raw not in (None, "") else default
        except (TypeError, ValueError):
            raise ValueError(f"{keyword} {raw!r} is not a number") from None
        if not math.isfinite(value) or abs(value) > MAX_RESCALE or (keyword == "RescaleSlope" and value == 0):
            raise ValueError(f"{keyword} {raw} cannot be applied (the header is damaged)")


def _window_usable(ds: Dataset) -> bool:
    """Whether the first window (centre and width) is finite with a positive width (PS3.3 C.11.2.1.2 needs >= 1)."""
    try:
        centre, width = ds.WindowCenter, ds.WindowWidth
        centre = float(centre[0] if isinstance(centre, MultiValue | list) else centre)
        width = float(width[0] if isinstance(width, MultiValue | list) else width)
    except (AttributeError, TypeError, ValueError, IndexError):
        return False
    return math.isfinite(centre) and math.isfinite(width) and width >= 1 and abs(centre) <= 1e9


def grey_values(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Stored values through the modality and VOI LUTs as float32, denser = larger (MONOCHROME1 inverted)."""
    return _to_grey(arr, ds, photometric, [])


def _padding(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Which stored values are padding (PixelPaddingValue, up to PixelPaddingRangeLimit: PS3.3 C.7.5.1.1.2),
    as a mask of the grey image; None where the header declares none or the array is not one grey frame."""
    if arr.ndim != 2 or "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(ds.PixelPaddingValue)
        limit = int(ds.get("PixelPaddingRangeLimit", value))
    except (TypeError, ValueError):
        return None
    lo, hi = min(value, limit), max(value, limit)
    mask: np.ndarray = (arr >= lo) & (arr <= hi) if lo != hi else arr == lo
    return mask if mask.any() else None

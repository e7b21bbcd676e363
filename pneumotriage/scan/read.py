"""Stage 2, read: parse one file's header and pixel data bytes (in a worker process), without decoding.

Everything a header can get wrong is settled here, before a pixel is allocated: not DICOM, no image, a codec
missing, a declared size over :data:`~pneumotriage.dicom.MAX_SIDE` or under
:data:`~pneumotriage.dicom.MIN_SIDE`, or a JPEG whose own frame size disagrees with Rows/Columns (the image's
true size comes from its pixel data, never from the header alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pneumotriage.dicom import (
    MIN_SIDE,
    DicomHeader,
    check_jpeg_size,
    codec_reduces,
    inverse_presentation,
    jpeg_frame,
    open_image,
    plain_jpeg8,
)
from pneumotriage.errors import DicomError
from pneumotriage.inputcheck import NotTriaged, check_header, orientation


@dataclass
class Source:
    """A parsed file: its data set, header and notes; for a JPEG Baseline image that can be decoded on the GPU,
    its compressed frame and whether it is MONOCHROME1 (inverted after decoding)."""

    ds: Dataset
    header: DicomHeader
    notes: list[str]
    jpeg: bytes | None = None
    invert: bool = False
    #: How to turn the image upright for the models (flip left-right, flip up-down): its PatientOrientation.
    flip: tuple[bool, bool] = (False, False)
    #: The input-check rules widened (``--accept``): the pixel rules are checked once the image is decoded.
    accept: tuple[str, ...] = ()


def _device_decodable(ds: Dataset, header: DicomHeader) -> bool:
    """An 8-bit grey single-frame JPEG Baseline image whose grey-level pipeline is the identity (no rescale, no
    LUTs, no window): all of SIIM. Anything else keeps the full CPU pipeline."""
    try:
        identity_lut = float(ds.get("RescaleSlope", 1) or 1) == 1.0 and float(ds.get("RescaleIntercept", 0) or 0) == 0
    except (TypeError, ValueError):
        return False
    return (
        identity_lut
        and plain_jpeg8(ds, header)
        and not any(k in ds for k in ("ModalityLUTSequence", "VOILUTSequence", "WindowCenter", "PixelPaddingValue"))
        and not inverse_presentation(ds)
    )


def read(path: Path, *, want_jpeg: bool, accept: tuple[str, ...] = (), sizes: Sequence[int] = ()) -> Source:
    """Parse ``path`` (raises a :class:`~pneumotriage.errors.DicomError` naming the file and the remedy, or
    :class:`~pneumotriage.inputcheck.NotTriaged` where its header says it is not a frontal chest radiograph).
    With ``want_jpeg``, an image :func:`_device_decodable` comes back with its compressed frame, size-checked,
    unless the codec would reduce it for one of the model inputs ``sizes``: training has the JPEG codec shrink
    such an image as it decodes (DCT scaling), which a decode in full on the GPU and a resize do not make
    (a demo classifier gave one negative 0.72 instead of 0.21), so it is decoded as training does."""
    ds, header, notes = open_image(path)
    if header.shape is not None and min(header.shape) < MIN_SIDE:
        rows, cols = header.shape
        raise DicomError(
            f"{rows} x {cols} px is too small for a radiograph (a scan takes at least {MIN_SIDE} px a side)",
            path=path,
            hint="not a radiograph; leave it out of the input",
        )
    try:
        check_header(ds, header, accept)
        flip = orientation(ds, accept)
    except NotTriaged as exc:
        exc.header = header
        raise
    source = Source(ds, header, notes, flip=flip, accept=accept)
    reduced = bool(sizes) and codec_reduces(ds, header, min(sizes)) if want_jpeg else False
    if want_jpeg and flip == (False, False) and _device_decodable(ds, header) and not reduced:
        check_jpeg_size(ds, header)
        source.jpeg = jpeg_frame(ds)
        source.invert = header.photometric == "MONOCHROME1"
    return source

"""The header pass: the fields a header says (identity, geometry, encoding) and whether its pixels can be
decoded here, read without touching the pixel data.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    JPEGExtended12Bit,
)

from pneumotriage.dicom.base import (
    CODECS_GPL_HINT,
    CODECS_HINT,
    EXTRA_FOR_SYNTAX,
    MAX_PIXELS,
    MAX_SIDE,
    NO_PIXELS,
    PARSE_ERRORS,
    SYNTHETIC_MARK,
    DicomHeader,
    image_id_for,
)
from pneumotriage.dicom.files import open_dataset


def text_of(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except PARSE_ERRORS:
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def int_of(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except PARSE_ERRORS:
        return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm; None where missing, malformed or non-positive (``0\\0`` is common)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None:
                continue
            parts = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
        except PARSE_ERRORS:
            continue
        if len(parts) == 2 and all(np.isfinite(p) and p > 0 for p in parts):
            return (parts[0], parts[1])
    return None


def _study_datetime(ds: Dataset) -> datetime | None:
    date = (text_of(ds, "StudyDate") or text_of(ds, "AcquisitionDate") or "").replace(".", "")
    if len(date) != 8 or not date.isdigit():
        return None
    time = (text_of(ds, "StudyTime") or text_of(ds, "AcquisitionTime") or "").replace(":", "")
    digits = time.split(".")[0]
    digits = (digits + "000000")[:6] if digits.isdigit() else "000000"
    try:
        return datetime.strptime(date + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def syntax_of(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _pixel_problem(ds: Dataset, has_pixels: bool) -> str | None:
    """Why the pixel data of ``ds`` cannot be decoded here, or None."""
    if not has_pixels:
        return NO_PIXELS
    rows, cols = int_of(ds, "Rows"), int_of(ds, "Columns")
    if (rows or 0) > MAX_SIDE or (cols or 0) > MAX_SIDE:
        return f"declared size {rows} x {cols} exceeds the {MAX_SIDE} px a side this tool decodes"
    pixels = (rows or 0) * (cols or 0) * max(int_of(ds, "SamplesPerPixel") or 1, 1)
    if pixels > MAX_PIXELS:
        return (
            f"declared size {rows} x {cols} ({pixels / 1e6:.0f} MP) exceeds the {MAX_PIXELS // 1_000_000} MP a frame "
            "this tool decodes"
        )
    syntax = syntax_of(ds)
    if syntax is None:
        return "no transfer syntax"
    if not syntax.is_compressed:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax {syntax} ({syntax.name}): no decoder exists for it"
    if not decoder.is_available:
        return f"transfer syntax {syntax.name} needs a decoder: {EXTRA_FOR_SYNTAX.get(str(syntax), CODECS_HINT)}"
    bits = int_of(ds, "BitsStored") or 8
    if syntax == JPEGExtended12Bit and bits > 8 and set(decoder.available_plugins) <= {"pillow"}:
        return f"12-bit {syntax.name} needs a decoder: {CODECS_GPL_HINT}"
    return None


def header_from(ds: Dataset, path: Path, notes: list[str], has_pixels: bool) -> DicomHeader:
    syntax = syntax_of(ds)
    return DicomHeader(
        path=path,
        image_id=image_id_for(path),
        sop_instance_uid=text_of(ds, "SOPInstanceUID"),
        study_instance_uid=text_of(ds, "StudyInstanceUID"),
        series_instance_uid=text_of(ds, "SeriesInstanceUID"),
        patient_id=text_of(ds, "PatientID"),
        accession=text_of(ds, "AccessionNumber"),
        study_datetime=_study_datetime(ds),
        modality=text_of(ds, "Modality"),
        view_position=text_of(ds, "ViewPosition"),
        rows=int_of(ds, "Rows"),
        columns=int_of(ds, "Columns"),
        frames=max(int_of(ds, "NumberOfFrames") or 1, 1),
        samples_per_pixel=int_of(ds, "SamplesPerPixel") or 1,
        photometric=text_of(ds, "PhotometricInterpretation"),
        bits_stored=int_of(ds, "BitsStored"),
        transfer_syntax=str(syntax) if syntax else None,
        transfer_syntax_name=syntax.name if syntax else None,
        pixel_spacing_mm=_pixel_spacing(ds),
        problem=_pixel_problem(ds, has_pixels),
        synthetic=text_of(ds, "ImageComments") == SYNTHETIC_MARK,
        warnings=tuple(notes),
    )


def read_header(path: str | Path) -> DicomHeader:
    """Read the header of one file, never its pixel data. Raises :class:`NotDicomError` for non-DICOM files."""
    path = Path(path)
    ds, notes, has_pixels = open_dataset(path, header_only=True)
    return header_from(ds, path, notes, has_pixels)

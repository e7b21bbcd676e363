"""Reading chest radiographs from DICOM files.

Two entry points:

- :func:`read_header` / :func:`discover`: a header-only pass (pixel data is never read) that says what a file is
  and whether it can be decoded here. Used to index folders before any expensive work.
- :func:`read_dicom`: the full decode to a float32 image in [0, 1] where **higher means denser** (bone bright),
  whatever the photometric interpretation, bit depth or compression.

The grey-level pipeline follows DICOM PS3.3 C.11 (the "grayscale pipeline"): stored values -> Modality LUT
(rescale slope/intercept or a LUT) -> VOI LUT or window -> Presentation (MONOCHROME1 is inverted *after* the
LUTs) -> a robust percentile normalisation to [0, 1] (:mod:`pneumotriage.native`).

The modules, in the order a file meets them: :mod:`~pneumotriage.dicom.base` (the records and limits),
:mod:`~pneumotriage.dicom.files` (opening), :mod:`~pneumotriage.dicom.header` (the header pass),
:mod:`~pneumotriage.dicom.walk` (folders), :mod:`~pneumotriage.dicom.jpeg` (JPEG codestreams) and
:mod:`~pneumotriage.dicom.pixels` (the decode); :mod:`~pneumotriage.dicom.inspection` is `inspect`'s row.
What the rest of the package uses is imported from here.
"""

from pneumotriage.dicom.base import (
    MAX_SIDE,
    MIN_SIDE,
    ROW_IDENTITY,
    SYNTHETIC_MARK,
    DicomHeader,
    DicomIdentity,
    DicomImage,
    SkippedFile,
    image_id_for,
)
from pneumotriage.dicom.header import read_header
from pneumotriage.dicom.inspection import describe
from pneumotriage.dicom.jpeg import check_jpeg_size, codec_reduces, jpeg_frame, jpeg_frame_size, plain_jpeg8
from pneumotriage.dicom.pixels import (
    decode_pixels,
    grey_values,
    inverse_presentation,
    open_image,
    read_dicom,
    stored_pixels,
)
from pneumotriage.dicom.walk import discover, walk_files

__all__ = [
    "DicomHeader",
    "DicomIdentity",
    "DicomImage",
    "MAX_SIDE",
    "MIN_SIDE",
    "ROW_IDENTITY",
    "SYNTHETIC_MARK",
    "SkippedFile",
    "check_jpeg_size",
    "codec_reduces",
    "decode_pixels",
    "describe",
    "discover",
    "grey_values",
    "image_id_for",
    "inverse_presentation",
    "jpeg_frame",
    "jpeg_frame_size",
    "open_image",
    "plain_jpeg8",
    "read_dicom",
    "read_header",
    "stored_pixels",
    "walk_files",
]

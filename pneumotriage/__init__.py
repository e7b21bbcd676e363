"""pneumotriage: triage chest radiographs for pneumothorax from folders of DICOMs."""

from __future__ import annotations

__version__ = "0.1.0"

from pneumotriage.dicom import DicomHeader, DicomImage, discover, read_dicom, read_header  # noqa: E402
from pneumotriage.errors import PneumotriageError  # noqa: E402
from pneumotriage.labels import index_dataset, read_rle_csv, write_rle_csv  # noqa: E402
from pneumotriage.rle import rle_decode, rle_encode  # noqa: E402

__all__ = [
    "DicomHeader",
    "DicomImage",
    "PneumotriageError",
    "__version__",
    "discover",
    "index_dataset",
    "read_dicom",
    "read_header",
    "read_rle_csv",
    "rle_decode",
    "rle_encode",
    "write_rle_csv",
]

"""pneumotriage: triage chest radiographs for pneumothorax from folders of DICOMs."""

from __future__ import annotations

from pneumotriage.dicom import DicomHeader, DicomImage, discover, read_dicom, read_header
from pneumotriage.errors import PneumotriageError
from pneumotriage.folds import index_dataset
from pneumotriage.labels import read_rle_csv, write_rle_csv
from pneumotriage.rle import rle_decode, rle_encode
from pneumotriage.version import __version__

__all__ = [
    "DicomHeader",
    "load_model",
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


def __getattr__(name: str) -> object:
    # load_model pulls in torch; import it only when asked for, so `import pneumotriage` stays light.
    if name == "load_model":
        from pneumotriage.models import load_model

        return load_model
    raise AttributeError(f"module 'pneumotriage' has no attribute {name!r}")

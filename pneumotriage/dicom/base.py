"""What a DICOM file is to this tool: the records a header and an image become, the limits every read
keeps, and the few text helpers the other modules share.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from pydicom.errors import InvalidDicomError

#: File name endings stripped to get the image id; anything else is part of the id (SIIM names are UIDs with dots).
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Errors pydicom and its codecs raise on malformed bytes. Caught only around parsing and decoding.
PARSE_ERRORS = (
    InvalidDicomError,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    OverflowError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    OSError,
    MemoryError,
)

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
NO_PIXELS = "no pixel data (not an image object)"

# Which optional extra brings a decoder for each transfer syntax pydicom cannot decode with Pillow alone.
CODECS_HINT = "pip install 'pneumotriage[codecs]'"
CODECS_GPL_HINT = "pip install 'pneumotriage[codecs-gpl]' (GPLv3 libjpeg)"
EXTRA_FOR_SYNTAX = {
    "1.2.840.10008.1.2.4.57": CODECS_GPL_HINT,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": CODECS_GPL_HINT,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.51": CODECS_GPL_HINT,  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.80": CODECS_HINT,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": CODECS_HINT,  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.201": CODECS_HINT,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": CODECS_HINT,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": CODECS_HINT,  # HTJ2K
}


#: The largest side decoded, in pixels: a header declaring more is refused before any pixel is allocated (the
#: largest detector images are ~4,300 px a side; a 60,000 x 60,000 claim would ask for 7 GB).
MAX_SIDE = 16384
#: The most pixels one frame may hold (rows x columns x samples): checked on the header before any pixel is
#: allocated. The largest detectors give ~4,300 x 4,300 (18.5 MP); a JPEG-LS file of 73 kB declaring 16,384 x
#: 16,384 16-bit pixels took 6 GB to decode.
MAX_PIXELS = 40_000_000
#: The largest file read: a radiograph needs at most a few tens of MB (4,300 x 4,300 x 16 bits is 37 MB); a sparse
#: file with a 1.5 GB private element took 1.9 GB to read even for its header alone.
MAX_FILE_BYTES = 512 * 1024 * 1024
#: The most a deflated data set may inflate to: a 1.5 MB deflated file inflated to 5 GB.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
#: The smallest side a scan accepts: a 1 x 1 or 3 x 500 "image" is not a radiograph, and ranking one urgent
#: would be noise (the models see at least 64 px). Decoding itself takes any size.
MIN_SIDE = 64
#: What :mod:`pneumotriage.synth` writes in ImageComments: the mark of a synthetic phantom, never a patient.
SYNTHETIC_MARK = "SYNTHETIC PHANTOM - not a patient image"
#: Media Storage Directory Storage: a DICOMDIR's SOP class.
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def image_id_for(path: str | Path) -> str:
    """The image id of a file: its name less a DICOM suffix (``ID_0011fe81e.dcm`` -> ``ID_0011fe81e``).

    Only known DICOM suffixes are stripped: a SIIM file named by its UID without a suffix keeps every dot.
    """
    name = path.name if isinstance(path, PurePath) else PurePath(path).name  # a Path's own name: no parsing again
    lower = name.lower()
    for suffix in DICOM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class DicomIdentity:
    """Who and what an image is: the fields a worklist row carries, shared by headers and decoded images."""

    path: Path
    image_id: str
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient_id: str | None
    accession: str | None
    study_datetime: datetime | None
    modality: str | None
    view_position: str | None
    pixel_spacing_mm: tuple[float, float] | None


#: The fields of a worklist row a header fills in: the identity's own, less the file's path (the row has its
#: own), its series (which only the SEG and SR reference) and spacing (it becomes the outline's area).
ROW_IDENTITY = tuple(
    f.name for f in fields(DicomIdentity) if f.name not in ("path", "series_instance_uid", "pixel_spacing_mm")
)


@dataclass(frozen=True)
class DicomHeader(DicomIdentity):
    """What the header of one DICOM file says, read without touching its pixel data."""

    rows: int | None
    columns: int | None
    frames: int
    samples_per_pixel: int
    photometric: str | None
    bits_stored: int | None
    transfer_syntax: str | None
    transfer_syntax_name: str | None
    #: Why the file cannot be decoded here (no pixel data, codec missing), or None if it can.
    problem: str | None = None
    warnings: tuple[str, ...] = ()
    #: Whether the file is a synthetic phantom (ImageComments holds :data:`SYNTHETIC_MARK`).
    synthetic: bool = False

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def shape(self) -> tuple[int, int] | None:
        if self.rows is None or self.columns is None:
            return None
        return (self.rows, self.columns)

    def identity(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(DicomIdentity)}


@dataclass(frozen=True)
class SkippedFile:
    """A file met during discovery that is not a DICOM data set at all."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DicomImage(DicomIdentity):
    """A decoded radiograph: ``pixels`` is float32 H x W in [0, 1], bone bright."""

    pixels: np.ndarray
    original_shape: tuple[int, int]
    photometric: str
    transfer_syntax: str
    warnings: list[str] = field(default_factory=list)

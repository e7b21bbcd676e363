"""Reading chest radiographs from DICOM files.

Two entry points:

- :func:`read_header` / :func:`discover`: a header-only pass (pixel data is never read) that says what a file is
  and whether it can be decoded here. Used to index folders before any expensive work.
- :func:`read_dicom`: the full decode to a float32 image in [0, 1] where **higher means denser** (bone bright),
  whatever the photometric interpretation, bit depth or compression.

The grey-level pipeline follows DICOM PS3.3 C.11 (the "grayscale pipeline"): stored values -> Modality LUT
(rescale slope/intercept or a LUT) -> VOI LUT or window -> Presentation (MONOCHROME1 is inverted *after* the
LUTs) -> a robust percentile normalisation to [0, 1].

Why one module of ~770 lines: header reading, the pixel decode and the grey-level pipeline share the parsed
dataset, the header record and the list of transfer syntaxes; everything that opens a DICOM goes through here.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from pneumotriage.errors import (
    CorruptPixelDataError,
    DicomError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedTransferSyntaxError,
)
from pneumotriage.native import unit_range

__all__ = [
    "DicomHeader",
    "DicomIdentity",
    "DicomImage",
    "SkippedFile",
    "discover",
    "image_id_for",
    "decode_pixels",
    "open_image",
    "read_dicom",
    "read_header",
]

#: File name endings stripped to get the image id; anything else is part of the id (SIIM names are UIDs with dots).
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

#: Errors pydicom and its codecs raise on malformed bytes. Caught only around parsing and decoding.
_PARSE_ERRORS = (
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

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
NO_PIXELS = "no pixel data (not an image object)"

# Which optional extra brings a decoder for each transfer syntax pydicom cannot decode with Pillow alone.
_CODECS_HINT = "pip install 'pneumotriage[codecs]'"
_CODECS_GPL_HINT = "pip install 'pneumotriage[codecs-gpl]' (GPLv3 libjpeg)"
_EXTRA_FOR_SYNTAX = {
    "1.2.840.10008.1.2.4.57": _CODECS_GPL_HINT,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _CODECS_GPL_HINT,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.51": _CODECS_GPL_HINT,  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.80": _CODECS_HINT,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _CODECS_HINT,  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.201": _CODECS_HINT,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _CODECS_HINT,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _CODECS_HINT,  # HTJ2K
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
#: What marks a folder as a scan's output (its journal's signature, or a sharded scan's layout): walks pass such
#: folders over.
SCAN_MARKS = (os.path.join(".scan", "signature.json"), os.path.join(".scan", "shards.json"))
#: The entries a scan writes into its ``--out``: in a scan's output folder only these (and hidden names, such as
#: atomic writes in flight) are passed over by a walk; anything else there (the DICOMs of a folder used as its
#: own ``--out``) is an input like any other.
SCAN_OUTPUTS = frozenset(
    {".scan", "masks", "overlays", "dicom", "worklist.csv", "worklist.json", "submission.csv", "skipped.csv",
     "report.html"}
)  # fmt: skip
#: What :mod:`pneumotriage.synth` writes in ImageComments: the mark of a synthetic phantom, never a patient.
SYNTHETIC_MARK = "SYNTHETIC PHANTOM - not a patient image"
#: Media Storage Directory Storage: a DICOMDIR's SOP class.
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def image_id_for(path: str | Path) -> str:
    """The image id of a file: its name less a DICOM suffix (``ID_0011fe81e.dcm`` -> ``ID_0011fe81e``).

    Only known DICOM suffixes are stripped: a SIIM file named by its UID without a suffix keeps every dot.
    """
    name = Path(path).name
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


# --------------------------------------------------------------------------------------------------------------
# Opening files


def _sniff(path: Path) -> str:
    """'part10' for a file with the DICM preamble, 'raw' for a bare data set, else raise NotDicomError."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        # Not "not DICOM": a file that vanished or became unreadable since it was found may well be one.
        raise DicomError(
            f"cannot be read: {exc.strerror or exc}",
            path=path,
            hint="it was removed, moved or made unreadable since it was found; check it and scan again",
        ) from None
    if len(head) == 132 and head[128:132] == b"DICM":
        _check_size(path)
        return "part10"
    # A data set written without preamble starts with its lowest tag: group 0x0002 (meta) or 0x0008
    # (identifying) in either byte order. Anything else is not worth handing to a forced parse.
    if len(head) >= 8:
        group_le = int.from_bytes(head[0:2], "little")
        group_be = int.from_bytes(head[0:2], "big")
        if group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008):
            _check_size(path)
            return "raw"
    raise NotDicomError("not a DICOM file", path=path, hint="remove it from the input or point at DICOM files")


def _check_size(path: Path) -> None:
    """Refuse a DICOM file over :data:`MAX_FILE_BYTES` before parsing it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CorruptPixelDataError(
            f"the file is {size / 2**20:,.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB a radiograph needs here",
            path=path,
            hint="not a single radiograph (or padded with junk); export the image alone",
        )


def _check_inflated(path: Path) -> None:
    """Refuse a deflated data set that inflates to over :data:`MAX_INFLATED_BYTES` (a decompression bomb), by
    inflating it in pieces before pydicom inflates it whole."""
    import zlib

    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = read_file_meta_info(path)
    length = meta.get("FileMetaInformationGroupLength")
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian or length is None:
        return
    with open(path, "rb") as fh:
        # The data set starts after the preamble (128), "DICM" (4) and the meta group: its length element (12
        # bytes, explicit VR UL) and the length it gives (PS3.10 7.1).
        fh.seek(132 + 12 + int(length))
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(1 << 20):
            data = inflate.decompress(chunk, MAX_INFLATED_BYTES + 1 - total)
            total += len(data)
            while inflate.unconsumed_tail and total <= MAX_INFLATED_BYTES:
                data = inflate.decompress(inflate.unconsumed_tail, MAX_INFLATED_BYTES + 1 - total)
                total += len(data)
                if not data:
                    break
            if total > MAX_INFLATED_BYTES:
                raise CorruptPixelDataError(
                    f"its deflated data set inflates to over {MAX_INFLATED_BYTES // 2**20} MiB (a decompression bomb?)",
                    path=path,
                    hint="not a radiograph; leave it out of the input",
                )


def _ensure_transfer_syntax(ds: Dataset, notes: list[str]) -> None:
    """Give a data set read without file meta a transfer syntax matching how it was parsed."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    implicit = True if implicit is None else implicit
    little = True if little is None else little
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta.TransferSyntaxUID = syntax
    notes.append(f"no transfer syntax in the file meta; assumed {syntax.name}")


def _open(path: Path, *, header_only: bool) -> tuple[Dataset, list[str], bool]:
    """Parse ``path``; returns the data set, notes for the user and whether pixel data is present.

    With ``header_only`` pydicom stops at the pixel data element and leaves the file positioned on its tag,
    so presence is read from the next four bytes without loading any pixel value.
    """
    kind = _sniff(path)
    notes: list[str] = []
    if kind == "part10":
        try:
            _check_inflated(path)
        except _PARSE_ERRORS:
            pass  # the full parse below says what is wrong
    try:
        with warnings.catch_warnings(record=True) as caught, open(path, "rb") as fh:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fh, stop_before_pixels=header_only, force=(kind == "raw"))
            # Touch every element now, inside the guard: pydicom parses values lazily.
            for _ in ds.iterall():
                pass
            if header_only:
                little = getattr(ds, "original_encoding", (None, True))[1] is not False
                has_pixels = _next_tag_is_pixels(fh.read(4), little=little)
            else:
                has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    except _PARSE_ERRORS as exc:
        # With the DICM preamble it is a DICOM file, damaged: an error the user must hear of. Without, it is
        # most likely not DICOM at all, and is passed over.
        error = CorruptPixelDataError if kind == "part10" else NotDicomError
        raise error(
            f"DICOM header does not parse ({type(exc).__name__}: {_first_line(exc)})",
            path=path,
            hint="the file is damaged; re-export it from the PACS",
        ) from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY:
        raise NotDicomError(
            "a DICOMDIR (the index of a DICOM medium), not an image",
            path=path,
            hint="the images it indexes are scanned",
        )
    notes.extend(_first_line(w.message) for w in caught)
    if kind == "raw":
        if len(ds) == 0:
            raise NotDicomError("not a DICOM file", path=path, hint="remove it from the input")
        notes.append("no DICOM preamble or file meta; read as a bare data set")
    _ensure_transfer_syntax(ds, notes)
    return ds, notes, has_pixels


def _cut_pixel_data(path: Path) -> int | None:
    """Where a Pixel Data element starts in a file pydicom found none in (it drops an element cut short by the
    end of the file): the file is truncated. None when the file holds no such tag."""
    with open(path, "rb") as fh:
        raw = fh.read()
    for tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):  # (7FE0,0010), little then big endian
        at = raw.find(tag, 132)
        if at >= 0:
            return at
    return None


def _next_tag_is_pixels(raw: bytes, *, little: bool) -> bool:
    if len(raw) < 4:
        return False
    order: Literal["little", "big"] = "little" if little else "big"
    group = int.from_bytes(raw[0:2], order)
    element = int.from_bytes(raw[2:4], order)
    # (7FE0,0008) Float, (7FE0,0009) Double Float and (7FE0,0010) Pixel Data.
    return group == 0x7FE0 and element in (0x0008, 0x0009, 0x0010)


def _reason(exc: BaseException) -> str:
    """Why pixel data did not decode, in one line: pydicom's "exceptions were raised by all available plugins:"
    is followed by each plugin's own reason on the next lines, which are what the user needs."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        return f"{lines[0].rstrip(':')}: {'; '.join(lines[1:4])}"
    return _first_line(exc)


def _first_line(obj: object) -> str:
    text = str(obj).strip()
    return text.splitlines()[0] if text else type(obj).__name__


# --------------------------------------------------------------------------------------------------------------
# Header fields


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except _PARSE_ERRORS:
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except _PARSE_ERRORS:
        return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Row and column spacing in mm; None where missing, malformed or non-positive (``0\\0`` is common)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None:
                continue
            parts = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
        except _PARSE_ERRORS:
            continue
        if len(parts) == 2 and all(np.isfinite(p) and p > 0 for p in parts):
            return (parts[0], parts[1])
    return None


def _study_datetime(ds: Dataset) -> datetime | None:
    date = (_text(ds, "StudyDate") or _text(ds, "AcquisitionDate") or "").replace(".", "")
    if len(date) != 8 or not date.isdigit():
        return None
    time = (_text(ds, "StudyTime") or _text(ds, "AcquisitionTime") or "").replace(":", "")
    digits = time.split(".")[0]
    digits = (digits + "000000")[:6] if digits.isdigit() else "000000"
    try:
        return datetime.strptime(date + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _pixel_problem(ds: Dataset, has_pixels: bool) -> str | None:
    """Why the pixel data of ``ds`` cannot be decoded here, or None."""
    if not has_pixels:
        return NO_PIXELS
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if (rows or 0) > MAX_SIDE or (cols or 0) > MAX_SIDE:
        return f"declared size {rows} x {cols} exceeds the {MAX_SIDE} px a side this tool decodes"
    pixels = (rows or 0) * (cols or 0) * max(_int(ds, "SamplesPerPixel") or 1, 1)
    if pixels > MAX_PIXELS:
        return (
            f"declared size {rows} x {cols} ({pixels / 1e6:.0f} MP) exceeds the {MAX_PIXELS // 1_000_000} MP a frame "
            "this tool decodes"
        )
    syntax = _syntax(ds)
    if syntax is None:
        return "no transfer syntax"
    if not syntax.is_compressed:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax {syntax} ({syntax.name}): no decoder exists for it"
    if not decoder.is_available:
        return f"transfer syntax {syntax.name} needs a decoder: {_EXTRA_FOR_SYNTAX.get(str(syntax), _CODECS_HINT)}"
    bits = _int(ds, "BitsStored") or 8
    if syntax == JPEGExtended12Bit and bits > 8 and set(decoder.available_plugins) <= {"pillow"}:
        return f"12-bit {syntax.name} needs a decoder: {_CODECS_GPL_HINT}"
    return None


def _header_from(ds: Dataset, path: Path, notes: list[str], has_pixels: bool) -> DicomHeader:
    syntax = _syntax(ds)
    return DicomHeader(
        path=path,
        image_id=image_id_for(path),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        accession=_text(ds, "AccessionNumber"),
        study_datetime=_study_datetime(ds),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        frames=max(_int(ds, "NumberOfFrames") or 1, 1),
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
        photometric=_text(ds, "PhotometricInterpretation"),
        bits_stored=_int(ds, "BitsStored"),
        transfer_syntax=str(syntax) if syntax else None,
        transfer_syntax_name=syntax.name if syntax else None,
        pixel_spacing_mm=_pixel_spacing(ds),
        problem=_pixel_problem(ds, has_pixels),
        synthetic=_text(ds, "ImageComments") == SYNTHETIC_MARK,
        warnings=tuple(notes),
    )


def read_header(path: str | Path) -> DicomHeader:
    """Read the header of one file, never its pixel data. Raises :class:`NotDicomError` for non-DICOM files."""
    path = Path(path)
    ds, notes, has_pixels = _open(path, header_only=True)
    return _header_from(ds, path, notes, has_pixels)


def discover(paths: str | Path | Iterable[str | Path]) -> Iterator[DicomHeader | SkippedFile]:
    """Walk files and folders (any depth, any or no extension) and yield one result per file.

    The order is stable: each folder's files by name, then its sub-folders by name.

    Header-only: no pixel data is read. Hidden files (``.DS_Store`` and friends) are passed over, and so are
    sockets, FIFOs and devices (:func:`walk_files`).
    """
    roots = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    for path, _ in walk_files(roots):
        try:
            yield read_header(path)
        except DicomError as err:
            yield SkippedFile(path=path, reason=err.message)


def walk_files(
    roots: Iterable[Path],
    *,
    exclude: Iterable[Path] = (),
    passed: Callable[[Path, str], None] | None = None,
) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Regular files under ``roots`` (files themselves, or folders at any depth) with their ``stat``, in a stable
    order: each folder's files by name, then its sub-folders by name. Hidden files and folders are passed over,
    and so are sockets, FIFOs and devices, never opened (opening a FIFO blocks), folders reached through a
    symbolic link (as ``os.walk`` does: no loops), and in scans' output folders (marked by :data:`SCAN_MARKS`, or
    named in ``exclude``) the scan's own outputs (:data:`SCAN_OUTPUTS`): a scan whose ``--out`` lies inside its
    input, or is one of its folders, never reads its own or an earlier scan's outputs, and still reads every other
    file there. Each file or folder passed over for any other reason is handed to ``passed`` with why (a scan lists
    them in skipped.csv: nothing found goes unaccounted for). A path that cannot be ``stat``-ed comes with None:
    reading it then says why."""
    skip = set()
    for folder in exclude:
        try:
            info = os.stat(folder)
            skip.add((info.st_dev, info.st_ino))
        except OSError:
            pass  # not made yet: nothing of it to find
    tell = passed or (lambda path, why: None)
    for root in roots:
        for path in _paths(root, skip, tell):
            try:
                st: os.stat_result | None = path.stat()
            except OSError:
                st = None
            if st is None or stat.S_ISREG(st.st_mode):
                yield path, st
            else:
                tell(path, f"not a regular file ({_kind(st.st_mode)}): never opened")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device")):
        if test(mode):
            return name
    return "a device" if stat.S_ISBLK(mode) else "a special file"


def _paths(root: Path, skip: set[tuple[int, int]], tell: Callable[[Path, str], None]) -> Iterator[Path]:
    """Depth first with a stack, not recursion: a folder nested thousands deep is walked like any other. Folders
    are told apart by (device, inode), never by resolving long paths."""
    if not root.is_dir():
        yield root  # a file, or a path that reading will report
        return
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        excluded = False
        if skip:
            try:
                st = os.stat(folder)
            except OSError:
                continue
            excluded = (st.st_dev, st.st_ino) in skip
        try:
            with os.scandir(folder) as it:
                everything = list(it)
        except OSError as exc:
            tell(Path(folder), f"folder cannot be read ({exc.strerror or exc}): not walked")
            continue
        output = excluded or (
            any(e.name == ".scan" for e in everything)
            and any(os.path.isfile(os.path.join(folder, mark)) for mark in SCAN_MARKS)
        )
        entries = []
        for e in sorted(everything, key=lambda e: e.name):
            if output and (e.name in SCAN_OUTPUTS or e.name.startswith(".")):
                continue  # a scan's own outputs (masks, overlays, CSVs, its journal): never an input
            if e.name.startswith("."):
                what = "folder" if _is_dir(e) else "file"
                tell(Path(e.path), f"hidden {what} (its name starts with '.'): not scanned; rename it to include it")
                continue
            entries.append(e)
        folders = []
        for entry in entries:
            if not _is_dir(entry):
                yield Path(entry.path)
            elif entry.is_symlink():
                tell(Path(entry.path), "a link to a folder: not followed (name the folder itself to scan it)")
            else:
                folders.append(entry.path)
        stack.extend(reversed(folders))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# Pixels


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
    ds, notes, has_pixels = _open(path, header_only=False)
    header = _header_from(ds, path, notes, has_pixels)
    if header.problem is not None:
        if not has_pixels:
            at = _cut_pixel_data(path)
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


def decode_pixels(ds: Dataset, header: DicomHeader, notes: list[str], *, reduce_to: int | None = None) -> DicomImage:
    """The pixels of a data set from :func:`open_image`, decoded as :func:`read_dicom` describes."""
    path = header.path
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    source_shape = check_jpeg_size(ds, header)
    check_pixel_data(ds, header)
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
    except _PARSE_ERRORS as exc:
        raise CorruptPixelDataError(
            f"pixel data does not decode ({_reason(exc)})",
            path=path,
            hint="the file is truncated or damaged; re-export it",
        ) from None
    notes.extend(_first_line(w.message) for w in caught)
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
    except _PARSE_ERRORS as exc:
        raise CorruptPixelDataError(
            f"pixel data does not decode ({_reason(exc)})",
            path=header.path,
            hint="the file is truncated or damaged; re-export it",
        ) from None
    return np.asarray(arr)


def jpeg_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG codestream's start-of-frame marker, read without decoding; None where the
    stream has no readable SOF before its scan data."""
    i, n = 2, len(frame)
    if n < 4 or frame[0] != 0xFF or frame[1] != 0xD8:
        return None
    while i + 4 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry precision, rows, columns (ITU T.81 B.2.2).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            return int.from_bytes(frame[i + 5 : i + 7], "big"), int.from_bytes(frame[i + 7 : i + 9], "big")
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def jpeg_frame(ds: Dataset) -> bytes | None:
    """The first frame's JPEG codestream of an encapsulated JPEG Baseline/Extended data set, else None."""
    if _syntax(ds) not in (JPEGBaseline8Bit, JPEGExtended12Bit) or "PixelData" not in ds:
        return None
    try:
        frames = _int(ds, "NumberOfFrames") or 1
        return next(generate_frames(ds.PixelData, number_of_frames=frames))
    except _PARSE_ERRORS + (StopIteration,):
        return None


def check_jpeg_size(ds: Dataset, header: DicomHeader) -> tuple[int, int] | None:
    """The size a JPEG image's own codestream declares, checked against the header's Rows and Columns: a header
    that disagrees with its pixel data raises :class:`CorruptPixelDataError` naming both sizes, before any
    decoding (a mask of the header's size would not fit the image). None for other encodings."""
    frame = jpeg_frame(ds)
    size = jpeg_frame_size(frame) if frame is not None else None
    if size is None:
        return None
    if header.shape is not None and size != header.shape:
        raise CorruptPixelDataError(
            f"the header says {header.rows} x {header.columns} px but the JPEG pixel data is {size[0]} x {size[1]}",
            path=header.path,
            hint="the header is inconsistent with its image; re-export it",
        )
    if max(size) > MAX_SIDE:
        raise CorruptPixelDataError(
            f"the JPEG pixel data declares {size[0]} x {size[1]} px, over the {MAX_SIDE} px a side this tool decodes",
            path=header.path,
            hint="re-export the image",
        )
    return size


#: The end-of-image marker that ends a JPEG, JPEG-LS or JPEG 2000 codestream (EOI / EOC).
_END_MARKER = b"\xff\xd9"
#: A run of zero bytes at least this long, and at least 1/64 of the codestream, is damage, not an image: entropy-
#: coded data of a real image has no long zero runs (the SIIM sample's longest is 10 bytes), and even a flat band
#: of the image, which can code as zero bits, costs a tiny share of the stream's bytes.
_ZERO_RUN = 1024


def check_pixel_data(ds: Dataset, header: DicomHeader) -> None:
    """Refuse pixel data that would decode to a wrong image with no error: native pixel data holding more than one
    frame's bytes while the header declares one frame (it would decode as a strip of one frame), and a compressed
    first frame whose codestream does not end with its end marker (cut short: the decoder fills the rest) or holds
    a long run of zero bytes (a damaged or zeroed stretch: it decodes to plausible noise). Raises
    :class:`CorruptPixelDataError` naming the file."""
    syntax = _syntax(ds)
    if syntax is None or "PixelData" not in ds:
        return
    path = header.path
    if not syntax.is_compressed:
        bits = _int(ds, "BitsAllocated") or 0
        if bits < 8 or header.shape is None:
            return
        frame = header.shape[0] * header.shape[1] * header.samples_per_pixel * (bits // 8)
        held = len(ds.PixelData)
        if frame and header.frames == 1 and held >= 2 * frame:
            raise CorruptPixelDataError(
                f"pixel data holds {held} bytes, {held // frame} frames of {header.rows} x {header.columns} px, but "
                "the header declares one frame (no NumberOfFrames)",
                path=path,
                hint="the header is inconsistent with its pixel data; re-export the image",
            )
        return
    if str(syntax) in _UNMARKED:  # RLE Lossless and deflate have no end marker
        return
    try:
        stream = next(generate_frames(ds.PixelData, number_of_frames=max(header.frames, 1)))
    except _PARSE_ERRORS + (StopIteration,):
        return  # the decoder says what is wrong
    end = stream.rstrip(b"\x00")
    if not end.endswith(_END_MARKER):
        raise CorruptPixelDataError(
            f"the compressed pixel data ({len(stream)} bytes) does not end with its end marker: cut short",
            path=path,
            hint="the copy is incomplete or damaged; copy or export it again",
        )
    run = max(_ZERO_RUN, len(stream) // 64)
    at = end.find(b"\x00" * run)
    if at >= 0:
        raise CorruptPixelDataError(
            f"the compressed pixel data holds a run of over {run} zero bytes from byte {at}: a damaged stretch",
            path=path,
            hint="the file is damaged; copy or export it again",
        )


#: Compressed transfer syntaxes whose frames carry no end-of-image marker.
_UNMARKED = frozenset({"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99"})


def plain_jpeg8(ds: Dataset, header: DicomHeader) -> bool:
    """Whether the image is one 8-bit grey JPEG Baseline frame (all of SIIM): a JPEG codec decodes it to its grey
    values directly, which lets it reduce the image as it decodes (:func:`codec_reduces`) or decode it on a GPU."""
    return (
        header.transfer_syntax == JPEGBaseline8Bit
        and header.frames == 1
        and header.samples_per_pixel == 1
        and header.photometric in ("MONOCHROME1", "MONOCHROME2")
        and int(ds.get("BitsAllocated", 0) or 0) == 8
    )


def codec_reduces(ds: Dataset, header: DicomHeader, reduce_to: int) -> bool:
    """Whether ``decode_pixels(..., reduce_to=reduce_to)`` decodes this image smaller than stored, in the JPEG
    codec (a :func:`plain_jpeg8` image at least twice ``reduce_to`` a side)."""
    return plain_jpeg8(ds, header) and header.shape is not None and min(header.shape) >= 2 * reduce_to


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
        except _PARSE_ERRORS as exc:
            raise LutError(f"its palette colour lookup table is damaged ({_first_line(exc)})") from None
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
    except _PARSE_ERRORS as exc:
        # Not optional: the Modality LUT says what the stored values stand for; without it they would be misread.
        raise LutError(f"its Modality LUT is damaged ({_first_line(exc)}): the stored values cannot be read") from None
    if "WindowCenter" in ds and "VOILUTSequence" not in ds and not _window_usable(ds):
        notes.append(f"window {ds.get('WindowCenter')}/{ds.get('WindowWidth')} is not usable; not applied")
    elif "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        except _PARSE_ERRORS as exc:  # optional (how to display, not what the values are): a note, not a refusal
            notes.append(f"VOI LUT/window not applied ({_first_line(exc)})")
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
    return _text(ds, "PresentationLUTShape") == "INVERSE"


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


def describe(found: DicomHeader | SkippedFile, *, decode: bool = False) -> dict[str, Any]:
    """One row of `pneumotriage inspect`: what :func:`discover` found in a file (with ``decode``, the pixel data
    is decoded too, so its warnings and problems show), as plain values for a table or JSON."""
    if isinstance(found, SkippedFile):
        return {"path": str(found.path), "status": "skip", "reason": found.reason}
    h = found
    row: dict[str, Any] = {
        "path": str(h.path),
        "status": "ok" if h.usable else "skip",
        "reason": h.problem,
        "image_id": h.image_id,
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "patient_id": h.patient_id,
        "modality": h.modality,
        "view_position": h.view_position,
        "rows": h.rows,
        "columns": h.columns,
        "frames": h.frames,
        "photometric": h.photometric,
        "bits_stored": h.bits_stored,
        "transfer_syntax": h.transfer_syntax,
        "transfer_syntax_name": h.transfer_syntax_name,
        "pixel_spacing_mm": list(h.pixel_spacing_mm) if h.pixel_spacing_mm else None,
        "study_datetime": h.study_datetime.isoformat() if h.study_datetime else None,
        "warnings": list(h.warnings),
    }
    if decode and h.usable:
        try:
            image = read_dicom(h.path)
            row["warnings"] = image.warnings
        except DicomError as exc:
            row["status"], row["reason"] = "skip", exc.message
    return row

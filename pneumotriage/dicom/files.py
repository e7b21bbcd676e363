"""Opening a file: sniffing it, refusing what cannot be a radiograph before it is parsed (size, an inflation
bomb), and parsing it with pydicom (header only, or whole).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumotriage.dicom.base import MAX_FILE_BYTES, MAX_INFLATED_BYTES, MEDIA_DIRECTORY, PARSE_ERRORS, PIXEL_TAGS
from pneumotriage.errors import (
    CorruptPixelDataError,
    DicomError,
    NotDicomError,
)


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


def open_dataset(path: Path, *, header_only: bool) -> tuple[Dataset, list[str], bool]:
    """Parse ``path``; returns the data set, notes for the user and whether pixel data is present.

    With ``header_only`` pydicom stops at the pixel data element and leaves the file positioned on its tag,
    so presence is read from the next four bytes without loading any pixel value.
    """
    kind = _sniff(path)
    notes: list[str] = []
    if kind == "part10":
        try:
            _check_inflated(path)
        except PARSE_ERRORS:
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
                has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    except PARSE_ERRORS as exc:
        # With the DICM preamble it is a DICOM file, damaged: an error the user must hear of. Without, it is
        # most likely not DICOM at all, and is passed over.
        error = CorruptPixelDataError if kind == "part10" else NotDicomError
        raise error(
            f"DICOM header does not parse ({type(exc).__name__}: {first_line(exc)})",
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
    notes.extend(first_line(w.message) for w in caught)
    if kind == "raw":
        if len(ds) == 0:
            raise NotDicomError("not a DICOM file", path=path, hint="remove it from the input")
        notes.append("no DICOM preamble or file meta; read as a bare data set")
    _ensure_transfer_syntax(ds, notes)
    return ds, notes, has_pixels


def cut_pixel_data(path: Path) -> int | None:
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


def reason_of_error(exc: BaseException) -> str:
    """Why pixel data did not decode, in one line: pydicom's "exceptions were raised by all available plugins:"
    is followed by each plugin's own reason on the next lines, which are what the user needs."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        return f"{lines[0].rstrip(':')}: {'; '.join(lines[1:4])}"
    return first_line(exc)


def first_line(obj: object) -> str:
    text = str(obj).strip()
    return text.splitlines()[0] if text else type(obj).__name__

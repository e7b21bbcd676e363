"""JPEG codestreams inside DICOM: their own frame size, the checks that refuse damaged pixel data before it
decodes to a plausible wrong image, and which images a JPEG codec decodes directly.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

from pneumotriage.dicom.base import MAX_SIDE, PARSE_ERRORS, DicomHeader
from pneumotriage.dicom.header import int_of, syntax_of
from pneumotriage.errors import (
    CorruptPixelDataError,
)


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
    if syntax_of(ds) not in (JPEGBaseline8Bit, JPEGExtended12Bit) or "PixelData" not in ds:
        return None
    try:
        frames = int_of(ds, "NumberOfFrames") or 1
        return next(generate_frames(ds.PixelData, number_of_frames=frames))
    except PARSE_ERRORS + (StopIteration,):
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
    syntax = syntax_of(ds)
    if syntax is None or "PixelData" not in ds:
        return
    path = header.path
    if not syntax.is_compressed:
        bits = int_of(ds, "BitsAllocated") or 0
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
    except PARSE_ERRORS + (StopIteration,):
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

"""PNG files for masks, written in time proportional to the mask's outline, not to the image.

A full-size mask is mostly empty rows. A PNG's pixel data is one zlib stream, and a deflate stream may be cut
into independently compressed pieces, each ended by a full flush (byte-aligned, no reference back across the
cut), as parallel gzip does. Runs of empty rows are therefore written from a few pieces compressed once and
reused, and only the rows that hold the mask are compressed; the Adler-32 of a run of zero bytes is computed
in closed form. Decoders see an ordinary 8-bit greyscale PNG (0 and 255).
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADLER_MOD = 65521
#: Empty-row pieces are made for runs of these many rows and combined greedily.
_RUNS = (1024, 256, 16, 1)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _deflate_piece(data: bytes) -> bytes:
    """Raw deflate of ``data`` ended by a full flush: a piece that can be concatenated with others."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=64)
def _empty_rows_piece(width: int, rows: int) -> bytes:
    return _deflate_piece(bytes((width + 1) * rows))  # each row: filter byte 0, then zero pixels


def _adler_zeros(adler: int, n: int) -> int:
    """Adler-32 after ``n`` more zero bytes: the first sum is unchanged, the second grows by n times the first."""
    a, b = adler & 0xFFFF, adler >> 16
    return ((b + n * a) % _ADLER_MOD) << 16 | a


def _empty_rows(width: int, rows: int) -> bytes:
    parts = []
    for run in _RUNS:
        count, rows = divmod(rows, run)
        parts.extend([_empty_rows_piece(width, run)] * count)
    return b"".join(parts)


def mask_png(crop: np.ndarray, top: int, left: int, shape: tuple[int, int]) -> bytes:
    """A ``shape`` (rows, columns) 8-bit greyscale PNG that is 255 where ``crop`` (a boolean window whose top-left
    corner is at (``top``, ``left``)) is set and 0 everywhere else."""
    height, width = shape
    crop = np.asarray(crop, dtype=bool)
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        top, h, body = height, 0, b""
    else:
        rows = np.zeros((h, width + 1), dtype=np.uint8)  # column 0: filter type None
        rows[:, 1 + left : 1 + left + w] = crop * np.uint8(255)
        body = rows.tobytes()
    adler = _adler_zeros(1, (width + 1) * top)
    adler = zlib.adler32(body, adler)
    adler = _adler_zeros(adler, (width + 1) * (height - top - h))
    stream = b"".join(
        (
            b"\x78\x01",  # zlib header: deflate, 32 KiB window, fastest
            _empty_rows(width, top),
            _deflate_piece(body) if h else b"",
            _empty_rows(width, height - top - h),
            b"\x03\x00",  # a final, empty block with fixed codes
            struct.pack(">I", adler),
        )
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")

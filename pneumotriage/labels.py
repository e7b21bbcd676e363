"""SIIM-ACR label files (run-length CSVs): reading them, whatever their quirks, and writing them.

Label CSVs in the wild vary: a UTF-8 BOM, no header row, a header ``ImageId, EncodedPixels`` with a space,
values with leading spaces, CRLF line ends, no final newline, gzip compression. All are read here. An image may
have several rows (one per annotated region); its mask is the logical OR of all rows, never their sum.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from pneumotriage.errors import LabelError, MissingLabelsError, RleError
from pneumotriage.io import atomic_write_text
from pneumotriage.rle import EMPTY, rle_decode, rle_encode, rle_runs

__all__ = ["RleLabels", "read_rle_csv", "write_rle_csv"]

#: The competition's image size; labels carry no size of their own.
SIIM_SHAPE = (1024, 1024)


class RleLabels(dict[str, list[str]]):
    """Image id -> its run-length strings (an empty list for a negative image), as read from one CSV.

    A ``dict`` so it can be used as one; it also remembers where each row came from, so decoding errors can name
    the file and the row.
    """

    def __init__(self, path: Path | None = None, *, relative: bool = True) -> None:
        super().__init__()
        self.path = path
        self.relative = relative
        self.row_numbers: dict[str, list[int]] = {}
        #: Rows passed over in non-strict reading, as one-line messages.
        self.errors: list[str] = []

    def positive(self, image_id: str) -> bool:
        return bool(self[image_id])

    def masks_for(self, image_id: str, height: int = SIIM_SHAPE[0], width: int = SIIM_SHAPE[1]) -> np.ndarray:
        """The union (logical OR) of every row of ``image_id`` as a (height, width) boolean mask."""
        try:
            rows = self[image_id]
        except KeyError:
            raise LabelError(f"no label for image {image_id!r}", path=self.path) from None
        mask = np.zeros((height, width), dtype=bool)
        for rle, row in zip(rows, self.row_numbers.get(image_id, [0] * len(rows)), strict=True):
            try:
                mask |= rle_decode(rle, height, width, relative=self.relative)
            except RleError as err:
                raise LabelError(
                    f"row {row} ({image_id}): {err.message} for a {height}x{width} image",
                    path=self.path,
                    hint="fix or remove that row, or give the right image size",
                ) from None
        return mask


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MissingLabelsError(f"cannot be read: {exc.strerror or exc}", path=path, hint="check the path") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise LabelError(f"gzip data is damaged ({exc})", path=path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelError("not UTF-8 text", path=path, hint="save the CSV as UTF-8") from None


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "")


def read_rle_csv(path: str | Path, *, relative: bool = True, strict: bool = True) -> RleLabels:
    """Read a SIIM-style label or submission CSV.

    Every RLE string is checked for syntax (integers, pairs, no negative value; order for the absolute form).
    With ``strict`` (the default) the first malformed row raises a :class:`LabelError` naming its row number;
    otherwise such rows are passed over and listed in ``labels.errors``.
    """
    path = Path(path)
    labels = RleLabels(path, relative=relative)
    # One RLE of a large pneumothorax runs to 614,404 characters, past csv's default field limit of 131,072.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    id_col, rle_col, n_cols = 0, 1, 2
    first = True
    for fields in reader:
        row = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        cells = [f.strip() for f in fields]
        if first:
            first = False
            names = [_norm(c) for c in cells]
            if "imageid" in names:
                if "encodedpixels" not in names:
                    raise LabelError(f"row {row}: header has ImageId but no EncodedPixels column", path=path)
                id_col, rle_col, n_cols = names.index("imageid"), names.index("encodedpixels"), len(cells)
                continue
        try:
            if len(cells) < 2 or (n_cols == 2 and len(cells) > 2):
                raise LabelError(f"expected 2 columns (ImageId, EncodedPixels), found {len(cells)}")
            image_id, rle = cells[id_col], cells[rle_col]
            if not image_id:
                raise LabelError("empty ImageId")
            rle_runs(rle, relative=relative)
        except LabelError as err:
            message = f"row {row}: {err.message}"
            if strict:
                raise LabelError(message, path=path, hint="fix or remove that row") from None
            labels.errors.append(message)
            continue
        entries = labels.setdefault(image_id, [])
        lines = labels.row_numbers.setdefault(image_id, [])
        if rle not in ("", EMPTY):
            entries.append(rle)
            lines.append(row)
    return labels


def write_rle_csv(
    path: str | Path,
    rows: Mapping[str, str | np.ndarray] | Iterable[tuple[str, str | np.ndarray]],
    *,
    relative: bool = True,
) -> None:
    """Write a Kaggle submission: header ``ImageId,EncodedPixels``, one row per image, ``-1`` when empty.

    Values may be RLE strings (written as given, stripped) or masks (encoded here). Written atomically.
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    seen: set[str] = set()
    out = io.StringIO()
    # Quoted by the csv module where a value needs it (an image id holding a comma, quote or newline): every
    # row reads back as written. SIIM's ids never need it, so a SIIM submission is byte for byte the plain form.
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    for image_id, value in items:
        if image_id in seen:
            raise LabelError(f"image {image_id!r} given twice; a submission has one row per image", path=path)
        seen.add(image_id)
        rle = (value.strip() or EMPTY) if isinstance(value, str) else rle_encode(value, relative=relative)
        writer.writerow([image_id, rle])
    atomic_write_text(path, out.getvalue())

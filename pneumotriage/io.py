"""Files: atomic writes (a reader never sees a half-written output, and an interrupted run leaves the old file),
a file's sha256 and its identity key, and text made safe to print."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import json.encoder
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

#: A string as JSON, ASCII only (json's own function: its C version where there is one).
_json_text = json.encoder.encode_basestring_ascii

# Files made by mkstemp are private (0600); outputs get the permissions an ordinary open() would give them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_MODE = 0o666 & ~_UMASK


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_key(path: Path, st: os.stat_result | None = None, real: str | None = None) -> str:
    """A file's identity for resuming and caching: its real path (``real`` where the caller has it), size,
    modification time, inode and status-change time, so that a changed file is redone. Size and mtime alone miss
    a file replaced by another of the same size whose mtime was set back (``cp --preserve``, ``touch -r``, an
    archive's extraction); the inode changes when it is replaced by a rename, and the ctime, which no user can
    set, whenever its content or name is written."""
    st = st or path.stat()
    return f"{real or os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) made None, through dicts, lists and tuples:
    what JSON can hold (strict JSON has no NaN or Infinity; ``json.dumps`` writes them unless told not to)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``value`` as strict JSON: undefined numbers as ``null``, never ``NaN`` or ``Infinity``.

    With ``indent`` alone (the worklist's JSON), written here, byte for byte what ``json.dumps`` writes: its
    indented form is made by its pure-Python encoder, one generator step a value, ~4x slower (a 512-row worklist
    took ~20 ms). Anything this does not handle (a key that is not text, a type json converts or refuses, a cycle)
    goes to ``json.dumps`` as before."""
    indent = kwargs.get("indent")
    if kwargs.keys() == {"indent"} and type(indent) is int and indent >= 0:
        chunks: list[str] = []
        try:
            _indented(value, chunks, "\n", "\n" + " " * indent)
        except (_NotPlain, RecursionError):
            pass
        else:
            return "".join(chunks)
    return json.dumps(finite(value), allow_nan=False, **kwargs)


class _NotPlain(Exception):
    """A value :func:`_indented` leaves to ``json.dumps``."""


def _indented(value: Any, out: list[str], pad: str, step: str) -> None:
    """``json.dumps(finite(value), indent=...)`` of ``value`` appended to ``out`` in pieces: ``pad`` is the newline
    and indentation of its own level, ``step`` adds one level. The types are tested in json's order; the items of
    a list or dict whose type is exactly a plain scalar are written without a call of their own."""
    if isinstance(value, str):
        out.append(_json_text(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_json_float(value))
    elif isinstance(value, list | tuple | dict):
        items: Iterator[tuple[str, Any]]
        if not value:
            out.append("[]" if isinstance(value, list | tuple) else "{}")
            return
        inner = pad + step[1:]
        if isinstance(value, list | tuple):  # json's order: a list before a dict
            opening, closing, items = "[", "]", zip(itertools.repeat(""), value, strict=False)
        else:
            flat = _flat_dict(value, inner)
            if flat is not None:
                out.append(f"{{{inner}{flat[1:-1]}{pad}}}")
                return
            opening, closing, items = "{", "}", zip([_json_key(k) for k in value], value.values(), strict=True)
        out.append(opening)
        separator = inner
        for label, item in items:
            scalar = _SCALARS.get(type(item))
            if scalar is not None:
                out.append(f"{separator}{label}{scalar(item)}")
            else:
                out.append(separator + label)
                _indented(item, out, inner, step)
            separator = "," + inner
        out.append(pad + closing)
    else:
        raise _NotPlain


#: json's C encoder (absent from Pythons built without it).
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
#: json's C encoder of flat dicts, by the newline and indentation between items (see :func:`_flat_dict`).
_FLAT_ENCODERS: dict[str, Any] = {}
#: The types a flat dict's values may have: json's C encoder writes each as its indented form does.
_FLAT_TYPES = frozenset({str, int, float, bool, type(None)})


def _flat_dict(value: Any, inner: str) -> str | None:
    """A dict of text keys and plain values (a worklist row) in json's compact form with ``inner`` between its
    items, by json's C encoder: the indented form is then its braces moved onto lines of their own. None for any
    other dict (a nested value, a key that is not text, a float that is not finite), and where json has no C
    encoder."""
    if type(value) is not dict or _C_ENCODER is None:
        return None
    for key, item in value.items():
        if type(key) is not str or type(item) not in _FLAT_TYPES:
            return None
    encode = _FLAT_ENCODERS.get(inner)
    if encode is None:
        # (markers, default, encoder, indent, key separator, item separator, sort_keys, skipkeys, allow_nan)
        encode = _C_ENCODER(None, None, _json_text, None, ": ", "," + inner, False, False, False)
        _FLAT_ENCODERS[inner] = encode
    try:
        return "".join(encode(value, 0))
    except ValueError:  # a float that is not finite: written as null by the caller's own path
        return None


def _json_key(key: Any) -> str:
    """A dict's key and the colon after it; a key that is not text is left to json.dumps."""
    if type(key) is not str:
        raise _NotPlain
    return _json_text(key) + ": "


def _json_float(value: float) -> str:
    return float.__repr__(value) if math.isfinite(value) else "null"


#: How json writes a value whose type is exactly one of these (a subclass takes :func:`_indented`'s own order).
_SCALARS: dict[type, Any] = {
    str: _json_text,
    int: int.__repr__,
    float: _json_float,
    type(None): lambda _: "null",
    bool: lambda v: "true" if v else "false",
}


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8: a file name that is not valid UTF-8 (Python holds its bytes as lone
    surrogates) is shown with those bytes as ``\\xNN`` escapes, so a worklist names it and never fails to be
    written. Valid text comes back unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


#: What makes a spreadsheet read a cell as a formula (OWASP "CSV injection"): its first character.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(text: str) -> str:
    """``text`` as a CSV cell no spreadsheet runs: one that starts like a formula (``=HYPERLINK(...)``,
    ``+cmd|...``, ``@SUM``, ``-2+3``) gets a leading apostrophe, as OWASP recommends; anything else is unchanged."""
    return "'" + text if text.startswith(FORMULA_START) else text


def terminal_safe(text: str) -> str:
    """``text`` without the control characters that a terminal acts on (escape sequences, carriage returns,
    bells): each is shown as ``\\xNN``. A file name can hold any of them."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@contextlib.contextmanager
def _atomic(path: str | Path, mode: str, *, durable: bool = True) -> Iterator[Any]:
    """A temporary file beside ``path``, opened in ``mode``; on success it is (synced and) renamed over ``path``,
    on any failure deleted, so ``path`` holds the old content or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it over ``path``.

    ``durable=False`` skips the fsync: the rename still means no reader (and no killed process) ever sees a
    partial file, but a power cut may lose it. For many small files whose loss a journal can detect."""
    with _atomic(path, "wb", durable=durable) as fh:
        fh.write(data)


def store_files(paths: Sequence[Path], contents: Sequence[bytes]) -> None:
    """Write small files that a journal or a later run can make again: each atomic (:func:`atomic_write_bytes`),
    none synced."""
    for path, data in zip(paths, contents, strict=True):
        atomic_write_bytes(path, data, durable=False)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write a large file piece by piece; it appears at ``path`` complete, or not at all."""
    with _atomic(path, "wb") as fh:
        yield fh

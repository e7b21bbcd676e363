"""Walking inputs: the regular files under folders, streamed, each passed over with a reason where it cannot be
an input, and the header pass over them (:func:`discover`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

from pneumotriage.dicom.base import DicomHeader, SkippedFile
from pneumotriage.dicom.header import read_header
from pneumotriage.errors import (
    DicomError,
)
from pneumotriage.outlayout import OUTPUTS, scan_outputs_in


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


#: Which of a folder's entries (its path, their names) are outputs a walk passes over.
OutputRule = Callable[[str, set[str]], Collection[str]]


def walk_files(
    roots: Iterable[Path],
    *,
    exclude: Iterable[Path] = (),
    passed: Callable[[Path, str], None] | None = None,
    outputs: OutputRule = scan_outputs_in,
) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Regular files under ``roots`` (files themselves, or folders at any depth) with their ``stat``, in a stable
    order: each folder's files by name, then its sub-folders by name. Hidden files and folders are passed over,
    and so are sockets, FIFOs and devices, never opened (opening a FIFO blocks), folders reached through a
    symbolic link (as ``os.walk`` does: no loops), and the entries ``outputs`` names as outputs in a folder (by
    default a scan's, in a folder marked as its ``--out``: :func:`pneumotriage.outlayout.scan_outputs_in`; all of
    them in the folders named in ``exclude``), hidden ones there included: a scan whose ``--out`` lies inside its
    input, or is one of its folders, never reads its own or an earlier scan's outputs, and still reads every other
    file there. Each file or folder passed over for any other reason is handed to ``passed`` with why (a scan lists
    them in skipped.csv: nothing found goes unaccounted for). A path that cannot be ``stat``-ed comes with None:
    reading it then says why."""
    for path, st, _ in walk_entries(roots, exclude=exclude, passed=passed, outputs=outputs):
        yield path, st


def walk_entries(
    roots: Iterable[Path],
    *,
    exclude: Iterable[Path] = (),
    passed: Callable[[Path, str], None] | None = None,
    outputs: OutputRule = scan_outputs_in,
) -> Iterator[tuple[Path, os.stat_result | None, bool]]:
    """:func:`walk_files`'s files, each with whether its path is a symbolic link: known from its folder's
    listing, with no ``lstat`` of its own."""
    skip = set()
    for folder in exclude:
        try:
            info = os.stat(folder)
            skip.add((info.st_dev, info.st_ino))
        except OSError:
            pass  # not made yet: nothing of it to find
    tell = passed or (lambda path, why: None)
    for root in roots:
        for path, link in _paths(root, skip, tell, outputs):
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            if st is None or stat.S_ISREG(st.st_mode):
                yield path, st, link
            else:
                tell(path, f"not a regular file ({_kind(st.st_mode)}): never opened")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device")):
        if test(mode):
            return name
    return "a device" if stat.S_ISBLK(mode) else "a special file"


def _paths(
    root: Path, skip: set[tuple[int, int]], tell: Callable[[Path, str], None], outputs: OutputRule
) -> Iterator[tuple[Path, bool]]:
    """Each path with whether it is a symbolic link. Depth first with a stack, not recursion: a folder nested
    thousands deep is walked like any other. Folders are told apart by (device, inode), never by resolving long
    paths."""
    if not root.is_dir():
        yield root, os.path.islink(root)  # a file, or a path that reading will report
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
        own = OUTPUTS if excluded else outputs(folder, {e.name for e in everything})
        entries = []
        for e in sorted(everything, key=lambda e: e.name):
            if own and (e.name in own or e.name.startswith(".")):
                continue  # a scan's own outputs (masks, overlays, CSVs, its journal): never an input
            if e.name.startswith("."):
                what = "folder" if _is_dir(e) else "file"
                tell(Path(e.path), f"hidden {what} (its name starts with '.'): not scanned; rename it to include it")
                continue
            entries.append(e)
        folders = []
        for entry in entries:
            if not _is_dir(entry):
                yield Path(entry.path), _is_link(entry)
            elif entry.is_symlink():
                tell(Path(entry.path), "a link to a folder: not followed (name the folder itself to scan it)")
            else:
                folders.append(entry.path)
        stack.extend(reversed(folders))


def _is_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()  # the listing's own type: no system call where the file system gives it
    except OSError:
        return os.path.islink(entry.path)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False

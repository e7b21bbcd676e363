"""Stage 1, discover: walk files and folders and hand each regular file on as soon as it is found.

The walk runs in a thread and feeds a queue, so decoding starts on the first files while a large folder is
still being listed. Only names and ``stat`` results are read here: the files themselves are opened by the
worker processes. Sockets, FIFOs and devices are passed over without being opened (opening a FIFO blocks).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pneumotriage.dicom import image_id_for, walk_files


@dataclass(frozen=True)
class Found:
    """One file to scan: where it is, its image id and its identity key (real path, size, mtime)."""

    path: Path
    image_id: str
    key: str


def file_key(path: Path, st: os.stat_result | None = None, real: str | None = None) -> str:
    """A file's identity for resuming: its real path (``real`` where the caller has it), size and modification
    time (a changed file is redone)."""
    st = st or path.stat()
    return f"{real or os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def found_files(roots: Iterable[Path], *, exclude: Iterable[Path] = ()) -> Iterator[Found]:
    """:func:`pneumotriage.dicom.walk_files` (regular files only, never opened here), each keyed, and each file
    once: a file reached twice (named twice, or through a symbolic link to a sibling) is scanned under the first
    path it was found by."""
    seen: set[str] = set()
    for path, st in walk_files(roots, exclude=exclude):
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        key = file_key(path, st, real) if st is not None else f"{path}|missing"
        yield Found(path, image_id_for(path), key)


_END = object()


class Discovery:
    """:func:`found_files` in a background thread. :meth:`poll` returns what was found so far without waiting;
    :attr:`finished` says whether the walk is over. Errors of the walk itself are re-raised by :meth:`poll`."""

    def __init__(
        self, roots: Iterable[Path], files: Iterator[Found] | None = None, *, exclude: Iterable[Path] = ()
    ) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._files = files if files is not None else found_files(list(roots), exclude=exclude)
        self._error: BaseException | None = None
        self.finished = False
        self.count = 0
        self._thread = threading.Thread(target=self._run, name="scan-discover", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._files:
                self._queue.put(item)
        except BaseException as exc:  # handed to the scanning thread, which re-raises it
            self._error = exc
        finally:
            self._queue.put(_END)

    def poll(self, limit: int, timeout: float | None = 0.0) -> list[Found]:
        """Up to ``limit`` files found so far; waits up to ``timeout`` seconds for the first one (None: until one
        comes or the walk ends)."""
        got: list[Found] = []
        while len(got) < limit and not self.finished:
            try:
                item = self._queue.get(block=not got and timeout != 0.0, timeout=timeout if not got else None)
            except queue.Empty:
                break
            if item is _END:
                self.finished = True
                if self._error is not None:
                    raise self._error
                break
            assert isinstance(item, Found)
            got.append(item)
            self.count += 1
        return got

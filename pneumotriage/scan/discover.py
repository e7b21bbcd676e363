"""Stage 1, discover: walk files and folders and hand each regular file on as soon as it is found.

The walk runs in a thread and feeds a queue, so decoding starts on the first files while a large folder is
still being listed. Only names and ``stat`` results are read here: the files themselves are opened by the
worker processes. Sockets, FIFOs and devices are passed over without being opened (opening a FIFO blocks).

Each file found gets its place in the walk (``seq``) and the name its outputs will have, both from the walk
alone: every process of a sharded scan walks the same inputs, so all agree on them without talking, and a
file's outputs are named as one process scanning everything would name them (:mod:`pneumotriage.scan.shards`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pneumotriage.dicom import image_id_for
from pneumotriage.dicom.walk import walk_entries
from pneumotriage.io import file_key
from pneumotriage.scan.shards import Shard

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Found:
    """One file to scan: where it is, its image id, its identity key (real path, size, mtime); once
    :class:`Discovery` has seen it, its place in the walk and the name its outputs share."""

    path: Path
    image_id: str
    key: str
    #: Its real path (the key's first part): what decides which shard scans it.
    real: str = ""
    seq: int = -1
    name: str = ""
    #: Why the walk passed it over without opening it (hidden, a FIFO, a link to a folder): a skipped.csv row.
    passed: str | None = None


def safe_name(image_id: str, taken: set[str]) -> str:
    """A file name from an image id: only letters, digits, '.', '_' and '-'; no leading dot; unique in ``taken``
    (a short hash of the id is added on a collision)."""
    name = _SAFE.sub("_", image_id).strip("._-")[:120] or "image"
    if name in taken:
        name = f"{name}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"
        n = 1
        base = name
        while name in taken:
            name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def found_files(roots: Iterable[Path], *, exclude: Iterable[Path] = ()) -> Iterator[Found]:
    """:func:`pneumotriage.dicom.walk.walk_entries` (regular files only, never opened here), each keyed, and each file
    once: a file reached twice (named twice, or through a symbolic link to a sibling) is scanned under the first
    path it was found by."""
    seen: set[str] = set()
    passed: list[Found] = []
    #: Each folder's real path, found once: a file that is not a link is its folder's real path and its name
    #: (os.path.realpath looks at every part of every file's path).
    folders: dict[str, str] = {}

    def tell(path: Path, why: str) -> None:
        passed.append(Found(path, image_id_for(path), f"{path}|passed", str(path), passed=why))

    for path, st, link in walk_entries(roots, exclude=exclude, passed=tell):
        yield from passed
        passed.clear()
        folder, name = os.path.split(path)
        if name and not link:
            if folder not in folders:
                folders[folder] = os.path.realpath(folder)
            real = os.path.join(folders[folder], name)
        else:
            real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        key = file_key(path, st, real) if st is not None else f"{path}|missing"
        yield Found(path, image_id_for(path), key, real)
    yield from passed


_END = object()


class Discovery:
    """:func:`found_files` in a background thread, each file numbered and named in the order of the walk, and
    only those of ``shard`` handed on. :meth:`poll` returns what was found so far without waiting;
    :attr:`finished` says whether the walk is over; :attr:`walked` counts every file found (every shard's).
    Errors of the walk itself are re-raised by :meth:`poll`.

    A file's name is the first free one for its image id in walk order, over every file found (whether it turns
    out readable or not), so that it depends on the walk alone."""

    def __init__(
        self,
        roots: Iterable[Path],
        files: Iterator[Found] | None = None,
        *,
        exclude: Iterable[Path] = (),
        shard: Shard | None = None,
    ) -> None:
        # Found files, handed over without a lock each (a deque's ends are thread-safe); the condition wakes a
        # poll that waits, and is taken only while one does.
        self._found: deque[object] = deque()
        self._arrived = threading.Condition(threading.Lock())
        self._waiting = False
        self._files = files if files is not None else found_files(list(roots), exclude=exclude)
        self._shard = shard
        self._error: BaseException | None = None
        self.finished = False
        self.count = 0
        #: Files the walk has found, every shard's.
        self.walked = 0
        #: Files of this shard the walk has found so far (handed on or still queued), and whether it is over:
        #: the progress bar's total as soon as it is known, not only once the pipeline has taken every file.
        self.found = 0
        self.walk_done = False
        self._thread = threading.Thread(target=self._run, name="scan-discover", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        taken: set[str] = set()
        try:
            for seq, item in enumerate(self._files):
                found = Found(
                    item.path, item.image_id, item.key, item.real or item.key, seq, safe_name(item.image_id, taken),
                    item.passed,
                )  # fmt: skip
                self.walked = seq + 1
                if self._shard is None or self._shard.owns(found.real):
                    self.found += 1
                    self._hand_on(found)
        except BaseException as exc:  # handed to the scanning thread, which re-raises it
            self._error = exc
        finally:
            self.walk_done = True
            self._hand_on(_END)

    def _hand_on(self, item: object) -> None:
        self._found.append(item)
        if self._waiting:  # read after the append: a poll that saw no file set it before looking
            with self._arrived:
                self._arrived.notify()

    def poll(self, limit: int, timeout: float | None = 0.0) -> list[Found]:
        """Up to ``limit`` files found so far; waits up to ``timeout`` seconds for the first one (None: until one
        comes or the walk ends)."""
        got: list[Found] = []
        found = self._found
        if not found and timeout != 0.0 and not self.finished:
            with self._arrived:
                self._waiting = True
                try:
                    self._arrived.wait_for(lambda: found, timeout)
                finally:
                    self._waiting = False
        while len(got) < limit and found and not self.finished:
            item = found.popleft()
            if item is _END:
                self.finished = True
                if self._error is not None:
                    raise self._error
                break
            assert isinstance(item, Found)
            got.append(item)
            self.count += 1
        return got

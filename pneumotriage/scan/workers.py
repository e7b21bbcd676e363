"""The worker processes: where reading, decoding and finishing run, away from the process that runs the models.

One pool serves the decode and finish stages (and the report's thumbnails). Workers share the
:class:`~pneumotriage.scan.decode.SlotArena` with the main process: a task names a slot, never carries pixels.
With ``workers=0`` every task runs inline in the calling process (for tests, debugging and tiny inputs).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from pneumotriage.dicom import ROW_IDENTITY, DicomHeader, read_dicom
from pneumotriage.errors import DicomError, NotDicomError
from pneumotriage.inputcheck import NotTriaged
from pneumotriage.io import printable, store_files
from pneumotriage.pipelines import InputKey
from pneumotriage.scan.decode import SlotArena, decode_into, display_shape, make_display, turned
from pneumotriage.scan.discover import Found
from pneumotriage.scan.finish import THUMBNAIL, FinishJob, finish, grey_thumbnail, overlay, write_thumbnail
from pneumotriage.scan.pool import ExecutorPool, Pool, start_pool
from pneumotriage.scan.read import read
from pneumotriage.scan.records import ImageResult, Status

_ARENA: SlotArena | None = None
T = TypeVar("T")
#: The longest a worker spends reading and decoding one file: a header followed by 1 GB of zeros kept pydicom
#: parsing for over 5 minutes. SIIM's files take ~10 ms, a 4,300 px JPEG 2000 a few seconds.
FILE_TIME_LIMIT_S = 60.0
_IN_WORKER = False
#: This process's whole probability map, rebuilt for each image from the part its slot holds (kept: fresh memory
#: costs a page fault every 4 kB).
_WHOLE_MAP: np.ndarray | None = None


class _TimeUp(BaseException):
    """Raised in a worker when a file's time is up (a BaseException: no ``except Exception`` on the way takes it)."""


def _time_up(signum: int, frame: object) -> None:
    raise _TimeUp


@dataclass
class Decoded:
    """A worker's answer for one file: ``status`` is "ok", "error" (a DICOM that cannot be used), "not triaged"
    (an image the input check refused: not a frontal chest radiograph, or not one read truly) or "skipped" (not
    DICOM at all). An "ok" image is in its slot, or (``jpeg``) still compressed for the device."""

    status: Status
    error: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    spacing: tuple[float, float] | None = None
    jpeg: bytes | None = None
    invert: bool = False
    #: How its inputs were turned upright (flip left-right, flip up-down): the models' maps are turned back.
    flip: tuple[bool, bool] = (False, False)
    #: What the reader noted (:attr:`~pneumotriage.scan.records.ImageResult.notes`).
    notes: str | None = None
    #: The report thumbnail in case nothing is outlined (JPEG; a few kB).
    thumb: bytes | None = None

    @property
    def display_shape(self) -> tuple[int, int]:
        return display_shape(self.shape)


def error_row(found: Found, decoded: Decoded, error: str | None = None) -> ImageResult:
    """The row of a file that was not triaged: not readable ("error"), refused by the input check ("not
    triaged"), or (``error``) given an answer the scan cannot trust."""
    return ImageResult(
        **{"image_id": found.image_id, "path": str(found.path), "key": found.key, **decoded.identity},
        seq=found.seq,
        status="error" if error is not None or decoded.status == "ok" else decoded.status,
        error=error or decoded.error,
    )


def identity_of(h: DicomHeader, key: str) -> dict[str, Any]:
    """The worklist fields a header fills in (the image's size comes from its pixel data, not from here)."""
    row: dict[str, Any] = {name: getattr(h, name) for name in ROW_IDENTITY}
    if h.study_datetime is not None:
        row["study_datetime"] = h.study_datetime.isoformat()
    return {**row, "path": str(h.path), "key": key}


def decode_task(found: Found, slot: int, row: int, want_jpeg: bool, accept: tuple[str, ...] = ()) -> Decoded:
    """Read one file and decode it into input ``row`` and ``slot`` (or keep its JPEG frame for the device).
    Never raises for a bad file: the answer says what is wrong, naming the file."""
    assert _ARENA is not None
    # In a worker its handler is installed once; inline (``--workers 0``) only on the main thread, for this file.
    inline = not _IN_WORKER and threading.current_thread() is threading.main_thread()
    timed = (_IN_WORKER or inline) and hasattr(signal, "setitimer")
    before = signal.signal(signal.SIGALRM, _time_up) if timed and inline else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, FILE_TIME_LIMIT_S)
    try:
        return _decode(found, slot, row, want_jpeg, accept)
    except _TimeUp:
        return Decoded(
            "error",
            error=f"{printable(str(found.path))}: took over {FILE_TIME_LIMIT_S:g} s to read and decode: damaged, or "
            "not an image; not triaged",
        )
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if before is not None:
            signal.signal(signal.SIGALRM, before)


def _decode(found: Found, slot: int, row: int, want_jpeg: bool, accept: tuple[str, ...]) -> Decoded:
    assert _ARENA is not None
    identity: dict[str, Any] = {}
    try:
        source = read(found.path, want_jpeg=want_jpeg, accept=accept, sizes=_ARENA.native_sizes)
        h = source.header
        identity = identity_of(h, found.key)
        decoded = Decoded("ok", identity=identity, spacing=h.pixel_spacing_mm, flip=source.flip)
        if source.jpeg is not None:
            decoded.jpeg, decoded.invert = source.jpeg, source.invert
            decoded.shape = h.shape or (0, 0)
        else:
            decoded.shape = decode_into(source, _ARENA, slot, row)
            decoded.thumb = grey_thumbnail(_ARENA.display(slot, decoded.display_shape))
        decoded.notes = "; ".join(dict.fromkeys(source.notes)) or None
        return decoded
    except NotTriaged as exc:
        if not identity and exc.header is not None:
            identity = identity_of(exc.header, found.key)
        return Decoded(
            "not triaged",
            error=f"{found.path}: not triaged: {exc.reason} (--accept {exc.rule} triages it anyway)",
            identity=identity,
        )
    except NotDicomError as exc:
        return Decoded("skipped", error=str(exc))
    except DicomError as exc:
        return Decoded("error", error=str(exc))
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # anything a damaged file raises past pydicom
        return Decoded("error", error=f"{found.path}: cannot be read ({type(exc).__name__}: {exc})")


def finish_task(job: FinishJob, slot: int) -> tuple[ImageResult, bytes | None]:
    global _WHOLE_MAP
    assert _ARENA is not None
    probs = None
    if job.window is not None:
        side = job.window.side
        if _WHOLE_MAP is None or _WHOLE_MAP.shape != (side, side):
            _WHOLE_MAP = np.empty((side, side), dtype=np.float32)
        probs = job.window.rebuild(_ARENA.map(slot).reshape(-1), _WHOLE_MAP)
        if any(job.flip):  # the map of an image turned upright for the models, turned back to the stored grid
            probs = np.ascontiguousarray(turned(probs, job.flip))
    return finish(job, probs, _ARENA.display(slot, job.display_shape))


def _store(paths: list[Path], contents: list[bytes]) -> None:
    store_files(paths, contents)


def thumbnail_task(path: str, out: Path, name: str, mask_file: str | None, overlay_file: str | None) -> bool:
    """Write the report thumbnail of one image: its overlay (``overlay_file``, relative to ``out``) shrunk, or the
    DICOM at ``path`` decoded again with its outline from ``mask_file`` where it has one; False when neither
    reads."""
    from PIL import Image

    if overlay_file:
        try:
            with Image.open(out / overlay_file) as picture:
                picture.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG decodes at 1/2, 1/4 or 1/8 of its size
                picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
                write_thumbnail(out, name, picture.convert("RGB"))
            return True
        except OSError:
            pass  # removed or damaged since: decode the image again
    try:
        image = read_dicom(path, reduce_to=THUMBNAIL)  # JPEG Baseline decodes at 1/4 or 1/8 of its size
    except (DicomError, OSError, ValueError, RuntimeError, MemoryError):
        return False
    shape = display_shape(image.original_shape, THUMBNAIL)
    shown = make_display(torch.from_numpy(image.pixels), shape).numpy()
    outline = np.zeros(shape, dtype=bool)
    if mask_file:
        with Image.open(out / mask_file) as mask:
            outline = np.asarray(mask.convert("L").resize(shape[::-1], Image.Resampling.BOX)) >= 128
    write_thumbnail(out, name, overlay(shown, outline))
    return True


#: How often a worker checks that the scan that started it is still there (where the OS cannot tell it).
PARENT_WATCH_S = 0.5


def _die_with(parent: int) -> None:
    """End this worker when the scan's process ends, however it ends (SIGKILL and the OOM killer included): a
    worker left behind would hold the scan's lock and journal open, and ``--resume`` would be refused until
    someone found it. On Linux the kernel sends SIGKILL (``PR_SET_PDEATHSIG``); everywhere a daemon thread also
    watches the parent's pid, for the platforms without it and for a parent that died before the call."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # the watch below still ends it
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_WATCH_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="pneumotriage-parent-watch", daemon=True).start()


def _start(arena_name: str | None, layout: tuple[Any, ...], nice: int, parent: int = 0) -> None:
    """Each worker's start: ended with the scan (:func:`_die_with`), one torch thread, no SIGINT (the main process
    handles Ctrl-C), a lower priority where asked, and the arena (inherited through fork, else attached by
    name)."""
    global _ARENA, _IN_WORKER
    if parent:
        _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _time_up)
        _IN_WORKER = True
    torch.set_num_threads(1)
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    if arena_name is not None:
        count, keys, map_size, rows = layout
        _ARENA = SlotArena(count, keys, map_size, rows=rows, inherited=False, name=arena_name)


def done_future(value: T) -> Future[T]:
    """A future that already holds ``value``: what runs inline takes the same path as what runs in a worker."""
    future: Future[T] = Future()
    future.set_result(value)
    return future


class Part(Generic[T]):
    """One item's answer from a task that ran over several (:meth:`Workers.submit_each`): the ``index``-th of
    the task's answers, with a future's ``done`` and ``result``."""

    __slots__ = ("future", "index")

    def __init__(self, future: Future[list[T]], index: int = 0) -> None:
        self.future, self.index = future, index

    @classmethod
    def ready(cls, value: T) -> Part[T]:
        """An answer already there (what runs inline takes the same path as what runs in a worker)."""
        return cls(done_future([value]))

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> T:
        return self.future.result()[self.index]


def _each(fn: Callable[..., T], calls: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*args) for args in calls]


#: The most calls one task holds (one round trip to a worker for them all: files to decode, images to finish,
#: thumbnails to make).
MAX_CHUNK = 16


class Workers:
    """The pool and the arena, for one scan; a context manager that stops both."""

    def __init__(
        self,
        count: int,
        *,
        slots: int,
        keys: Sequence[InputKey],
        map_size: int | None,
        rows: int | None = None,
        nice: int = 0,
    ) -> None:
        global _ARENA
        self.count = count
        # fork on Linux: the workers start in milliseconds and inherit the arena. Elsewhere spawn (fork is unsafe
        # on macOS and absent on Windows), with the arena attached by name.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        inherited = method == "fork" or count == 0
        self.arena = SlotArena(slots, keys, map_size, rows=rows, inherited=inherited)
        _ARENA = self.arena
        self._pool: Pool | ExecutorPool | None = None
        self._method = method
        self._nice = nice
        #: How many times the pool was started again after a worker died (:meth:`revive`).
        self.restarts = 0
        self._start_pool()

    def _start_pool(self) -> None:
        if self.count <= 0:
            return
        # The workers are forked with every object alive here frozen (gc.freeze): a worker's collections never
        # walk what it inherited. Each walk wrote to every page of those objects, which the fork shares until
        # written: a worker's first file took ~0.14 s instead of ~0.05 on a 2-core CPU. Unfrozen here after.
        frozen = gc.get_freeze_count()
        gc.freeze()
        try:
            self._pool = start_pool(
                self.count,
                multiprocessing.get_context(self._method),
                _start,
                (self.arena.name, self.arena.layout, self._nice, os.getpid()),
            )
            # Start every worker now, before the main process runs a model: a fork after OpenMP's threads have
            # started is not safe (a restart after a worker died is the exception: see revive).
            for future in [self._pool.submit(os.getpid) for _ in range(self.count)]:
                future.result()
        finally:
            if not frozen:  # what was frozen before (the console script's end) stays so
                gc.unfreeze()

    def revive(self) -> bool:
        """Start the pool again if a worker died (killed by a signal, the OOM killer): every task it held failed
        with :class:`BrokenProcessPool`; the caller redoes them. True when the pool was broken. The new workers
        are forked from a process whose OpenMP threads may be running; they only ever use one torch thread."""
        if self._pool is None:
            return False
        try:
            self._pool.submit(os.getpid).result()
            return False
        except BrokenProcessPool:
            pass
        self._pool.shutdown(wait=False)
        self._pool = None
        self.restarts += 1
        self._start_pool()
        return True

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._pool is None:
            return done_future(fn(*args))
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool as exc:  # a worker died since the last task: the caller's future says so
            failed: Future[T] = Future()
            failed.set_exception(exc)
            return failed

    def submit_each(self, fn: Callable[..., T], calls: Sequence[tuple[Any, ...]], chunk: int) -> list[Part[T]]:
        """``fn(*args)`` for each of ``calls``, ``chunk`` calls to a task: one round trip to a worker for several
        items (each costs the scan's process pickling, a write, and reading the answer). The answers come
        back a task at a time, as :class:`Part` s in the order of ``calls``."""
        parts: list[Part[T]] = []
        for start in range(0, len(calls), max(chunk, 1)):
            some = list(calls[start : start + max(chunk, 1)])
            future: Future[list[T]] = self.submit(_each, fn, some)
            parts += [Part(future, i) for i in range(len(some))]
        return parts

    def wait(self, future: Future[Any], timeout: float | None = None) -> None:
        """Return when ``future`` is done (a worker's answer read) or ``timeout`` seconds have passed."""
        if self._pool is not None and not future.done():
            self._pool.wait([future], timeout)

    def map(self, fn: Callable[..., T], *iterables: Sequence[Any]) -> list[T]:
        """``fn`` over the arguments in the workers, a few calls to a task (two tasks a worker, at most
        :data:`MAX_CHUNK` each: a round trip costs the scan's process a fraction of a millisecond); if a worker
        dies meanwhile, the pool is started again and the whole map is done here instead (its tasks are written to
        be done again: each writes one file)."""
        calls = list(zip(*iterables, strict=True))
        if self._pool is None:
            return [fn(*a) for a in calls]
        chunk = max(1, min(MAX_CHUNK, -(-len(calls) // (2 * self.count))))
        try:
            return [part.result() for part in self.submit_each(fn, calls, chunk)]
        except BrokenProcessPool:
            self.revive()
            return [fn(*a) for a in calls]

    def store(self, paths: Sequence[Path], contents: Sequence[bytes]) -> None:
        """Write small files (:func:`~pneumotriage.io.store_files`) in the workers, a few to a task: each
        file made costs the process that makes it a fraction of a millisecond of system time."""
        if paths:
            self.map(
                _store,
                [list(paths[i : i + 16]) for i in range(0, len(paths), 16)],
                [list(contents[i : i + 16]) for i in range(0, len(contents), 16)],
            )

    def thumbnails(self, out: Path, rows: Sequence[ImageResult]) -> None:
        """Report thumbnails of ``rows`` not kept while scanning (outlined images with an overlay, images done
        before a resume), made in the workers."""
        self.map(
            thumbnail_task,
            [r.path for r in rows],
            [out] * len(rows),
            [r.file_stem for r in rows],
            [r.mask_file for r in rows],
            [r.overlay_file for r in rows],
        )

    def close(self) -> None:
        global _ARENA
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.arena.close()
        _ARENA = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

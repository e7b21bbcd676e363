"""The worker processes and the pipes to them, driven by the thread that uses them: the pool has no thread of its own.

concurrent.futures' process pool moves each task through two threads of its own: a manager that hands it over and
reads its answer, and its queue's feeder, which pickles the task and writes it. Each hand-over wakes one thread,
then another, and each wake-up costs the scan's process CPU (~40 us on a 2-core VM even with nothing else to do;
several times that in a scan). On a GPU that process is the feeder, and its CPU caps the scan's pace. Here the
thread that submits a task pickles it and writes it to a worker's pipe itself; the answers are read when it asks
whether one is done, or waits for one. A scan with every image outlined hands over ~120 tasks and reads ~70
answers for 512 images.

Each worker has a pipe for its tasks and one for its answers (a frame each: an 8-byte length, then a pickle), so a
worker's death is seen as the end of its answers' pipe. As in concurrent.futures, a worker's death breaks the
pool: every task in flight fails with :class:`BrokenProcessPool` (the scan redoes them; see
:meth:`pneumotriage.scan.workers.Workers.revive`). The main process never blocks writing a task: what a full pipe
does not take waits in memory and is written when the pool is next asked about its answers, so a worker blocked
writing a long answer and a main process writing tasks cannot wait for each other.

POSIX only (``select.poll``, non-blocking pipes); elsewhere :class:`ExecutorPool` serves the same calls with
concurrent.futures.
"""

from __future__ import annotations

import itertools
import os
import pickle
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

try:
    import select

    _POLL = hasattr(select, "poll")
except ImportError:  # pragma: no cover - every platform has select
    _POLL = False

T = TypeVar("T")

_FRAME = struct.Struct("<Q")
_PICKLE = pickle.HIGHEST_PROTOCOL
#: What one read of a worker's answers takes at most (answers are a few kB to a few hundred kB).
_READ = 1 << 18
#: Each pipe's room where the system allows (Linux's unprivileged limit, /proc/sys/fs/pipe-max-size, is 1 MiB).
PIPE_BYTES = 1 << 20
#: How long stopping the pool waits for the tasks running in it (then they are killed).
STOP_S = 30.0
#: While waiting, how often the workers are checked for one that ended without its pipe saying so (a pipe whose
#: write end a child of the worker still holds).
_LIVENESS_S = 1.0


class RemoteTraceback(Exception):
    """Where an exception raised in a worker was raised there: the cause of the exception the caller gets."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _widen(fd: int) -> None:
    """Give a pipe room for a few answers (Linux: 64 kB by default, less than one task's answer of 16 files with
    their thumbnails): a worker blocks writing an answer until the main process reads it, and that process reads
    only between its batches."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or over the system's limit: the default size
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytearray | None:
    """``n`` bytes from ``fd`` (blocking); None at the pipe's end."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def _failure(task: int, exc: BaseException) -> bytes:
    """A task's exception as an answer, with its traceback as text (the traceback itself does not pickle)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return pickle.dumps((task, False, (exc, text)), _PICKLE)
    except Exception:  # an exception that does not pickle: its text still reaches the caller
        return pickle.dumps((task, False, (RuntimeError(f"{type(exc).__name__}: {exc}"), text)), _PICKLE)


def _serve(
    tasks: Connection,
    answers: Connection,
    close: Sequence[int],
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A worker's life: run each task its pipe brings, answer each in turn, end when the pipe ends."""
    for fd in close:  # the main process's ends of the pipes of the workers forked before this one
        try:
            os.close(fd)
        except OSError:
            pass
    if initializer is not None:
        initializer(*initargs)
    tasks_fd, answers_fd = tasks.fileno(), answers.fileno()
    while True:
        head = _read_exact(tasks_fd, _FRAME.size)
        frame = None if head is None else _read_exact(tasks_fd, _FRAME.unpack(head)[0])
        if frame is None:
            return
        task, fn, args = pickle.loads(frame)
        try:
            value = fn(*args)
        except BaseException as exc:
            data = _failure(task, exc)
        else:
            try:
                data = pickle.dumps((task, True, value), _PICKLE)
            except Exception as exc:
                data = _failure(task, exc)
        _write_all(answers_fd, _FRAME.pack(len(data)) + data)


class _Answer(Future):  # type: ignore[type-arg]
    """A task's future, completed by whichever thread reads the worker's answer: asking whether it is done reads
    the answers there are, and waiting for its result waits on the workers' pipes."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self._pool = pool

    def done(self) -> bool:
        if Future.done(self):
            return True
        self._pool.collect()
        return Future.done(self)

    def result(self, timeout: float | None = None) -> Any:
        if not Future.done(self):
            self._pool.wait([self], timeout)
        return Future.result(self, 0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not Future.done(self):
            self._pool.wait([self], timeout)
        return Future.exception(self, 0)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    tasks: Connection  # the main process's end: it writes
    answers: Connection  # the main process's end: it reads
    #: Tasks the pipe has not taken yet (a frame each), written when it has room.
    outbox: bytearray = field(default_factory=bytearray)
    #: Answers read but not yet whole.
    inbox: bytearray = field(default_factory=bytearray)
    pending: dict[int, Future[Any]] = field(default_factory=dict)


class Pool:
    """``count`` worker processes started from ``context``, each running ``initializer(*initargs)`` first."""

    def __init__(
        self,
        count: int,
        context: BaseContext,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._workers: list[_Worker] = []
        self._by_fd: dict[int, _Worker] = {}
        self._poller = select.poll()
        self._scratch = bytearray(_READ)
        #: Why the pool is broken (a worker died); None while it is not.
        self.broken: str | None = None
        self._closed = False
        fork = context.get_start_method() == "fork"
        try:
            for i in range(count):
                tasks_r, tasks_w = context.Pipe(duplex=False)
                answers_r, answers_w = context.Pipe(duplex=False)
                # A forked worker inherits every descriptor open here: those of the workers before it are closed
                # there, so that a worker's pipes end only when it and the main process close them.
                close = [c.fileno() for w in self._workers for c in (w.tasks, w.answers)] if fork else []
                if fork:
                    close += [tasks_w.fileno(), answers_r.fileno()]
                process = context.Process(  # type: ignore[attr-defined]
                    target=_serve,
                    args=(tasks_r, answers_w, close, initializer, initargs),
                    name=f"pneumotriage-worker-{i}",
                    daemon=True,
                )
                process.start()
                tasks_r.close()
                answers_w.close()
                os.set_blocking(tasks_w.fileno(), False)
                os.set_blocking(answers_r.fileno(), False)
                _widen(tasks_w.fileno())
                _widen(answers_r.fileno())
                worker = _Worker(process, tasks_w, answers_r)
                self._workers.append(worker)
                self._by_fd[answers_r.fileno()] = worker
                self._poller.register(answers_r.fileno(), select.POLLIN)
        except BaseException:
            self.shutdown(wait=False)
            raise

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in the worker holding the fewest tasks; raises BrokenProcessPool if a worker died."""
        with self._lock:
            if self.broken is not None:
                raise BrokenProcessPool(self.broken)
            if self._closed:
                raise RuntimeError("cannot schedule new tasks after the pool was shut down")
            worker = min(self._workers, key=lambda w: len(w.pending))
            task = next(self._ids)
            data = pickle.dumps((task, fn, args), _PICKLE)
            future: Future[T] = _Answer(self)
            worker.pending[task] = future
            worker.outbox += _FRAME.pack(len(data))
            worker.outbox += data
            self._send(worker)
        return future

    def collect(self) -> None:
        """Read the answers the workers have written and complete their futures; write what tasks the pipes have
        room for. Never blocks (beyond the lock)."""
        with self._lock:
            self._collect(self._poller.poll(0))

    def wait(self, futures: Iterable[Future[Any]], timeout: float | None = None) -> None:
        """Return when one of ``futures`` is done, the pool is broken, or ``timeout`` seconds have passed."""
        futures = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._collect(self._poller.poll(0))
                if self.broken is not None or any(Future.done(f) for f in futures):
                    return
                # Waited on outside the lock: a poll object of this wait's own (one must not be polled by two
                # threads at once), watching the answers and the pipes with tasks still to write.
                poller = select.poll()
                for w in self._workers:
                    poller.register(w.answers.fileno(), select.POLLIN)
                    if w.outbox:
                        poller.register(w.tasks.fileno(), select.POLLOUT)
            left = _LIVENESS_S if deadline is None else min(_LIVENESS_S, deadline - time.monotonic())
            if left <= 0:
                return
            if not poller.poll(left * 1000):
                with self._lock:
                    self._check_alive()
                if deadline is not None and time.monotonic() >= deadline:
                    return

    def _collect(self, ready: list[tuple[int, int]]) -> None:
        ended = [worker for fd, _ in ready if (worker := self._by_fd.get(fd)) is not None and self._read(worker)]
        for worker in self._workers:
            if worker.outbox:
                self._send(worker)
        if ended and self.broken is None:
            self._break(ended[0])

    def _read(self, worker: _Worker) -> bool:
        """Read what ``worker`` has written and complete each whole answer; True when its pipe has ended."""
        fd, scratch, inbox = worker.answers.fileno(), self._scratch, worker.inbox
        ended = False
        while True:
            try:
                k = os.readv(fd, [scratch])
            except BlockingIOError:
                break
            except OSError:
                ended = True
                break
            if k == 0:
                ended = True
                break
            inbox += memoryview(scratch)[:k]
        start, size = 0, len(inbox)
        with memoryview(inbox) as view:  # released before the answers read are cut off the front
            while size - start >= _FRAME.size:
                end = start + _FRAME.size + _FRAME.unpack_from(view, start)[0]
                if end > size:
                    break
                self._answer(worker, pickle.loads(view[start + _FRAME.size : end]))
                start = end
        if start:
            del inbox[:start]
        return ended

    def _answer(self, worker: _Worker, answer: tuple[int, bool, Any]) -> None:
        task, ok, value = answer
        future = worker.pending.pop(task, None)
        if future is None or future.cancelled():
            return
        if ok:
            future.set_result(value)
        else:
            exc, text = value
            exc.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
            future.set_exception(exc)

    def _send(self, worker: _Worker) -> None:
        outbox = worker.outbox
        while outbox:
            try:
                n = os.write(worker.tasks.fileno(), outbox)
            except BlockingIOError:
                return
            except OSError:  # the worker is gone: its answers' pipe says so when read
                return
            del outbox[:n]

    def _check_alive(self) -> None:
        for worker in self._workers:
            if worker.process.exitcode is not None and self.broken is None:
                self._collect(self._poller.poll(0))  # what it answered before it ended counts
                if self.broken is None:
                    self._break(worker)

    def _break(self, worker: _Worker) -> None:
        """A worker ended: keep what the others have answered, stop them, fail every task still in flight."""
        code = worker.process.exitcode
        if code is None:
            worker.process.join(1.0)
            code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.broken = (
            f"a worker process (pid {worker.process.pid}) ended while it held tasks ({how}: killed, or out of memory)"
        )
        for other in self._workers:
            if other is not worker:
                self._read(other)
        self._stop(kill=True)
        for other in self._workers:
            for future in other.pending.values():
                if not Future.done(future):
                    future.set_exception(BrokenProcessPool(self.broken))
            other.pending.clear()

    def _stop(self, *, kill: bool) -> None:
        """End the workers: killed, or (``kill`` False) each once the task it is running is done, its answer
        read and dropped (a worker blocked writing a long answer would otherwise never end), within
        :data:`STOP_S`."""
        self._closed = True
        for worker in self._workers:
            if kill and worker.process.exitcode is None:
                worker.process.kill()
            worker.outbox.clear()
            if not worker.tasks.closed:
                worker.tasks.close()  # a worker waiting for a task ends at its pipe's end
        deadline = time.monotonic() + STOP_S
        for worker in self._workers:
            while not worker.answers.closed and worker.process.exitcode is None and time.monotonic() < deadline:
                if select.select([worker.answers.fileno()], [], [], 0.1)[0] and self._read(worker):
                    break
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            if not worker.answers.closed:
                try:
                    self._poller.unregister(worker.answers.fileno())
                except (KeyError, ValueError):
                    pass
                worker.answers.close()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the workers: with ``wait`` each ends once its pipe ends (after the task it is running), else they
        are killed. Tasks not answered are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._stop(kill=not wait)
            for worker in self._workers:
                for future in worker.pending.values():
                    future.cancel()
                worker.pending.clear()


class ExecutorPool:
    """The same calls served by concurrent.futures' process pool, where :class:`Pool` cannot run (no
    ``select.poll``)."""

    def __init__(
        self,
        count: int,
        context: BaseContext,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._executor = ProcessPoolExecutor(count, mp_context=context, initializer=initializer, initargs=initargs)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(fn, *args)

    def wait(self, futures: Iterable[Future[Any]], timeout: float | None = None) -> None:
        wait_futures(list(futures), timeout=timeout, return_when=FIRST_COMPLETED)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


def start_pool(
    count: int, context: BaseContext, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
) -> Pool | ExecutorPool:
    """A pool of ``count`` workers: the project's own where the platform allows."""
    return (Pool if _POLL else ExecutorPool)(count, context, initializer, initargs)

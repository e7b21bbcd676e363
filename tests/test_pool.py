"""The scan's own process pool (:mod:`pneumotriage.scan.pool`): answers read by the thread that asks, a worker's
death breaking the pool as concurrent.futures' does, and no deadlock between a worker writing a long answer and
the main process writing tasks. Every call that waits on a worker runs under a time limit."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest
from helpers import within

from pneumotriage.scan import pool as scan_pool
from pneumotriage.scan.pool import Pool, RemoteTraceback

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the pool's pipes are POSIX's")


def _start(tag: str) -> None:
    os.environ["POOL_TEST_TAG"] = tag


def _echo(value: Any) -> Any:
    return value


def _tagged(value: int) -> tuple[str, int, int]:
    return os.environ.get("POOL_TEST_TAG", ""), os.getpid(), value * 2


def _fail(text: str) -> None:
    raise ValueError(text)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def _big(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


def _unpicklable() -> Any:
    return lambda: None


def _pool(count: int = 2, method: str = "fork") -> Pool:
    return Pool(count, multiprocessing.get_context(method), _start, ("ready",))


def test_tasks_run_in_the_workers_after_their_start_and_answer_in_order_of_asking() -> None:
    pool = _pool(2)
    try:
        futures = [pool.submit(_tagged, i) for i in range(40)]
        answers = within(60, lambda: [f.result() for f in futures])
        assert [a[2] for a in answers] == [2 * i for i in range(40)]
        assert {a[0] for a in answers} == {"ready"}  # the initializer ran first in each
        assert len({a[1] for a in answers}) == 2 and os.getpid() not in {a[1] for a in answers}  # spread over both
    finally:
        pool.shutdown()


def test_spawned_workers_answer_too() -> None:
    pool = _pool(1, "spawn")
    try:
        assert within(120, pool.submit(_tagged, 5).result)[::2] == ("ready", 10)
    finally:
        pool.shutdown()


def test_done_reads_the_answers_without_waiting_and_wait_returns_at_its_timeout() -> None:
    pool = _pool(1)
    try:
        slow = pool.submit(_sleep, 0.6, 1)
        t = time.monotonic()
        assert not slow.done()
        pool.wait([slow], timeout=0.1)
        assert 0.08 <= time.monotonic() - t < 0.5 and not slow.done()
        deadline = time.monotonic() + 30
        while not slow.done():  # done() alone, never a blocking call, sees the answer arrive
            assert time.monotonic() < deadline, "done() never saw the answer"
            time.sleep(0.01)
        assert slow.result() == 1
    finally:
        pool.shutdown()


def test_an_exception_in_a_task_is_raised_with_the_workers_traceback_and_the_pool_goes_on() -> None:
    pool = _pool(1)
    try:
        failed = pool.submit(_fail, "a bad file")
        with pytest.raises(ValueError, match="a bad file") as raised:
            within(60, failed.result)
        assert isinstance(raised.value.__cause__, RemoteTraceback) and "_fail" in str(raised.value.__cause__)
        with pytest.raises(Exception, match="pickle|lambda"):
            within(60, pool.submit(_unpicklable).result)  # an answer that cannot be sent says why
        assert within(60, pool.submit(_echo, "still here").result) == "still here"
    finally:
        pool.shutdown()


def test_a_worker_that_dies_breaks_the_pool_but_answers_already_given_are_kept() -> None:
    pool = _pool(2)
    try:
        done = pool.submit(_echo, "kept")
        assert within(60, done.result) == "kept"
        slow = pool.submit(_sleep, 5.0, 1)  # the other worker is busy with this when the first dies
        dying = pool.submit(_die)
        with pytest.raises(BrokenProcessPool, match="killed by signal 9"):
            within(60, dying.result)
        with pytest.raises(BrokenProcessPool):
            within(60, slow.result)
        assert done.result() == "kept"
        with pytest.raises(BrokenProcessPool):
            pool.submit(_echo, 1)
    finally:
        within(60, pool.shutdown)


def test_long_answers_and_many_tasks_at_once_do_not_deadlock() -> None:
    """Answers far larger than a pipe holds, while the main process writes more tasks than a pipe holds and reads
    nothing until the end: neither side may wait for the other."""
    pool = _pool(2)
    try:
        n = 8 << 20  # 8 MiB an answer: over the pipes' widened room too

        def ask() -> list[Any]:
            futures = [pool.submit(_big, n, i) for i in range(6)]
            futures += [pool.submit(_echo, bytes(300_000)) for _ in range(20)]  # 6 MB of tasks
            return [f.result() for f in futures]

        answers = within(120, ask)
        assert [len(a) for a in answers[:6]] == [n] * 6 and [a[0] for a in answers[:6]] == list(range(6))
        assert all(a == bytes(300_000) for a in answers[6:])
    finally:
        within(60, pool.shutdown)


def test_shutdown_waits_for_a_running_task_even_one_blocked_on_a_long_answer() -> None:
    pool = _pool(1)
    future = pool.submit(_big, 16 << 20, 7)
    time.sleep(0.3)  # it is writing its answer, which no one has read
    within(60, pool.shutdown)
    assert future.done()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(_echo, 1)


def test_workers_end_when_the_pool_is_shut_down() -> None:
    pool = _pool(2)
    pids = [p for _, p, _ in within(60, lambda: [f.result() for f in [pool.submit(_tagged, i) for i in range(4)]])]
    within(60, pool.shutdown)
    for pid in set(pids):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the other platforms' pipes keep their size")
def test_pipes_are_widened_where_the_system_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    pool = _pool(1)
    try:
        worker = pool._workers[0]
        sizes = {fcntl.fcntl(c.fileno(), fcntl.F_GETPIPE_SZ) for c in (worker.tasks, worker.answers)}
        with open("/proc/sys/fs/pipe-max-size") as fh:
            most = int(fh.read())
        assert sizes == {min(scan_pool.PIPE_BYTES, most)}
    finally:
        pool.shutdown()

"""Decoded batches from a stream of files: the scan's read + decode stages feeding its models.

:class:`Stream` keeps a window of files decoding in the worker processes and hands out batches in the order the
files were found; :func:`decoded_batches` is the same for a list of files (``tune`` and the benchmarks use it),
with the slots of a batch handed back when the next one is asked for. :func:`window_for` and
:func:`slots_for` and :func:`rows_for` are the one sizing rule for both. :func:`model_inputs` is one file at a
time, inline, as the scan reads and decodes it (what ``export`` checks parity on).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumotriage.errors import PneumotriageError
from pneumotriage.inputcheck import NotTriaged
from pneumotriage.io import printable
from pneumotriage.pipelines import NATIVE, InputKey
from pneumotriage.scan.decode import SlotArena, decode_into, decode_jpegs_on_device
from pneumotriage.scan.discover import Discovery, Found
from pneumotriage.scan.finish import grey_thumbnail
from pneumotriage.scan.options import Plan
from pneumotriage.scan.read import read
from pneumotriage.scan.workers import MAX_CHUNK, Decoded, Part, Workers, decode_task


def window_for(plan: Plan) -> int:
    """Files decoding at once: two batches, or a batch and two files a worker, whichever is more."""
    return max(2 * plan.batch_size, plan.batch_size + 2 * plan.workers)


def slots_for(plan: Plan, *, finishing: bool) -> int:
    """Slots of the arena. A slot is held while its file decodes and while the models run on it; a scan also holds
    an outlined image's slot until it is finished: a batch's worth more, and the stream waits for the finish
    stage when they are all in use. No more than that: each slot's memory costs page faults the first time it
    is used (a slot with a map at 512 px is ~1.25 MB) and more slots are used once each in a short scan."""
    window = window_for(plan)
    return window + (2 if finishing else 1) * plan.batch_size


def rows_for(plan: Plan) -> int:
    """Input rows of the arena. A row is held while its file decodes and until its batch's models have run: the
    window and a batch at most. Rounded up to whole batches, so that batches, taken in ring order, never wrap
    around its end and each is the arena's own memory (:meth:`SlotArena.view`), unless a file failed or a
    smaller batch went ahead."""
    return -(-(window_for(plan) + plan.batch_size) // plan.batch_size) * plan.batch_size


@dataclass
class Item:
    """A file on its way through the pipeline, and the slot it holds."""

    found: Found
    slot: int
    row: int
    decoded: Decoded


@dataclass
class Batch:
    """Decoded images ready for the models: ``inputs`` maps each input size to a (B, 1, S, S) tensor on the
    device, valid until the next batch is asked for (the stream refills the same memory). ``failed`` are the
    files met since the previous batch that could not be used (their slots are already free)."""

    items: list[Item]
    inputs: dict[InputKey, torch.Tensor]
    failed: list[tuple[Found, Decoded]] = field(default_factory=list)


class Stream:
    """Decoded batches from a stream of files: keeps ``window`` files decoding in the workers, hands out batches
    of ``batch_size`` in the order files were found (a smaller batch whenever the workers would otherwise wait
    for discovery), and takes slots back through :meth:`release`. Input rows it hands out in ring order and takes
    back itself: a failed file's at once, a batch's when the next batch is asked for.

    ``on_wait`` is called, blocking or not, whenever the stream has to wait (for a slot, a decoded file or
    discovery), so the consumer can drain its own queue (the finish stage) meanwhile."""

    def __init__(
        self,
        files: Discovery,
        workers: Workers,
        *,
        batch_size: int,
        window: int,
        device: torch.device,
        jpeg_on_device: bool,
        done_before: Callable[[Found], bool] = lambda found: False,
        on_wait: Callable[[bool], bool] = lambda block: False,
        accept: tuple[str, ...] = (),
    ) -> None:
        self.files = files
        self.workers = workers
        self.arena = workers.arena
        self.free: deque[int] = deque(range(self.arena.count))
        self._busy = [False] * self.arena.rows  # input rows held
        self._cursor = 0  # the next row handed out
        self.batch_size = batch_size
        self.window = window
        self.device = device
        self.jpeg_on_device = jpeg_on_device
        self.done_before = done_before
        self.on_wait = on_wait
        self.accept = accept
        self.decoding: deque[tuple[Found, int, int, Part[Decoded]]] = deque()  # found, slot, row, answer
        # Files handed to a worker in one task: a few a worker at a time, so the window stays spread over them.
        self.chunk = max(1, min(MAX_CHUNK, window // (2 * max(workers.count, 1))))
        self.resumed = 0  # files done by an earlier run, passed over
        # CUDA: two pinned buffers per input size, used in turn, from which batches are copied to the device.
        self._staging: dict[InputKey, deque[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        # Elsewhere one buffer per input size, refilled for each batch.
        self._gathered: dict[InputKey, torch.Tensor] = {}

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _rows_free(self, most: int) -> int:
        """How many rows, up to ``most``, can be handed out in ring order now."""
        n = 0
        while n < most and not self._busy[(self._cursor + n) % len(self._busy)]:
            n += 1
        return n

    def _take_row(self) -> int:
        row = self._cursor
        self._busy[row] = True
        self._cursor = (row + 1) % len(self._busy)
        return row

    def _give_row(self, row: int) -> None:
        if row >= 0:
            self._busy[row] = False

    def starved(self) -> bool:
        """Whether the next file is still decoding (or not yet found): the models would wait for it."""
        return not (self.decoding and self.decoding[0][3].done())

    def _feed(self, may_wait: bool = False) -> None:
        """Start decoding files until the window is full, up to :attr:`chunk` files a task (fewer when discovery
        has not found more yet); with ``may_wait`` and nothing decoding, wait briefly for discovery to find one."""
        while not self.files.finished:
            room = self._rows_free(min(len(self.free), self.window - len(self.decoding)))
            if room <= 0 or (room < self.chunk and len(self.decoding) >= self.chunk):
                return  # later, with room for a whole task's worth
            got = self.files.poll(min(room, self.chunk), timeout=0.05 if may_wait and not self.decoding else 0.0)
            if not got:
                return
            entries: list[tuple[Found, int, int]] = []  # in the order found; slot and row -1: answered here
            answered: dict[int, Decoded] = {}
            for found in got:
                if found.passed is not None:  # passed over by the walk, never opened: its skipped.csv row
                    answered[len(entries)] = Decoded("skipped", error=f"{printable(str(found.path))}: {found.passed}")
                    entries.append((found, -1, -1))
                elif self.done_before(found):
                    self.resumed += 1
                else:
                    entries.append((found, self.free.popleft(), self._take_row()))
            calls = [(f, slot, row, self.jpeg_on_device, self.accept) for f, slot, row in entries if slot >= 0]
            parts = iter(self.workers.submit_each(decode_task, calls, self.chunk))
            for i, (found, slot, row) in enumerate(entries):
                self.decoding.append((found, slot, row, Part.ready(answered[i]) if slot < 0 else next(parts)))

    def __iter__(self) -> Iterator[Batch]:
        items: list[Item] = []
        failed: list[tuple[Found, Decoded]] = []
        while True:
            self._feed(may_wait=not items)
            progressed = False
            while self.decoding and self.decoding[0][3].done() and len(items) < self.batch_size:
                found, slot, row, part = self.decoding.popleft()
                try:
                    decoded = part.result()
                except BrokenProcessPool:
                    self.decoding.appendleft((found, slot, row, part))
                    self._recover()
                    continue
                progressed = True
                if decoded.status == "ok":
                    items.append(Item(found, slot, row, decoded))
                else:
                    failed.append((found, decoded))
                    if slot >= 0:
                        self.release(slot)
                    self._give_row(row)
                self._feed()
            idle = not self.decoding
            if items and (len(items) >= self.batch_size or idle):
                yield self._batch(items, failed)
                for item in items:  # the models are done with the batch's inputs
                    self._give_row(item.row)
                items, failed = [], []
                continue
            if idle and self.files.finished:
                if failed:
                    yield Batch([], {}, failed)
                return
            if progressed:
                continue
            # Nothing ready: let the consumer drain, then wait for the next decoded file, a slot or discovery.
            if not self.free or not self._rows_free(1):
                if not self.on_wait(True) and self.decoding:
                    self.workers.wait(self.decoding[0][3].future)
                continue
            self.on_wait(False)
            if self.decoding:
                self.workers.wait(self.decoding[0][3].future, timeout=None if self.files.finished else 0.05)

    def _recover(self) -> None:
        """A worker died (killed by a signal or the OOM killer: a bomb of a file, an operator) and took every task
        in flight with it. Start the pool again and redo those files one at a time: a file that kills its worker
        again is an error row naming it, and the others are read as if nothing had happened."""
        self.workers.revive()
        redone: deque[tuple[Found, int, int, Part[Decoded]]] = deque()
        for found, slot, row, part in self.decoding:
            future = part.future
            if future.done() and not future.cancelled() and future.exception() is None:
                redone.append((found, slot, row, part))
                continue
            again = self.workers.submit(decode_task, found, slot, row, self.jpeg_on_device, self.accept)
            try:
                decoded = again.result()
            except BrokenProcessPool:
                self.workers.revive()
                decoded = Decoded(
                    "error",
                    error=f"{printable(str(found.path))}: the worker reading it died (killed by a signal, or out of "
                    "memory): not triaged; check the file with `pneumotriage inspect --decode`",
                )
            redone.append((found, slot, row, Part.ready(decoded)))
        self.decoding = redone

    def _batch(self, items: list[Item], failed: list[tuple[Found, Decoded]]) -> Batch:
        on_device = [it for it in items if it.decoded.jpeg is not None]
        decoded: dict[int, torch.Tensor] = {}
        if on_device:
            on_device, decoded = self._decode_on_device(on_device, failed)
            kept = {id(it) for it in on_device}
            items = [it for it in items if it.decoded.jpeg is None or id(it) in kept]
        if not items:
            return Batch([], {}, failed)
        inputs: dict[InputKey, torch.Tensor] = {}
        rows = {id(it): i for i, it in enumerate(items)}
        in_slots = [it for it in items if it.decoded.jpeg is None]
        for key in self.arena.keys:
            if not on_device:
                inputs[key] = self._to_device([it.row for it in items], key)
                continue
            size = key.size
            x = torch.empty(len(items), 1, size, size, device=self.device)
            x[[rows[id(it)] for it in on_device]] = decoded[size]
            if in_slots:
                x[[rows[id(it)] for it in in_slots]] = self.arena.batch([it.row for it in in_slots], key).to(
                    self.device
                )
            inputs[key] = x
        return Batch(items, inputs, failed)

    def _to_device(self, rows: list[int], key: InputKey) -> torch.Tensor:
        """The images of ``rows`` at ``size`` as one (B, 1, S, S) tensor on the device. On a CPU it is the arena's
        own memory where the rows follow one another (as the ring hands them out), else a copy. On CUDA they are
        gathered straight into a pinned buffer, whose copy runs asynchronously (one copy fewer than from pageable
        memory); a buffer is refilled only once its previous copy is done."""
        if self.device.type != "cuda":
            # The batch is used before the next one is asked for, and so before its rows are handed out again.
            part = self.arena.view(rows, key) if self.device.type == "cpu" else None
            if part is None:
                # One kept buffer per input (fresh memory costs a page fault every 4 kB).
                held = self._gathered.get(key)
                if held is None:
                    held = self._gathered[key] = torch.empty(self.batch_size, 1, key.size, key.size)
                part = self.arena.batch(rows, key, out=held[: len(rows)])
            return part if self.device.type == "cpu" else part.to(self.device)
        turn = self._staging.setdefault(key, deque())
        if len(turn) < 2:
            turn.append((torch.empty(self.batch_size, 1, key.size, key.size, pin_memory=True), None))
        buffer, copied = turn.popleft()
        if copied is not None:
            copied.synchronize()
        part = self.arena.batch(rows, key, out=buffer[: len(rows)])
        on_device = part.to(self.device, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        turn.append((buffer, event))
        return on_device

    def _decode_on_device(
        self, items: list[Item], failed: list[tuple[Found, Decoded]]
    ) -> tuple[list[Item], dict[int, torch.Tensor]]:
        """Decode the items' JPEG frames together on the device; if the batch fails (one damaged stream fails
        nvJPEG's whole batch), one by one, turning those that fail into error rows."""

        def run(group: list[Item]) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
            frames = [it.decoded.jpeg or b"" for it in group]
            invert = [it.decoded.invert for it in group]
            return decode_jpegs_on_device(frames, invert, self.arena.native_sizes, self.device)

        try:
            decoded, displays, shapes = run(items)
        except RuntimeError:
            good: list[Item] = []
            for it in items:
                try:
                    run([it])
                    good.append(it)
                except RuntimeError as exc:
                    it.decoded.status, it.decoded.error = (
                        "error",
                        f"{it.found.path}: JPEG pixel data does not decode ({exc})",
                    )
                    failed.append((it.found, it.decoded))
                    self.release(it.slot)
            items = good
            if not items:
                return [], {}
            decoded, displays, shapes = run(items)
        for it, display in zip(items, displays, strict=True):
            # The worker checked the header's size against the JPEG's own frame header, so shapes agree.
            shown = display.numpy()
            self.arena.display(it.slot, it.decoded.display_shape)[...] = shown
            it.decoded.thumb = grey_thumbnail(shown)
        return items, decoded


@contextlib.contextmanager
def decoded_batches(
    files: Sequence[tuple[Path, str]],
    keys: Sequence[InputKey],
    plan: Plan,
    device: torch.device,
    *,
    accept: tuple[str, ...] = (),
) -> Iterator[Iterator[tuple[list[int], Batch]]]:
    """Decode ``files`` ((path, image id) pairs) at each of ``keys`` as the scan does, in worker processes, and
    yield ``(positions, batch)``: the positions in ``files`` of the batch's images, in order. The files that
    could not be used come in ``batch.failed`` (their positions are ``int(found.key)``). A batch's slots are
    handed back when the next batch is asked for: use its inputs before that."""
    found = iter([Found(Path(path), image_id, str(i)) for i, (path, image_id) in enumerate(files)])
    jpeg_on_device = plan.jpeg_on_device and all(k.pipeline == NATIVE for k in keys)
    slots, rows = slots_for(plan, finishing=False), rows_for(plan)
    with Workers(plan.workers, slots=slots, keys=list(keys), map_size=None, rows=rows) as pool:
        stream = Stream(
            Discovery([], found),
            pool,
            batch_size=plan.batch_size,
            window=window_for(plan),
            device=device,
            jpeg_on_device=jpeg_on_device,
            accept=accept,
        )

        def batches() -> Iterator[tuple[list[int], Batch]]:
            for batch in stream:
                yield [int(item.found.key) for item in batch.items], batch
                for item in batch.items:
                    stream.release(item.slot)

        yield batches()


def model_inputs(paths: Sequence[Path], key: InputKey) -> Iterator[tuple[int, np.ndarray, tuple[bool, bool]]]:
    """For each file the scan can read, its position, the model input ``key`` the scan makes of it, and how it
    was turned upright; files the scan would not triage are passed over."""
    arena = SlotArena(1, [key], None, inherited=True)
    try:
        for i, path in enumerate(paths):
            try:
                source = read(Path(path), want_jpeg=False)
                decode_into(source, arena, 0, 0)
            except (PneumotriageError, NotTriaged):
                continue
            yield i, arena.image(0, key).copy(), source.flip
    finally:
        arena.close()

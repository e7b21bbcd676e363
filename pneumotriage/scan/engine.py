"""The scan's pipeline: the stages of this package wired together, streaming, with bounded memory.

    discover (thread) -> read + decode (workers) -> classify -> gate -> segment (this process, on the device)
    -> finish (workers) -> journal -> rank -> outputs

The main process only runs the models and moves small records: pixels and probability maps travel through the
shared slot arena. At most ``window`` files are being decoded and at most one arena of slots is in use, so
memory stays flat whatever the folder's size; results reach the journal in the order files were found.

Why one module of ~600 lines: the pipeline is one loop whose stages share the slot arena, the window of files
in flight and the journal; each stage's own work lives in its module (``read``, ``decode``, ``classify``, ...),
and what remains here is the order they run in, which reads best in one place.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumotriage.errors import OutputError, PneumotriageError, UsageError
from pneumotriage.io import printable
from pneumotriage.models import LoadedModel
from pneumotriage.pipelines import NATIVE, InputKey
from pneumotriage.runtime import Progress, pick_device, use_bf16
from pneumotriage.scan.classify import choose_backends, classify, prepare_models
from pneumotriage.scan.decode import decode_jpegs_on_device, turned
from pneumotriage.scan.discover import Discovery, Found
from pneumotriage.scan.finish import FinishJob, finish, grey_thumbnail, plain_path, thumbnail_path
from pneumotriage.scan.gate import to_segment
from pneumotriage.scan.journal import JOURNAL_VERSION, Journal, OutLock
from pneumotriage.scan.options import ScanOptions, plan_for, scan_thresholds
from pneumotriage.scan.outputs import summarise, write_outputs
from pneumotriage.scan.records import ImageResult, ScanSummary
from pneumotriage.scan.report import ReportThumbnails
from pneumotriage.scan.segment import segment
from pneumotriage.scan.shards import Shard, claim_layout, shard_started, write_shard
from pneumotriage.scan.tiers import rank, tier_of
from pneumotriage.scan.workers import Decoded, Workers, decode_task, done_future, finish_task, thumbnail_task

#: Niceness of the worker processes on a CPU: decoding needs a few ms per image against the models' hundreds,
#: so the workers fill the models' idle moments instead of taking cores from them.
WORKER_NICE = 10
_NO_DISPLAY = np.zeros((0, 0), dtype=np.uint8)


@dataclass
class Item:
    """A file on its way through the pipeline, and the slot it holds."""

    found: Found
    slot: int
    decoded: Decoded


@dataclass
class Batch:
    """Decoded images ready for the models: ``inputs`` maps each input size to a (B, 1, S, S) tensor on the
    device. ``failed`` are the files met since the previous batch that could not be used (their slots are
    already free)."""

    items: list[Item]
    inputs: dict[InputKey, torch.Tensor]
    failed: list[tuple[Found, Decoded]] = field(default_factory=list)


class Stream:
    """Decoded batches from a stream of files: keeps ``window`` files decoding in the workers, hands out batches
    of ``batch_size`` in the order files were found (a smaller batch whenever the workers would otherwise wait
    for discovery), and takes slots back through :meth:`release`.

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
        self.batch_size = batch_size
        self.window = window
        self.device = device
        self.jpeg_on_device = jpeg_on_device
        self.done_before = done_before
        self.on_wait = on_wait
        self.accept = accept
        self.decoding: deque[tuple[Found, int, Future[Decoded]]] = deque()
        self.resumed = 0  # files done by an earlier run, passed over
        # CUDA: two pinned buffers per input size, used in turn, from which batches are copied to the device.
        self._staging: dict[InputKey, deque[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def starved(self) -> bool:
        """Whether the next file is still decoding (or not yet found): the models would wait for it."""
        return not (self.decoding and self.decoding[0][2].done())

    def _feed(self, may_wait: bool = False) -> None:
        """Start decoding files until the window is full; with ``may_wait`` and nothing decoding, wait briefly
        for discovery to find one."""
        while self.free and len(self.decoding) < self.window and not self.files.finished:
            got = self.files.poll(1, timeout=0.05 if may_wait and not self.decoding else 0.0)
            if not got:
                return
            found = got[0]
            if found.passed is not None:  # passed over by the walk, never opened: its skipped.csv row
                error = f"{printable(str(found.path))}: {found.passed}"
                self.decoding.append((found, -1, done_future(Decoded("skipped", error=error))))
                continue
            if self.done_before(found):
                self.resumed += 1
                continue
            slot = self.free.popleft()
            future = self.workers.submit(decode_task, found, slot, self.jpeg_on_device, self.accept)
            self.decoding.append((found, slot, future))

    def __iter__(self) -> Iterator[Batch]:
        items: list[Item] = []
        failed: list[tuple[Found, Decoded]] = []
        while True:
            self._feed(may_wait=not items)
            progressed = False
            while self.decoding and self.decoding[0][2].done() and len(items) < self.batch_size:
                found, slot, future = self.decoding.popleft()
                try:
                    decoded = future.result()
                except BrokenProcessPool:
                    self.decoding.appendleft((found, slot, future))
                    self._recover()
                    continue
                progressed = True
                if decoded.status == "ok":
                    items.append(Item(found, slot, decoded))
                else:
                    failed.append((found, decoded))
                    if slot >= 0:
                        self.release(slot)
                self._feed()
            idle = not self.decoding
            if items and (len(items) >= self.batch_size or idle):
                yield self._batch(items, failed)
                items, failed = [], []
                continue
            if idle and self.files.finished:
                if failed:
                    yield Batch([], {}, failed)
                return
            if progressed:
                continue
            # Nothing ready: let the consumer drain, then wait for the next decoded file, a slot or discovery.
            if not self.free:
                if not self.on_wait(True) and self.decoding:
                    wait([self.decoding[0][2]], return_when=FIRST_COMPLETED)
                continue
            self.on_wait(False)
            if self.decoding:
                wait([self.decoding[0][2]], timeout=None if self.files.finished else 0.05)

    def _recover(self) -> None:
        """A worker died (killed by a signal or the OOM killer: a bomb of a file, an operator) and took every task
        in flight with it. Start the pool again and redo those files one at a time: a file that kills its worker
        again is an error row naming it, and the others are read as if nothing had happened."""
        self.workers.revive()
        redone: deque[tuple[Found, int, Future[Decoded]]] = deque()
        for found, slot, future in self.decoding:
            if future.done() and not future.cancelled() and future.exception() is None:
                redone.append((found, slot, future))
                continue
            again = self.workers.submit(decode_task, found, slot, self.jpeg_on_device, self.accept)
            try:
                decoded = again.result()
            except BrokenProcessPool:
                self.workers.revive()
                decoded = Decoded(
                    "error",
                    error=f"{printable(str(found.path))}: the worker reading it died (killed by a signal, or out of "
                    "memory): not triaged; check the file with `pneumotriage inspect --decode`",
                )
            redone.append((found, slot, done_future(decoded)))
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
                inputs[key] = self._to_device([it.slot for it in items], key)
                continue
            size = key.size
            x = torch.empty(len(items), 1, size, size, device=self.device)
            x[[rows[id(it)] for it in on_device]] = decoded[size]
            if in_slots:
                x[[rows[id(it)] for it in in_slots]] = self.arena.batch([it.slot for it in in_slots], key).to(
                    self.device
                )
            inputs[key] = x
        return Batch(items, inputs, failed)

    def _to_device(self, slots: list[int], key: InputKey) -> torch.Tensor:
        """The images of ``slots`` at ``size`` as one (B, 1, S, S) tensor on the device. On CUDA they are gathered
        straight into a pinned buffer, whose copy runs asynchronously (one copy fewer than from pageable memory);
        a buffer is refilled only once its previous copy is done."""
        if self.device.type != "cuda":
            return self.arena.batch(slots, key).to(self.device)
        turn = self._staging.setdefault(key, deque())
        if len(turn) < 2:
            turn.append((torch.empty(self.batch_size, 1, key.size, key.size, pin_memory=True), None))
        buffer, copied = turn.popleft()
        if copied is not None:
            copied.synchronize()
        part = buffer[: len(slots)]
        np.stack([self.arena.image(s, key) for s in slots], out=part.numpy()[:, 0])
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


def _model_info(m: LoadedModel | None, role: str) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "role": role,
        "name": m.name or (m.path.name if m.path else None),
        "model": m.spec.title,
        "input_size": m.spec.input_size,
        "sha256": m.sha256,
        "clinical": bool(m.meta.get("clinical", True)),
        "note": m.meta.get("note"),
        "pipeline": m.spec.pipeline,
        **({"members": m.meta["members"]} if m.meta.get("members") else {}),
        **({"imported": m.meta["imported"]} if isinstance(m.meta.get("imported"), dict) else {}),
        **({"onnx": _onnx_info(m.meta["onnx"])} if isinstance(m.meta.get("onnx"), dict) else {}),
    }


def _onnx_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a model read from an ONNX file says of where it came from and, for an int8 one, its accuracy."""
    return {k: info[k] for k in ("source", "exported", "quantization") if k in info}


def _backend(options: ScanOptions) -> str:
    """The backend asked for; a compiled scan (``--compile``) is torch's."""
    if options.compile and options.backend not in ("auto", "torch"):
        raise UsageError(f"--compile compiles torch's models: it does not go with --backend {options.backend}")
    return "torch" if options.compile else options.backend


def _error_row(found: Found, decoded: Decoded, error: str | None = None) -> ImageResult:
    """The row of a file that was not triaged: not readable ("error"), refused by the input check ("not
    triaged"), or (``error``) given an answer the scan cannot trust."""
    return ImageResult(
        **{"image_id": found.image_id, "path": str(found.path), "key": found.key, **decoded.identity},
        seq=found.seq,
        status="error" if error is not None or decoded.status == "ok" else decoded.status,
        error=error or decoded.error,
    )


def _untrusted(found: Found, role: str, value: float) -> str:
    return (
        f"{found.path}: the {role} gave {value} for it, not a probability: the model's weights or its input are "
        "damaged (a NaN weight gives this; check or re-make the checkpoint); not triaged"
    )


def run(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions | None = None,
    progress: Progress | None = None,
    files: Iterator[Found] | None = None,
    shard: Shard | None = None,
) -> ScanSummary:
    """Scan DICOM files or folders into ``out`` and return the ranked results (see the package docstring).

    ``files`` replaces the walk of ``inputs`` (tests use it to stand in for a slow file system). An output that
    cannot be written (a full disk, a read-only folder) stops the scan with an :class:`OutputError`; the
    images journaled so far are kept, and ``--resume`` goes on from them.

    With ``shard``, only the files of that shard are scanned, into its own journal; the summary returned holds
    that shard's rows, and the worklist, submission and report are left to
    :func:`pneumotriage.scan.merge.merge` once every shard is done."""
    out = Path(out)
    _check_out(out)
    # What this scan would make and found not there: a scan that finds nothing to scan takes it away again.
    made = [
        d for d in (out, out / ".scan", out / ".scan" / "thumbs", out / "masks", out / "overlays") if not d.exists()
    ]
    try:
        with contextlib.ExitStack() as held:  # what the scan holds (the lock on --out) until its outputs are written
            return _run(inputs, out, classifier, segmenter, options or ScanOptions(), progress, files, held, shard)
    except NothingToScan:
        _take_back(out, made)
        raise
    except OSError as exc:
        raise _output_error(exc, out) from None
    except MemoryError:
        raise _out_of_memory() from None


class NothingToScan(UsageError):
    """The inputs hold no DICOM file."""


def _take_back(out: Path, made: Sequence[Path]) -> None:
    """Remove the folders an empty scan made (with its lock, journal and signature), leaving every folder that was
    there before and anything another process put into them."""
    if out / ".scan" in made:
        for name in ("lock", "journal.jsonl", "signature.json"):
            (out / ".scan" / name).unlink(missing_ok=True)
    for folder in reversed(made):  # the deepest first
        with contextlib.suppress(OSError):  # not empty: it is not ours alone
            folder.rmdir()


def _out_of_memory() -> PneumotriageError:
    return PneumotriageError(
        "out of memory while scanning",
        hint="give fewer --workers or a smaller --batch-size; the images finished so far are kept for --resume",
    )


def _check_out(out: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", path=out, hint="choose a folder for the outputs")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out lies under {parent}, which is a file", path=out, hint="choose a folder")
            break


def _output_error(exc: OSError, out: Path) -> PneumotriageError:
    if exc.errno == errno.ENOMEM:  # an mmap or a fork that found no memory: not --out's fault
        return _out_of_memory()
    where = exc.filename or out
    reason = exc.strerror or type(exc).__name__
    hint = "choose an --out you can write to"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, then rerun with --resume: the images finished so far are kept"
    return OutputError(f"cannot write: {reason}", path=printable(str(where)), hint=hint)


def _run(
    inputs: Iterable[str | Path],
    out: Path,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions,
    progress: Progress | None,
    files: Iterator[Found] | None,
    held: contextlib.ExitStack,
    shard: Shard | None = None,
) -> ScanSummary:
    emit = progress or (lambda event: None)
    if classifier is None and segmenter is None:
        raise UsageError("a scan needs a classifier, a segmenter, or both")
    if options.no_segment:
        segmenter = None
        if classifier is None:
            raise UsageError("--no-segment triages on the classifier alone: give --classifier")
    roots = [Path(p) for p in inputs]
    for p in roots:
        if not p.exists():
            raise UsageError("no such file or folder", path=p)
    if options.dicom_seg or options.dicom_sr:
        from pneumotriage.scan.pacs import require

        require()  # before anything is scanned
    thresholds = scan_thresholds(classifier, segmenter, options)
    device = pick_device(options.device)
    plan = plan_for(options, device, max(m.spec.input_size for m in (classifier, segmenter) if m is not None))
    bf16 = use_bf16(device, options.precision)
    models = [m for m in (_model_info(classifier, "classifier"), _model_info(segmenter, "segmenter")) if m]
    inputs = sorted({os.path.realpath(p) for p in roots})
    signature = {
        "version": JOURNAL_VERSION,
        "models": models,
        "thresholds": thresholds.as_dict(),
        "options": options.signature(),
        "inputs": inputs,
    }
    if shard is not None:
        signature["shards"] = shard.count  # the same for every shard: merge compares them
    t_start = time.perf_counter()

    # The lock is taken before the journal is read: no second scan into this --out (or this shard of it).
    _refuse_links(out, [".scan", ".scan/shards", ".scan/thumbs", "masks", "overlays", "dicom"])
    folder = claim_layout(out, shard)
    _refuse_links(folder, ["", "journal.jsonl", "signature.json", "lock", "results.jsonl", "done.json"])
    held_by = "another scan is writing to this output folder"
    if shard is not None:
        held_by = f"another process is scanning shard {shard.label} of this output folder"
    held.enter_context(OutLock(folder, out, held=held_by))
    journal: Journal | None = None
    threads_before = torch.get_num_threads()
    try:
        journal = Journal(folder, signature, options.resume, no_phi=options.no_phi, out=out)
        if shard is not None:
            shard_started(folder)  # a merge meanwhile counts this shard as unfinished
        resumed = len(journal.done)
        for sub in ("masks", "overlays", ".scan/thumbs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        keys = [m.spec.input_key for m in (classifier, segmenter) if m is not None]
        map_size = segmenter.spec.input_size if segmenter is not None else None

        if device.type == "cpu":
            torch.set_num_threads(plan.torch_threads)
        loaded = (classifier, segmenter)
        classifier, segmenter = prepare_models(
            device, classifier, segmenter, compile_batch=plan.batch_size if options.compile else None
        )
        (classifier, segmenter), choices = choose_backends(
            device,
            (loaded[0], classifier),
            (loaded[1], segmenter),
            backend=_backend(options),
            batch=plan.batch_size,
            threads=plan.torch_threads,
        )
        backends = {k: c.as_dict() for k, c in zip(("classifier", "segmenter"), choices, strict=True) if c}
        plan = replace(plan, backends=backends)
        window = max(2 * plan.batch_size, plan.batch_size + 2 * plan.workers)
        # Slots are held while decoding, in the models and, for a segmented image, until it is finished (finish
        # tasks queue behind decode tasks): too few and the workers starve.
        slots = 3 * window + 2 * plan.batch_size
        counts = {"decoded": 0, "classified": 0, "segmented": 0, "errors": 0}
        seen: list[str] = []  # keys in the order found: the worklist holds these, and only these
        skipped_rows: list[ImageResult] = []
        # Images on their way to the journal, in the order found: (slot held or -1, result, report thumbnail).
        # A worker's finish keeps its job: should the worker die, the image is finished here from its slot.
        finishing: deque[tuple[int, Future[tuple[ImageResult, bytes | None]], bytes | None, FinishJob | None]] = deque()
        thumbs = ReportThumbnails(options.report_thumbnails)
        synced = [time.perf_counter()]  # the journal's last fsync: one a second, not one a batch (~1 ms each)
        model_s = 0.0
        nice = WORKER_NICE if device.type == "cpu" else 0
        # On a CPU the models' process would only wait while decoding lags, so it finishes images itself then; on
        # a GPU it is the feeder, and every millisecond it spends finishing the GPU waits.
        finish_here = device.type == "cpu"
        with Workers(plan.workers, slots=slots, keys=keys, map_size=map_size, nice=nice) as workers:

            def drain(block: bool) -> bool:
                """Journal finished images from the head of the queue; True when one was."""
                any_done = False
                while finishing and (finishing[0][1].done() or (block and not any_done)):
                    slot, future, grey, job = finishing.popleft()
                    try:
                        result, outlined = future.result()
                    except BrokenProcessPool:
                        if job is None:
                            raise
                        workers.revive()
                        result, outlined = finish_task(job, slot)
                    journal.add(result)
                    if slot >= 0:
                        stream.release(slot)
                    # An outlined image's thumbnail is its own (or, with an overlay, cut from it at the end),
                    # never the grey one.
                    thumb = outlined if result.mask_file else grey
                    if thumb is not None:
                        result.tier = tier_of(result, thresholds, options, segmenter is not None)
                        thumbs.offer(result, thumb)
                    any_done = True
                if time.perf_counter() - synced[0] > 1.0:  # durable against a power cut at least every second
                    journal.sync()
                    synced[0] = time.perf_counter()
                return any_done

            def seen_or_done(found: Found) -> bool:
                seen.append(found.key)
                done = journal.done.get(found.key)
                if done is not None and done.file_stem in (None, found.name):
                    done.seq = found.seq  # its place in this walk (files added since move it)
                    return True
                # Done again: the file changed since (its old files go), or files added to the inputs since
                # now give its name to another file.
                stale = done or journal.stale_for(str(found.path), found.key)
                if stale is not None:
                    _remove_files(out, stale)
                    journal.forget(stale.key)
                return False

            # Never its own outputs; with a shard, only that shard's files.
            discovery = Discovery(roots, files, exclude=[out], shard=shard)
            stream = Stream(
                discovery,
                workers,
                batch_size=plan.batch_size,
                window=window,
                device=device,
                # nvJPEG's path makes the tool's own inputs only; an imported model's pipeline reads stored pixels
                jpeg_on_device=plan.jpeg_on_device and all(k.pipeline == NATIVE for k in keys),
                done_before=seen_or_done,
                on_wait=drain,
                accept=options.accept,
            )
            emit({"event": "start", "resumed": resumed, "plan": plan.as_dict()})
            for batch in stream:
                for found, decoded in batch.failed:
                    row = _error_row(found, decoded)
                    if decoded.status == "skipped":  # not DICOM: listed apart, never an image row
                        row.status = "skipped"
                        skipped_rows.append(row)  # not journaled: re-sniffed on a resume, in no time
                    else:
                        finishing.append((-1, done_future((row, None)), None, None))
                        counts["errors"] += 1
                n = len(batch.items)
                if n:
                    t0 = time.perf_counter()
                    probs = None
                    if classifier is not None:
                        probs = classify(classifier, batch.inputs[classifier.spec.input_key], device, bf16=bf16)
                        counts["classified"] += n
                    # A model's answer that is not a number (NaN weights, an overflow) is never a tier: such an
                    # image is an error row naming the model, and the scan exits non-zero.
                    untrusted: dict[int, str] = {}
                    if probs is not None:
                        for i in np.flatnonzero(~np.isfinite(probs)).tolist():
                            untrusted[i] = _untrusted(batch.items[i].found, "classifier", float(probs[i]))
                    chosen = (
                        [
                            i
                            for i in to_segment(probs, n, thresholds.gate, segment_all=options.segment_all)
                            if i not in untrusted
                        ]
                        if segmenter is not None
                        else []
                    )
                    scores: dict[int, float] = {}
                    if chosen and segmenter is not None:
                        x = batch.inputs[segmenter.spec.input_key]
                        maps, present = segment(
                            segmenter, x[chosen] if len(chosen) < n else x, device, options.tta, bf16=bf16
                        )
                        maps_np, present_np = maps.cpu().numpy(), present.cpu().numpy()
                        for j, i in enumerate(chosen):
                            item = batch.items[i]
                            if not (math.isfinite(float(present_np[j])) and np.isfinite(maps_np[j]).all()):
                                untrusted[i] = _untrusted(item.found, "segmenter", float(np.max(maps_np[j])))
                                continue
                            # The map of an image turned upright for the models, turned back to the stored grid.
                            workers.arena.map(item.slot)[...] = turned(maps_np[j], item.decoded.flip)
                            scores[i] = float(present_np[j])
                        counts["segmented"] += len(chosen)
                    model_s += time.perf_counter() - t0
                    counts["decoded"] += n
                    for i, item in enumerate(batch.items):
                        d = item.decoded
                        if i in untrusted:
                            row = _error_row(item.found, d, untrusted[i])
                            finishing.append((-1, done_future((row, None)), None, None))
                            counts["errors"] += 1
                            stream.release(item.slot)
                            continue
                        job = FinishJob(
                            name=item.found.name,
                            identity={
                                "image_id": item.found.image_id,
                                **d.identity,
                                "seq": item.found.seq,
                                "notes": d.notes,
                            },
                            shape=d.shape,
                            display_shape=d.display_shape,
                            spacing=d.spacing,
                            probability=float(probs[i]) if probs is not None else scores.get(i),
                            segmented=i in scores,
                            thresholds=thresholds,
                            overlays=options.overlays,
                            out=out,
                            mirrored=d.flip[0],
                        )
                        thumb = d.thumb
                        if job.segmented and workers.count and (not finish_here or not stream.starved()):
                            # Post-processing and encoding in a worker, from the slot, while the models go on.
                            future = workers.submit(finish_task, job, item.slot)
                            finishing.append((item.slot, future, thumb, job))
                        elif job.segmented:
                            # The models would only wait for decoding: finish here meanwhile, and leave the
                            # workers to decode (what bounds a scan whose models are faster than its decoding).
                            finishing.append((-1, done_future(finish_task(job, item.slot)), thumb, None))
                            stream.release(item.slot)
                        else:  # nothing to compute or write: finished here, the slot free at once
                            finishing.append((-1, done_future(finish(job, None, _NO_DISPLAY)), thumb, None))
                            stream.release(item.slot)
                drain(False)
                emit(
                    {
                        "event": "batch",
                        "discovered": discovery.found,
                        "walk_done": discovery.walk_done,
                        "walked": discovery.walked,
                        "skipped": len(skipped_rows),
                        "resumed": stream.resumed,
                        **counts,
                    }
                )
            while finishing:
                drain(True)
            journal.close()

            results = [journal.done[k] for k in dict.fromkeys(seen) if k in journal.done]
            # Images done before a resume whose files are gone from the inputs: their outputs go too.
            kept = {f for r in results for f in (r.mask_file, r.overlay_file, r.file_stem) if f}
            for gone in set(journal.done) - set(seen):
                _remove_files(out, journal.done[gone], keep=kept)
            if not results and shard is None:  # a shard of a small archive may hold none
                hint = f"{len(skipped_rows)} files found, none of them DICOM" if skipped_rows else None
                raise NothingToScan("no DICOM files found", path=roots[0] if roots else None, hint=hint)
            segmented_run = segmenter is not None
            for r in results:
                r.tier = tier_of(r, thresholds, options, segmented_run)
            ranked = rank(results)
            # A shard writes the thumbnails of its own first rows: the merged worklist's first rows are among them.
            thumbs.write(out, ranked, lambda rows: _decode_thumbnails(workers, out, rows))
            dicom_notes = (
                _write_dicom(workers, out, ranked, models, options) if options.dicom_seg or options.dicom_sr else []
            )
    finally:
        torch.set_num_threads(threads_before)
        if journal is not None:
            journal.close()
    summary = summarise(
        out,
        ranked,
        counts={**counts, "resumed": stream.resumed},
        models=models,
        thresholds=thresholds,
        no_segment=options.no_segment,
        urgent_probability=options.urgent_probability,
        plan=plan.as_dict(),
        skipped=skipped_rows,
        timings={"model_s": model_s, "total_s": time.perf_counter() - t_start},
        notes=tuple(dicom_notes),
    )
    if shard is not None:
        write_shard(folder, summary, signature)
    else:
        write_outputs(
            summary, rle_relative=options.rle_relative, no_phi=options.no_phi, submission=options.writes_submission()
        )
    emit({"event": "done", **summary.counts})
    return summary


def _refuse_links(base: Path, names: Sequence[str]) -> None:
    """Refuse to scan into an ``--out`` where a folder or a file the scan writes in place is a symbolic link
    (planted, or left by a copy): a write through it would land outside ``--out``. Files written atomically are
    safe by themselves (the rename replaces a link, never follows it)."""
    for name in names:
        path = base / name if name else base
        if path.is_symlink():
            raise UsageError(
                "is a symbolic link: a scan writes nothing through one",
                path=printable(str(path)),
                hint="remove the link, or choose another --out",
            )


def _remove_files(out: Path, result: ImageResult, keep: Collection[str] = ()) -> None:
    """Delete the mask, overlay and report pictures of an image that no longer belongs to this scan (those
    named in ``keep`` belong to another image and stay)."""
    stem = result.file_stem
    for path in (result.mask_file, result.overlay_file):
        if path and path not in keep:
            (out / path).unlink(missing_ok=True)
    if stem and stem not in keep:
        thumbnail_path(out, stem).unlink(missing_ok=True)
        plain_path(out, stem).unlink(missing_ok=True)


def _write_dicom(
    workers: Workers, out: Path, ranked: Sequence[ImageResult], models: list[dict[str, Any]], options: ScanOptions
) -> list[str]:
    """The DICOM SEG and SR objects of every readable image, made in the workers once the tiers are known;
    returns a note for the images whose objects could not be made (their rows stand)."""
    from pneumotriage.scan.pacs import dicom_task

    rows = [r for r in ranked if r.status == "ok"]
    (out / "dicom").mkdir(exist_ok=True)
    n = len(rows)
    failed = [
        e
        for e in workers.map(
            dicom_task,
            rows,
            [out] * n,
            [models] * n,
            [options.dicom_seg] * n,
            [options.dicom_sr] * n,
            [options.no_phi] * n,
        )
        if e
    ]
    if not failed:
        return []
    return [f"{len(failed)} image(s) got no DICOM SEG/SR, e.g. {failed[0]}"]


def _decode_thumbnails(workers: Workers, out: Path, rows: Sequence[ImageResult]) -> None:
    """Report thumbnails of ``rows`` not kept while scanning (outlined images with an overlay, images done before
    a resume), made in the workers."""
    workers.map(
        thumbnail_task,
        [r.path for r in rows],
        [out] * len(rows),
        [r.file_stem for r in rows],
        [r.mask_file for r in rows],
        [r.overlay_file for r in rows],
    )

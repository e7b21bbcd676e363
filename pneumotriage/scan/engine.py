"""The scan's pipeline: the stages of this package wired together, streaming, with bounded memory.

    discover (thread) -> read + decode (workers) -> classify -> gate -> segment (this process, on the device)
    -> finish (workers) -> journal -> rank -> outputs

The main process only runs the models and moves small records: pixels and the part of each probability map an
outline can come from travel through the shared slot arena, and work goes to the workers a few files or images
to a task. At most ``window`` files are being decoded and at most one arena of slots is in use, so memory stays
flat whatever the folder's size; results reach the journal in the order files were found.

Each stage's own work lives in its module (``read``, ``decode``, ``classify``, ...); the decoded batches come
from :mod:`~pneumotriage.scan.stream`. What remains here is the order the stages run in: :func:`run` sets a scan
up and writes its outputs, and ``_Scan`` holds what the stages share while the batches go through.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumotriage.errors import UsageError
from pneumotriage.models import LoadedModel
from pneumotriage.outlayout import OutLayout
from pneumotriage.pipelines import NATIVE
from pneumotriage.postprocess import Thresholds
from pneumotriage.runtime import Progress, pick_device, progress_event, use_bf16
from pneumotriage.scan import outdir
from pneumotriage.scan.discover import Discovery, Found
from pneumotriage.scan.finish import FinishJob, MapWindow, finish
from pneumotriage.scan.gate import to_segment
from pneumotriage.scan.infer import MapWindows, classify, model_info, ready_for_scan
from pneumotriage.scan.journal import JOURNAL_VERSION, Journal
from pneumotriage.scan.options import Outputs, Plan, ScanOptions, plan_for, scan_thresholds
from pneumotriage.scan.outputs import summarise, write_outputs
from pneumotriage.scan.records import ImageResult, ScanSummary
from pneumotriage.scan.report import ReportThumbnails
from pneumotriage.scan.shards import Shard, shard_started, write_shard
from pneumotriage.scan.stream import Batch, Item, Stream, rows_for, slots_for, window_for
from pneumotriage.scan.tiers import tier_of, tiered
from pneumotriage.scan.workers import MAX_CHUNK, Part, Workers, error_row, finish_task

#: Niceness of the worker processes on a CPU: decoding needs a few ms per image against the models' hundreds,
#: so the workers fill the models' idle moments instead of taking cores from them.
WORKER_NICE = 10
_NO_DISPLAY = np.zeros((0, 0), dtype=np.uint8)


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
    :func:`pneumotriage.scan.merge.merge_shards` once every shard is done."""
    out = Path(out)
    outdir.check_out(out)
    # What this scan would make and found not there: a scan that finds nothing to scan takes it away again.
    made = [d for d in OutLayout(out).made_by_a_scan() if not d.exists()]
    try:
        with contextlib.ExitStack() as held:  # what the scan holds (the lock on --out) until its outputs are written
            return _run(inputs, out, classifier, segmenter, options or ScanOptions(), progress, files, held, shard)
    except NothingToScan:
        outdir.take_back(out, made)
        raise
    except OSError as exc:
        raise outdir.output_error(exc, out) from None
    except MemoryError:
        raise outdir.out_of_memory() from None


class NothingToScan(UsageError):
    """The inputs hold no DICOM file."""


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
    segmenter = _models_asked(classifier, segmenter, options)
    roots = _roots(inputs, options)
    thresholds = scan_thresholds(classifier, segmenter, options.decide)
    device = pick_device(options.run.device)
    plan = plan_for(options.run, device, max(m.spec.input_size for m in (classifier, segmenter) if m is not None))
    models = [m for m in (model_info(classifier, "classifier"), model_info(segmenter, "segmenter")) if m]
    signature = _signature(models, thresholds, options, roots, shard)
    t_start = time.perf_counter()
    folder = outdir.claim(out, shard, held)
    journal: Journal | None = None
    threads_before = torch.get_num_threads()
    try:
        journal = Journal(folder, signature, options.run.resume, no_phi=options.write.no_phi, out=out)
        if shard is not None:
            shard_started(folder)  # a merge meanwhile counts this shard as unfinished
        resumed = len(journal.done)
        layout = OutLayout(out)
        for kept in (layout.masks, layout.overlays, layout.thumbs):
            kept.mkdir(parents=True, exist_ok=True)
        keys = [m.spec.input_key for m in (classifier, segmenter) if m is not None]
        map_size = segmenter.spec.input_size if segmenter is not None else None
        if device.type == "cpu":
            torch.set_num_threads(plan.torch_threads)
        bf16 = use_bf16(device, options.decide.precision)
        (classifier, segmenter), plan = ready_for_scan(device, classifier, segmenter, options.run, plan, bf16=bf16)
        nice = WORKER_NICE if device.type == "cpu" else 0
        slots, rows = slots_for(plan, finishing=True), rows_for(plan)
        with Workers(plan.workers, slots=slots, keys=keys, map_size=map_size, rows=rows, nice=nice) as workers:
            scan = _Scan(out, (classifier, segmenter), thresholds, options, device, journal, workers, emit, bf16=bf16)
            stream = Stream(
                Discovery(roots, files, exclude=[out], shard=shard),  # never its own outputs; a shard's files only
                workers,
                batch_size=plan.batch_size,
                window=window_for(plan),
                device=device,
                # nvJPEG's path makes the tool's own inputs only; an imported model's pipeline reads stored pixels
                jpeg_on_device=plan.jpeg_on_device and all(k.pipeline == NATIVE for k in keys),
                done_before=scan.seen_or_done,
                on_wait=scan.drain,
                accept=options.decide.accept,
            )
            scan.stream = stream
            emit(progress_event("start", resumed=resumed, plan=plan.as_dict()))
            for batch in stream:
                scan.take(batch)
            ranked = scan.conclude(keep_empty=shard is not None, roots=roots)
            dicom_notes: list[str] = []
            if options.write.dicom_seg or options.write.dicom_sr:
                from pneumotriage.scan.pacs import write_dicom

                dicom_notes = write_dicom(workers, out, ranked, models, options.write)
    finally:
        torch.set_num_threads(threads_before)
        if journal is not None:
            journal.close()
    summary = scan.summary(ranked, models, plan, time.perf_counter() - t_start, dicom_notes)
    if shard is not None:
        write_shard(folder, summary, signature)
    else:
        write_outputs(
            summary,
            rle_relative=options.write.rle_relative,
            no_phi=options.write.no_phi,
            submission=options.writes_submission(),
        )
    emit(progress_event("done", **summary.counts))
    return summary


def _roots(inputs: Iterable[str | Path], options: ScanOptions) -> list[Path]:
    """The inputs, each of which must exist; with DICOM SEG/SR asked for, their packages must be installed
    (refused before anything is scanned)."""
    roots = [Path(p) for p in inputs]
    for p in roots:
        if not p.exists():
            raise UsageError("no such file or folder", path=p)
    if options.write.dicom_seg or options.write.dicom_sr:
        from pneumotriage.scan.pacs import require

        require()
    return roots


def _signature(
    models: list[dict[str, Any]], thresholds: Thresholds, options: ScanOptions, roots: list[Path], shard: Shard | None
) -> dict[str, Any]:
    """What a journal must have been written with for a scan to resume it (and the shards of a scan to merge)."""
    signature = {
        "version": JOURNAL_VERSION,
        "models": models,
        "thresholds": thresholds.as_dict(),
        "options": options.signature(),
        "inputs": sorted({os.path.realpath(p) for p in roots}),
    }
    if shard is not None:
        signature["shards"] = shard.count  # the same for every shard: merge compares them
    return signature


def _models_asked(
    classifier: LoadedModel | None, segmenter: LoadedModel | None, options: ScanOptions
) -> LoadedModel | None:
    """The segmenter the scan runs (none with ``--no-segment``); refuses a scan without the models it needs."""
    if classifier is None and segmenter is None:
        raise UsageError("a scan needs a classifier, a segmenter, or both")
    if options.decide.no_segment:
        if classifier is None:
            raise UsageError("--no-segment triages on the classifier alone: give --classifier")
        return None
    return segmenter


@dataclass
class _Finishing:
    """An image on its way to the journal. ``slot`` is held until it is journaled (-1: none); a worker's finish
    keeps its ``job``, so that should the worker die the image is finished here from its slot."""

    slot: int
    #: Its row and thumbnail when done; None until its worker's task is handed over (at the end of the batch).
    part: Part[tuple[ImageResult, bytes | None]] | None
    #: The report's grey thumbnail, for an image nothing is outlined on.
    grey: bytes | None = None
    job: FinishJob | None = None

    def done(self) -> bool:
        return self.part is not None and self.part.done()


class _Scan:
    """One scan's state while its batches go through, and the steps each batch takes: the models
    (:meth:`take`), each image's finish (:meth:`_finish`), the journal (:meth:`drain`), then the ranked end
    (:meth:`conclude`)."""

    stream: Stream

    def __init__(
        self,
        out: Path,
        models: tuple[LoadedModel | None, LoadedModel | None],
        thresholds: Thresholds,
        options: ScanOptions,
        device: torch.device,
        journal: Journal,
        workers: Workers,
        emit: Progress,
        *,
        bf16: bool,
    ) -> None:
        """``bf16``: whether the models run in bf16 on ``device`` (:func:`~pneumotriage.runtime.use_bf16`)."""
        self.out = out
        self.classifier, self.segmenter = models
        self.thresholds = thresholds
        self.options = options
        self.device, self.bf16 = device, bf16
        self.journal = journal
        self.workers = workers
        self.emit = emit
        self.counts = {"decoded": 0, "classified": 0, "segmented": 0, "errors": 0}
        self.seen: list[str] = []  # keys in the order found: the worklist holds these, and only these
        self.skipped_rows: list[ImageResult] = []
        self.finishing: deque[_Finishing] = deque()  # in the order found
        self.to_workers: list[_Finishing] = []  # this batch's images a worker finishes, handed over together
        self.thumbs = ReportThumbnails(options.write.report_thumbnails)
        self.synced = time.perf_counter()  # the journal's last fsync: one a second, not one a batch (~1 ms each)
        self.model_s = 0.0
        # On a CPU the models' process would only wait while decoding lags, so it finishes images itself then; on
        # a GPU it is the feeder, and every millisecond it spends finishing the GPU waits.
        self.finish_here = device.type == "cpu" and not options.run.finish_in_workers
        self.maps: MapWindows | None = None
        if self.segmenter is not None:
            floor = min(thresholds.top_score, thresholds.bottom_score)
            self.maps = MapWindows(self.segmenter, device, tta=options.decide.tta, floor=floor)

    def seen_or_done(self, found: Found) -> bool:
        """Note ``found`` as part of this scan; True when an earlier run finished it (it is not scanned again)."""
        self.seen.append(found.key)
        done = self.journal.done.get(found.key)
        if done is not None and done.file_stem in (None, found.name):
            done.seq = found.seq  # its place in this walk (files added since move it)
            return True
        # Done again: the file changed since (its old files go), or files added to the inputs since now give its
        # name to another file.
        stale = done or self.journal.stale_for(str(found.path), found.key)
        if stale is not None:
            outdir.remove_files(self.out, stale)
            self.journal.forget(stale.key)
        return False

    def drain(self, block: bool) -> bool:
        """Journal finished images from the head of the queue (with ``block``, wait for one); True when one was."""
        any_done = False
        try:
            while self.finishing and (self.finishing[0].done() or (block and not any_done)):
                head = self.finishing.popleft()
                assert head.part is not None
                try:
                    result, outlined = head.part.result()
                except BrokenProcessPool:
                    if head.job is None:
                        raise
                    self.workers.revive()
                    result, outlined = finish_task(head.job, head.slot)
                self.journal.add(result, flush=False)  # the lines of the images drained here in one write
                if head.slot >= 0:
                    self.stream.release(head.slot)
                # An outlined image's thumbnail is its own (with an overlay, cut from it at the end), never grey.
                thumb = outlined if result.mask_file else head.grey
                if thumb is not None:
                    result.tier = tier_of(result, self.thresholds, self.options.decide, self.segmenter is not None)
                    self.thumbs.offer(result, thumb)
                any_done = True
        finally:
            self.journal.flush()  # nothing to write where nothing was drained
        if time.perf_counter() - self.synced > 1.0:  # durable against a power cut at least every second
            self.journal.sync()
            self.synced = time.perf_counter()
        return any_done

    def take(self, batch: Batch) -> None:
        """One batch through the models and on to finishing; the files that could not be used become rows."""
        for found, decoded in batch.failed:
            row = error_row(found, decoded)
            if decoded.status == "skipped":  # not DICOM: listed apart, never an image row
                row.status = "skipped"
                self.skipped_rows.append(row)  # not journaled: re-sniffed on a resume, in no time
            else:
                self._done_here(row)
        if batch.items:
            probs, scores, untrusted = self._score(batch)
            self.counts["decoded"] += len(batch.items)
            for i, item in enumerate(batch.items):
                if i in untrusted:
                    self._done_here(error_row(item.found, item.decoded, untrusted[i]))
                    self.stream.release(item.slot)
                    continue
                score, window = scores.get(i, (None, None))
                probability = float(probs[i]) if probs is not None else score
                job = _finish_job(item, probability, i in scores, window, self.thresholds, self.options.write, self.out)
                self._finish(item, job)
            self._hand_over()
        self.drain(False)
        discovery = self.stream.files
        self.emit(
            progress_event(
                "batch",
                discovered=discovery.found,
                walk_done=discovery.walk_done,
                walked=discovery.walked,
                skipped=len(self.skipped_rows),
                resumed=self.stream.resumed,
                **self.counts,
            )
        )

    def _score(
        self, batch: Batch
    ) -> tuple[np.ndarray | None, dict[int, tuple[float, MapWindow | None]], dict[int, str]]:
        """The classifier's probabilities, the segmenter's score and map window by row (the window's part of the
        map goes to the row's slot), and the rows whose answer is not a number: never a tier, but an error row
        naming the model (the scan exits non-zero). NaN weights or an overflow give such answers."""
        t0 = time.perf_counter()
        n = len(batch.items)
        probs = None
        if self.classifier is not None:
            x = batch.inputs[self.classifier.spec.input_key]
            probs = classify(self.classifier, x, self.device, bf16=self.bf16)
            self.counts["classified"] += n
        untrusted: dict[int, str] = {}
        if probs is not None:
            for i in np.flatnonzero(~np.isfinite(probs)).tolist():
                untrusted[i] = _untrusted(batch.items[i].found, "classifier", float(probs[i]))
        chosen = []
        if self.segmenter is not None:
            gated = to_segment(probs, n, self.thresholds.gate, segment_all=self.options.decide.segment_all)
            chosen = [i for i in gated if i not in untrusted]
        scores: dict[int, tuple[float, MapWindow | None]] = {}
        if chosen and self.segmenter is not None and self.maps is not None:
            x = batch.inputs[self.segmenter.spec.input_key]
            arena = self.workers.arena
            places = [arena.map(batch.items[i].slot).reshape(-1) for i in chosen]  # the windows go to the slots
            present, peak, windows = self.maps.run(x[chosen] if len(chosen) < n else x, places, bf16=self.bf16)
            for j, i in enumerate(chosen):
                if not (math.isfinite(float(present[j])) and math.isfinite(float(peak[j]))):
                    untrusted[i] = _untrusted(batch.items[i].found, "segmenter", float(peak[j]))
                    continue
                scores[i] = float(present[j]), windows[j]
            self.counts["segmented"] += len(chosen)
        self.model_s += time.perf_counter() - t0
        return probs, scores, untrusted

    def _finish(self, item: Item, job: FinishJob) -> None:
        """Post-process, encode and write one image's files: in a worker, from its slot, while the models go on;
        here when the models would only wait for decoding (on a CPU: the workers are left to decode, which bounds
        a scan whose models are faster than its decoding); here at once when there is nothing to outline."""
        thumb = item.decoded.thumb
        if job.window is not None and self.workers.count and (not self.finish_here or not self.stream.starved()):
            entry = _Finishing(item.slot, None, thumb, job)
            self.finishing.append(entry)
            self.to_workers.append(entry)
            return
        done = finish_task(job, item.slot) if job.window is not None else finish(job, None, _NO_DISPLAY)
        self.finishing.append(_Finishing(-1, Part.ready(done), thumb))
        self.stream.release(item.slot)

    def _hand_over(self) -> None:
        """The batch's images for the workers, a few to a task: one round trip for several, every worker a share."""
        if not self.to_workers:
            return
        chunk = min(MAX_CHUNK, -(-len(self.to_workers) // max(self.workers.count, 1)))
        calls = [(entry.job, entry.slot) for entry in self.to_workers]
        for entry, part in zip(self.to_workers, self.workers.submit_each(finish_task, calls, chunk), strict=True):
            entry.part = part
        self.to_workers = []

    def _done_here(self, row: ImageResult) -> None:
        """A row with nothing to compute or write (a file not triaged), in its place in the queue."""
        self.finishing.append(_Finishing(-1, Part.ready((row, None))))
        self.counts["errors"] += 1

    def conclude(self, *, keep_empty: bool, roots: Sequence[Path]) -> list[ImageResult]:
        """Every image journaled; the rows of this walk ranked, the files of images gone from the inputs removed,
        the report's thumbnails written. A scan that found no DICOM file is refused (a shard's may hold none:
        ``keep_empty``)."""
        while self.finishing:
            self.drain(True)
        self.journal.close()
        done = self.journal.done
        results = [done[k] for k in dict.fromkeys(self.seen) if k in done]
        # Images done before a resume whose files are gone from the inputs: their outputs go too.
        kept = {f for r in results for f in (r.mask_file, r.overlay_file, r.file_stem) if f}
        for gone in set(done) - set(self.seen):
            outdir.remove_files(self.out, done[gone], keep=kept)
        if not results and not keep_empty:
            hint = f"{len(self.skipped_rows)} files found, none of them DICOM" if self.skipped_rows else None
            raise NothingToScan("no DICOM files found", path=roots[0] if roots else None, hint=hint)
        ranked = tiered(results, self.thresholds, self.options.decide, self.segmenter is not None)
        # A shard writes the thumbnails of its own first rows: the merged worklist's first rows are among them.
        self.thumbs.write(self.out, ranked, lambda rows: self.workers.thumbnails(self.out, rows), self.workers.store)
        return ranked

    def summary(
        self, ranked: list[ImageResult], models: list[dict[str, Any]], plan: Plan, total_s: float, notes: list[str]
    ) -> ScanSummary:
        """The scan's summary, as its outputs show it."""
        return summarise(
            self.out,
            ranked,
            counts={**self.counts, "resumed": self.stream.resumed},
            models=models,
            thresholds=self.thresholds,
            no_segment=self.options.decide.no_segment,
            urgent_probability=self.options.decide.urgent_probability,
            plan=plan.as_dict(),
            skipped=self.skipped_rows,
            timings={"model_s": self.model_s, "total_s": total_s},
            notes=tuple(notes),
        )


def _finish_job(
    item: Item,
    probability: float | None,
    segmented: bool,
    window: MapWindow | None,
    thresholds: Thresholds,
    outputs: Outputs,
    out: Path,
) -> FinishJob:
    d = item.decoded
    return FinishJob(
        name=item.found.name,
        identity={"image_id": item.found.image_id, **d.identity, "seq": item.found.seq, "notes": d.notes},
        shape=d.shape,
        display_shape=d.display_shape,
        spacing=d.spacing,
        probability=probability,
        segmented=segmented,
        thresholds=thresholds,
        overlays=outputs.overlays,
        out=out,
        flip=d.flip,
        window=window,
    )

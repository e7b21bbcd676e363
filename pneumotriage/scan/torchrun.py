"""A scan under ``torchrun``: each rank scans its shard (:mod:`pneumotriage.scan.shards`) on its own GPU (or its
share of the CPU cores), reports its counts through the process group's store, and rank 0 merges when every rank
is done.

The ranks never wait on one another while scanning: there is no collective operation, only counters added to
the store (one add per counter at most twice a second), so a slow rank never holds up the others, and a long
scan never meets a collective's timeout. Rank 0 shows one progress bar for the whole job from those counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pneumotriage.distributed import Ranks, joined
from pneumotriage.models import LoadedModel
from pneumotriage.runtime import Progress, progress_event
from pneumotriage.scan.engine import run
from pneumotriage.scan.merge import merge_shards
from pneumotriage.scan.options import ScanOptions
from pneumotriage.scan.records import ScanSummary
from pneumotriage.scan.shards import Shard

#: The counters each rank adds to the store, as its scan's progress events name them.
COUNTERS = ("decoded", "classified", "segmented", "errors", "skipped", "resumed")


class Relay:
    """Each rank's counts added to the store as its scan goes (at most every ``every`` seconds), and the whole
    job's read back on rank 0."""

    def __init__(self, ranks: Ranks, every: float = 0.5) -> None:
        self.ranks = ranks
        self.every = every
        self._sent = dict.fromkeys(COUNTERS, 0)
        self._last = 0.0

    def report(self, event: dict[str, Any], *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        for key in COUNTERS:
            delta = int(event.get(key, 0)) - self._sent[key]
            if delta:
                self.ranks.store.add(key, delta)
                self._sent[key] += delta

    def finished(self) -> None:
        self.ranks.store.add("finished", 1)

    def all_finished(self) -> bool:
        return int(self.ranks.store.add("finished", 0)) >= self.ranks.world

    def job(self, found: int, walk_done: bool) -> dict[str, Any]:
        """A progress event for the whole job: every rank's counts; ``found`` files in all (each rank walks all
        the inputs, so rank 0's walk counts every rank's files)."""
        counts = {key: int(self.ranks.store.add(key, 0)) for key in COUNTERS}
        return progress_event("batch", discovered=found, walk_done=walk_done, **counts)


def run_ranks(
    inputs: Iterable[str | Path],
    out: str | Path,
    ranks: Ranks,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions,
    progress: Progress | None = None,
) -> ScanSummary | None:
    """Scan this rank's shard; on rank 0, wait for every rank, merge, and return the merged summary (other
    ranks return None once their shard is done)."""
    relay = Relay(ranks)
    emit = progress if ranks.rank == 0 and progress is not None else None
    seen = {"found": 0, "walk_done": False}

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] != "batch":
            return
        relay.report(event)
        seen.update(found=event["walked"], walk_done=event["walk_done"])
        if emit is not None:
            emit(relay.job(event["walked"], event["walk_done"]))

    finished = run(
        inputs,
        out,
        classifier=classifier,
        segmenter=segmenter,
        options=options,
        progress=on_event,
        shard=Shard(ranks.rank, ranks.world),
    )
    relay.report(finished.counts, force=True)
    relay.finished()
    if ranks.rank != 0:
        return None
    while not relay.all_finished():  # the others' bars move on rank 0's, while it waits
        if emit is not None:
            emit(relay.job(int(seen["found"]), bool(seen["walk_done"])))
        time.sleep(0.2)
    merged: ScanSummary = merge_shards(out).summary
    return merged


def scan_launched(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions,
    shown: Callable[[bool, Callable[[Progress], ScanSummary | None]], ScanSummary | None],
) -> ScanSummary | None:
    """The scan of this rank of a job torchrun started: join the process group on this rank's device, scan its
    shard (resuming it after torchrun restarted the job), and on rank 0 merge. ``shown(rank0, job)`` runs ``job``
    with a progress callback (the caller's bars, shown on rank 0 alone). Returns the merged summary on rank 0,
    None on the others."""
    with joined(options.run.device) as ranks:
        # a restarted rank goes on from its journal
        options = options.but(device=str(ranks.device), resume=options.run.resume or ranks.restart > 0)
        return shown(
            ranks.rank == 0,
            lambda on_event: run_ranks(
                inputs, out, ranks, classifier=classifier, segmenter=segmenter, options=options, progress=on_event
            ),
        )

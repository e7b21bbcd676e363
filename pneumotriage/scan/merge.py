"""Merge a sharded scan (:mod:`pneumotriage.scan.shards`): the finished shards' rows put back in walk order, ranked
together and written as one worklist, submission, skipped.csv and report, as one process scanning everything
would have written them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumotriage.errors import ExitCode, PneumotriageError, UsageError
from pneumotriage.outlayout import JOURNAL, SHARD_DONE, SHARD_RESULTS, OutLayout
from pneumotriage.postprocess import Thresholds
from pneumotriage.scan.journal import OutLock
from pneumotriage.scan.options import ScanOptions
from pneumotriage.scan.outputs import summarise, write_outputs
from pneumotriage.scan.records import ImageResult, ScanSummary, row_from
from pneumotriage.scan.report import ReportThumbnails
from pneumotriage.scan.shards import Shard, layout_of
from pneumotriage.scan.tiers import tiered
from pneumotriage.scan.workers import thumbnail_task


class ShardsMissing(PneumotriageError):
    """Some shards of a scan are not finished: the merge holds the others' images only."""

    exit_code = ExitCode.INPUTS_FAILED


@dataclass
class Merged:
    """A merge: the summary of the shards merged (its outputs are written) and the shards still missing."""

    summary: ScanSummary
    #: The options the shards were scanned with.
    options: ScanOptions
    missing: list[str] = field(default_factory=list)


def merge_shards(out: str | Path) -> Merged:
    """Merge the finished shards of the sharded scan in ``out`` into one worklist (CSV, JSON), submission,
    skipped.csv and report, ranked over all of them, exactly as one process scanning everything would write
    them. Shards not finished (or running now) are listed in :attr:`Merged.missing`, and the outputs say
    that they are incomplete. A shard scanned with other models, inputs or options is refused."""
    out = Path(out)
    count = layout_of(out)
    if count is None:
        hint = "it holds no scan"
        if (OutLayout(out).state / JOURNAL).exists():
            hint = "it holds a scan by one process, whose outputs that scan wrote itself"
        raise UsageError("no sharded scan to merge in this folder", path=out, hint=hint)
    with OutLock(OutLayout(out).state, out, held="another merge or scan is writing this output folder's worklist"):
        return _merge(out, count)


def _merge(out: Path, count: int) -> Merged:
    t0 = time.perf_counter()
    done, missing = _finished(out, count)
    first = min(done)
    signature = done[first]["signature"]
    rows, skipped = _rows(out, count, done)
    o = ScanOptions.of(**signature["options"])
    t = Thresholds.from_mapping(signature["thresholds"])
    segmented_run = any(m["role"] == "segmenter" for m in signature["models"])
    ranked = tiered(rows, t, o.decide, segmented_run)

    def make_thumbnails(need: list[ImageResult]) -> None:
        """The report's thumbnails no shard wrote (each wrote those of its own first rows)."""
        for r in need:
            thumbnail_task(r.path, out, r.file_stem or "", r.mask_file, r.overlay_file)

    ReportThumbnails(o.write.report_thumbnails).write(out, ranked, make_thumbnails)
    counts: dict[str, int] = {}
    for record in done.values():
        for key, value in record["counts"].items():
            counts[key] = counts.get(key, 0) + value
    plan = dict(done[first]["plan"])
    plan["why"] = f"{count} shards; shard {first}/{count}: {plan.get('why', '')}"
    plan["shards"] = count
    notes: tuple[str, ...] = ()
    if missing:
        notes = (f"incomplete: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} not merged yet",)
    summary = summarise(
        out,
        ranked,
        counts=counts,
        models=signature["models"],
        thresholds=t,
        no_segment=o.decide.no_segment,
        urgent_probability=o.decide.urgent_probability,
        plan=plan,
        skipped=skipped,
        timings={
            "model_s": sum(r["timings"].get("model_s", 0.0) for r in done.values()),
            "total_s": max(r["timings"].get("total_s", 0.0) for r in done.values()),
            "merge_s": time.perf_counter() - t0,
        },
        notes=notes,
    )
    write_outputs(summary, rle_relative=o.write.rle_relative, no_phi=o.write.no_phi, submission=o.writes_submission())
    return Merged(summary, o, missing)


def _finished(out: Path, count: int) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """The completion records of the shards finished (by shard number), all scanned alike, and the others."""
    done: dict[int, dict[str, Any]] = {}
    missing: list[str] = []
    for k in range(count):
        folder = Shard(k, count).folder(out)
        path = folder / SHARD_DONE
        if folder.exists() and OutLock.held(folder):
            missing.append(f"{k}/{count} (running)")
        elif not path.exists():
            missing.append(f"{k}/{count}" + (" (not finished)" if folder.exists() else " (not started)"))
        else:
            try:
                done[k] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise UsageError(
                    "a shard's completion record is damaged", path=path, hint=f"rerun shard {k}/{count} with --resume"
                ) from None
    if not done:
        raise ShardsMissing(f"no shard is finished yet: {', '.join(missing)}", path=out)
    first = min(done)
    signature = done[first]["signature"]
    for k, record in done.items():
        if record["signature"] != signature:
            theirs = record["signature"]
            what = next((w for w in ("models", "inputs", "thresholds") if theirs.get(w) != signature.get(w)), "options")
            raise UsageError(
                f"shard {k}/{count} was scanned with other {what} than shard {first}/{count}",
                path=Shard(k, count).folder(out),
                hint=f"rescan shard {k}/{count} with the same inputs and options, into a new --out if need be",
            )
    return done, missing


def _rows(out: Path, count: int, done: dict[int, dict[str, Any]]) -> tuple[list[ImageResult], list[ImageResult]]:
    """The finished shards' rows and skipped files, in walk order, as one process finds them."""
    rows: list[ImageResult] = []
    skipped: list[ImageResult] = []
    stems: dict[str, str] = {}
    for k in sorted(done):
        folder = Shard(k, count).folder(out)
        results = folder / SHARD_RESULTS
        for number, line in enumerate(results.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                data = None
            r = row_from(data, f"{results} line {number}")
            if r.file_stem is not None and stems.setdefault(r.file_stem, r.key) != r.key:
                raise UsageError(
                    f"two shards named their outputs {r.file_stem!r}: the inputs changed while the shards walked them",
                    path=out,
                    hint="rerun every shard with --resume now that the inputs are still, then merge",
                )
            rows.append(r)
        skipped += [row_from(r, f"{folder / 'done.json'}") for r in done[k]["skipped"]]
    rows.sort(key=lambda r: r.seq)  # walk order, as one process finds them
    skipped.sort(key=lambda r: r.seq)
    return rows, skipped

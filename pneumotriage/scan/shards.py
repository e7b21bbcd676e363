"""Sharded scans: one archive split over several processes (merged by :mod:`pneumotriage.scan.merge`).

Each process (a ``torchrun`` rank, or a job-array task given ``--shard K/N``) walks all the inputs, keeps the files
whose real path hashes to its shard (:meth:`Shard.owns`), scans them with the ordinary engine and journals them
into its own folder. Every process numbers and names the files by the same walk, so a file's outputs are named
as a single process scanning everything would name them, and the merged rows can be put back in walk order
before ranking: the merge equals a single-process scan, byte for byte.

Under ``OUT/.scan/``::

    shards.json                      {"count": N}: this --out holds a scan in N shards
    shards/K-of-N/journal.jsonl      as a single-process scan's journal, with its signature.json and lock
    shards/K-of-N/results.jsonl      the shard's rows, written when it ends
    shards/K-of-N/done.json          written last: the shard is complete (counts, files passed over, plan)
    thumbs/                          shared: names are unique across shards

Masks and overlays go to ``OUT/masks`` and ``OUT/overlays`` as in any scan. ``--out`` must be one folder that
every process sees (a shared file system); the lock files need ``flock`` to work across machines there (NFSv4,
Lustre, GPFS and CephFS provide it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_text, strict_json
from pneumotriage.outlayout import JOURNAL, SHARD_DONE, SHARD_RESULTS, OutLayout

#: How ``--shard`` is written: K/N, K counted from 0.
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
#: The most shards a scan may be split into (a guard against a typo such as 0/10000000).
MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the files whose real path hashes to ``index``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(text)
        if not match:
            raise UsageError(f"--shard {text!r}: give K/N, e.g. 0/4 for the first of four shards")
        index, count = int(match[1]), int(match[2])
        if not 0 < count <= MAX_SHARDS or not 0 <= index < count:
            raise UsageError(f"--shard {text}: K counts from 0 to N-1, and N from 1 to {MAX_SHARDS}")
        return cls(index, count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, real_path: str) -> bool:
        """Whether the file at ``real_path`` belongs to this shard: a hash of the path's bytes, the same on every
        machine and in every process (Python's own ``hash`` of a string is not)."""
        digest = hashlib.blake2b(os.fsencode(real_path), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def folder(self, out: Path) -> Path:
        return OutLayout(out).shard(self.index, self.count)


def layout_of(out: Path) -> int | None:
    """The number of shards ``out`` was scanned in, or None when it holds no sharded scan."""
    path = OutLayout(out).shards_json
    if not path.exists():
        return None
    try:
        count = json.loads(path.read_text(encoding="utf-8"))["count"]
        if isinstance(count, int) and count > 0:
            return count
    except (ValueError, KeyError, TypeError):
        pass
    raise UsageError("its sharded scan's layout file is damaged", path=path, hint="scan into a new --out")


def claim_layout(out: Path, shard: Shard | None) -> Path:
    """The folder this scan journals into, after checking that ``out`` holds no scan of another layout (a
    single-process scan, or one in another number of shards) and, for a shard, recording the layout."""
    count = layout_of(out)
    layout = OutLayout(out)
    if shard is None:
        if count is not None:
            raise UsageError(
                f"this output folder holds a scan in {count} shards",
                path=out,
                hint=f"continue it with --shard K/{count} --resume (or torchrun with {count} processes), then "
                "`pneumotriage merge`; or choose another --out",
            )
        return layout.state
    if (layout.state / JOURNAL).exists():
        raise UsageError(
            "this output folder holds a scan by one process, not in shards",
            path=out,
            hint="continue it without --shard, or choose another --out",
        )
    if count is not None and count != shard.count:
        raise UsageError(
            f"this output folder holds a scan in {count} shards, not {shard.count}",
            path=out,
            hint=f"use --shard K/{count}, or choose another --out",
        )
    if count is None:
        layout.state.mkdir(parents=True, exist_ok=True)
        atomic_write_text(layout.shards_json, json.dumps({"count": shard.count}) + "\n")
    return shard.folder(out)


def shard_started(folder: Path) -> None:
    """A shard (re)starts: until it ends, a merge must not take its earlier results as complete."""
    (folder / SHARD_DONE).unlink(missing_ok=True)


def write_shard(folder: Path, summary: Any, signature: dict[str, Any]) -> None:
    """Record a finished shard: its rows (results.jsonl), then done.json, which marks it complete."""
    lines = "".join(json.dumps(vars(r)) + "\n" for r in sorted(summary.results, key=lambda r: r.seq))
    atomic_write_text(folder / SHARD_RESULTS, lines)
    done = {
        "signature": signature,
        "counts": {k: summary.counts.get(k, 0) for k in ("decoded", "classified", "segmented", "resumed")},
        "skipped": [vars(r) for r in summary.skipped],
        "plan": summary.plan,
        "timings": summary.timings,
        "finished": time.time(),
    }
    atomic_write_text(folder / SHARD_DONE, strict_json(done) + "\n")

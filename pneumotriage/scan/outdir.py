"""The scan's ``--out`` folder: checked before a scan, claimed and locked for it, taken back when a scan finds
nothing, the files of an image that left the scan removed, and a failed write turned into an error that says
what to do."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Collection, Sequence
from pathlib import Path

from pneumotriage.errors import OutputError, PneumotriageError, UsageError
from pneumotriage.io import printable
from pneumotriage.outlayout import (
    DICOM,
    JOURNAL,
    LOCK,
    MASKS,
    OVERLAYS,
    SHARD_DONE,
    SHARD_RESULTS,
    SIGNATURE,
    STATE,
    OutLayout,
)
from pneumotriage.scan.journal import OutLock
from pneumotriage.scan.records import ImageResult
from pneumotriage.scan.shards import Shard, claim_layout


def take_back(out: Path, made: Sequence[Path]) -> None:
    """Remove the folders an empty scan made (with its lock, journal and signature), leaving every folder that was
    there before and anything another process put into them."""
    state = OutLayout(out).state
    if state in made:
        for name in (LOCK, JOURNAL, SIGNATURE):
            (state / name).unlink(missing_ok=True)
    for folder in reversed(made):  # the deepest first
        with contextlib.suppress(OSError):  # not empty: it is not ours alone
            folder.rmdir()


def out_of_memory() -> PneumotriageError:
    return PneumotriageError(
        "out of memory while scanning",
        hint="give fewer --workers or a smaller --batch-size; the images finished so far are kept for --resume",
    )


def check_out(out: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", path=out, hint="choose a folder for the outputs")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out lies under {parent}, which is a file", path=out, hint="choose a folder")
            break


def output_error(exc: OSError, out: Path) -> PneumotriageError:
    if exc.errno == errno.ENOMEM:  # an mmap or a fork that found no memory: not --out's fault
        return out_of_memory()
    where = exc.filename or out
    reason = exc.strerror or type(exc).__name__
    hint = "choose an --out you can write to"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, then rerun with --resume: the images finished so far are kept"
    return OutputError(f"cannot write: {reason}", path=printable(str(where)), hint=hint)


def claim(out: Path, shard: Shard | None, held: contextlib.ExitStack) -> Path:
    """Take ``out`` (or its shard's folder) for this scan: links refused, the layout claimed, the lock held (before
    the journal is read: no second scan into this --out, or this shard of it). Returns the journal's folder."""
    refuse_links(out, [STATE, f"{STATE}/shards", f"{STATE}/thumbs", MASKS, OVERLAYS, DICOM])
    folder = claim_layout(out, shard)
    refuse_links(folder, ["", JOURNAL, SIGNATURE, LOCK, SHARD_RESULTS, SHARD_DONE])
    held_by = "another scan is writing to this output folder"
    if shard is not None:
        held_by = f"another process is scanning shard {shard.label} of this output folder"
    held.enter_context(OutLock(folder, out, held=held_by))
    return folder


def refuse_links(base: Path, names: Sequence[str]) -> None:
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


def remove_files(out: Path, result: ImageResult, keep: Collection[str] = ()) -> None:
    """Delete the mask, overlay and report pictures of an image that no longer belongs to this scan (those
    named in ``keep`` belong to another image and stay)."""
    stem = result.file_stem
    for path in (result.mask_file, result.overlay_file):
        if path and path not in keep:
            (out / path).unlink(missing_ok=True)
    if stem and stem not in keep:
        OutLayout(out).thumbnail(stem).unlink(missing_ok=True)
        OutLayout(out).plain_thumbnail(stem).unlink(missing_ok=True)


def journaled(out: Path, shard: Shard | None = None) -> int:
    """How many images an interrupted scan into ``out`` (or its ``shard``) finished: the lines of its journal."""
    folder = shard.folder(out) if shard is not None else OutLayout(out).state
    try:
        with open(folder / JOURNAL, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0

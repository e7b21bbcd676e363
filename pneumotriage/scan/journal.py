"""Stage 8, journal: each finished image's row, one JSON line, appended as it completes; read back on resume.

A killed scan (kill -9 included) resumes without redoing finished images and ends with the outputs of an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_text
from pneumotriage.outlayout import JOURNAL, LOCK, SIGNATURE
from pneumotriage.scan.records import PHI_FIELDS, ImageResult, row_from

JOURNAL_VERSION = 4  # 3: rows carry the plausibility flag; 4: file keys carry inode and ctime


def signature_change(old: Any, new: dict[str, Any]) -> str:
    """What differs between the signature a folder was scanned with and this scan's, in a user's words: the
    inputs, the models, the thresholds, or the options by name (``--tta``: on then, off now)."""
    if not isinstance(old, dict):
        return "settings (its signature.json is damaged)"
    if old.get("inputs") != new.get("inputs"):
        return "inputs"
    if old.get("models") != new.get("models"):
        return "models"
    then, now = old.get("options") or {}, new.get("options") or {}
    changed = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
    if changed:
        return "options: " + ", ".join(
            f"--{k.replace('_', '-')} ({_shown(then.get(k))} then, {_shown(now.get(k))} now)" for k in changed
        )
    if old.get("thresholds") != new.get("thresholds"):
        t0, t1 = old.get("thresholds") or {}, new.get("thresholds") or {}
        names = sorted(k for k in {*t0, *t1} if t0.get(k) != t1.get(k))
        return "thresholds: " + ", ".join(f"{k} ({t0.get(k)} then, {t1.get(k)} now)" for k in names)
    return "settings (another version of pneumotriage)" if old.get("version") != new.get("version") else "settings"


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class Journal:
    """Finished images, appended as they finish and synced at least once a second; read back on resume."""

    def __init__(
        self, folder: Path, signature: dict[str, Any], resume: bool, *, no_phi: bool = False, out: Path | None = None
    ) -> None:
        """``folder`` holds the journal; ``out`` (default: its parent) the files its rows name."""
        out = out or folder.parent
        self.no_phi = no_phi
        self.path = folder / JOURNAL
        self.signature_path = folder / SIGNATURE
        folder.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, ImageResult] = {}
        self._by_path: dict[str, ImageResult] = {}  # the latest finished image at each path
        if resume and self.path.exists():
            try:
                old = json.loads(self.signature_path.read_text()) if self.signature_path.exists() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = "damaged"  # compared below: never equal to a signature
            if old != signature:
                raise UsageError(
                    f"cannot resume: this output folder was scanned with other {signature_change(old, signature)}",
                    path=out,
                    hint="resume with the same inputs and options, or scan into a new --out",
                )
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):
                        continue  # the last line cut short by a kill
                    raise UsageError(
                        f"{self.path} is damaged: line {number} is not JSON",
                        path=out,
                        hint="scan into a new --out (or remove the damaged line to resume)",
                    ) from None
                result = row_from(data, f"{self.path} line {number}")
                # Per-image files are not fsynced (one fsync each cost more than the models on a GPU): after a
                # power cut a journaled image whose files did not reach the disk is done again.
                files = [out / f for f in (result.mask_file, result.overlay_file) if f]
                if all(f.is_file() and f.stat().st_size > 0 for f in files):
                    self.done[result.key] = result
                    self._by_path[result.path] = result
        elif not resume and self.path.exists():
            raise UsageError(
                "this output folder already holds a scan",
                path=out,
                hint="pass --resume to continue it, or choose another --out",
            )
        else:
            self.path.write_text("")
        atomic_write_text(self.signature_path, json.dumps(signature, indent=1, sort_keys=True) + "\n")
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def stale_for(self, path: str, key: str) -> ImageResult | None:
        """A finished image at ``path`` whose file has changed since (its key is not ``key``), if any."""
        result = self._by_path.get(path)
        return result if result is not None and result.key != key and result.key in self.done else None

    def forget(self, key: str) -> None:
        self.done.pop(key, None)

    def add(self, result: ImageResult, *, flush: bool = True) -> None:
        """Record a finished image. The line reaches the OS at once (a killed process loses nothing), or with
        ``flush`` False at the next :meth:`flush` (a caller recording several answers read together: one write
        for them all); :meth:`sync` makes a batch of lines durable against a power cut with one fsync."""
        if self.no_phi:  # no identifier under --out, hidden files included (and a resumed run is the same)
            for k in PHI_FIELDS:
                setattr(result, k, None)
        self._fh.write(json.dumps(vars(result)) + "\n")  # its fields are plain values: no deep copy
        if flush:
            self._fh.flush()
        self.done[result.key] = result
        self._by_path[result.path] = result

    def flush(self) -> None:
        self._fh.flush()

    def sync(self) -> None:
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


class OutLock:
    """An exclusive lock on a scan's output folder for as long as the scan runs: a second scan into the same
    ``--out`` (a resume started twice, two operators) stops with one line instead of mixing its files in.
    Taken with ``flock`` where the platform has it; the lock goes with the process, so a killed scan leaves none."""

    def __init__(
        self, folder: Path, out: Path | None = None, *, held: str = "another scan is writing to this output folder"
    ) -> None:
        """Lock ``folder/lock``; ``held`` is the message when another process holds it."""
        out = out or folder.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(folder / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (closed in release())
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise UsageError(held, path=out, hint="wait for it to end, or choose another --out") from None

    def release(self) -> None:
        self._fh.close()

    @staticmethod
    def held(folder: Path) -> bool:
        """Whether a running process holds the lock in ``folder`` (a scan in progress there)."""
        try:
            import fcntl
        except ImportError:
            return False
        try:
            fh = open(folder / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError:
            return False
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

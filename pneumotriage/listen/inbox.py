"""The listener's durable inbox: every instance received is on disk (written whole, fsynced) before the sender
hears "success", grouped by study, with a small state file per study that says what has happened to it.

Layout under ``--out``::

    inbox/<study>/instances/<sop>.dcm   the instances as received (file meta included), one file each
    inbox/<study>/state.json            received (SOP UID -> arrival time), last arrival, triage time, sent objects
    inbox/<study>/results.json          its worklist rows and result objects, filed from the batches that scanned it
    batches/<n>/                        one scan of the studies complete at one moment (masks, SEG and SR in dicom/)

``<study>`` and ``<sop>`` are the UIDs themselves (a UID is digits and dots, at most 64 characters: a plain file
name); anything else is refused before it touches the disk. State files are rewritten atomically, so a kill at any
moment leaves either the old state or the new one, and a restart finds every instance that was acknowledged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pneumotriage.io import atomic_write_bytes, atomic_write_text

#: A DICOM UID (PS3.5 9.1): digit components separated by dots, at most 64 characters.
UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def plain_uid(value: object) -> str | None:
    """``value`` as a UID that is safe as a file name, or None."""
    text = str(value or "").strip().rstrip("\0")
    return text if len(text) <= 64 and UID.fullmatch(text) else None


@dataclass
class StudyState:
    """What has happened to one study. Times are seconds since the epoch."""

    study: str
    #: SOP Instance UID -> when it was received (the last time, for an instance sent again).
    received: dict[str, float] = field(default_factory=dict)
    #: When the last instance arrived: the study is complete after the inactivity timeout from then.
    last: float = 0.0
    #: The instances the last triage saw (a later arrival makes the study due again).
    triaged: list[str] = field(default_factory=list)
    triaged_at: float | None = None
    #: The result objects acknowledged by the destination: SOP Instance UID -> when.
    sent: dict[str, float] = field(default_factory=dict)
    #: Why the last send failed (cleared when it succeeds), for the worklist and the log.
    send_error: str | None = None
    #: Seconds from the last instance to the destination's acknowledgement of the last result object.
    time_to_result_s: float | None = None

    def due(self, now: float, idle_s: float) -> bool:
        """Complete (no instance for ``idle_s``) and not yet triaged with every instance it has."""
        return bool(self.received) and now - self.last >= idle_s and set(self.received) != set(self.triaged)


class Inbox:
    """The inbox under ``out``: thread-safe (the network threads store, the service thread triages and sends)."""

    def __init__(self, out: Path) -> None:
        self.root = out / "inbox"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._states: dict[str, StudyState] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for partial in (folder / "instances").glob(".*.tmp"):  # a write cut short by a kill: never acknowledged
                partial.unlink(missing_ok=True)
            state = self._read(folder)
            if state is not None:
                self._states[state.study] = state

    def _read(self, folder: Path) -> StudyState | None:
        """A study's state as saved, or rebuilt from the instances on disk when the state file was never written
        (killed between the instance and its state): an instance on disk was acknowledged, so it is received."""
        study = plain_uid(folder.name)
        if study is None:
            return None
        path = folder / "state.json"
        state = StudyState(study)
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            state = StudyState(**{k: v for k, v in data.items() if k in StudyState.__dataclass_fields__})
        for instance in (folder / "instances").glob("*.dcm"):
            sop = plain_uid(instance.stem)
            if sop is not None and sop not in state.received:
                state.received[sop] = instance.stat().st_mtime
                state.last = max(state.last, state.received[sop])
        return state

    def folder(self, study: str) -> Path:
        return self.root / study

    def instances(self, study: str) -> Path:
        """The folder of a study's instances: what the scan reads."""
        return self.root / study / "instances"

    def store(self, study: str, sop: str, data: bytes) -> None:
        """Write one instance durably (the caller answers success only after this returns), then its state."""
        folder = self.instances(study)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{sop}.dcm", data)  # fsynced, then renamed into place
        _sync_dir(folder)  # the rename itself on disk too, before the sender hears success
        now = time.time()
        with self._lock:
            state = self._states.setdefault(study, StudyState(study))
            state.received[sop] = now
            state.last = now
            self._save(state)

    def _save(self, state: StudyState) -> None:
        atomic_write_text(self.folder(state.study) / "state.json", json.dumps(asdict(state), indent=1) + "\n")

    def update(self, study: str, **changes: Any) -> StudyState:
        """Change a study's state and save it."""
        with self._lock:
            state = self._states[study]
            for name, value in changes.items():
                setattr(state, name, value)
            self._save(state)
            return state

    def acknowledged(self, study: str, sop: str) -> None:
        """Record that the destination acknowledged result object ``sop`` of ``study``."""
        with self._lock:
            state = self._states[study]
            state.sent[sop] = time.time()
            state.send_error = None
            self._save(state)

    def states(self) -> list[StudyState]:
        with self._lock:
            return [StudyState(**asdict(s)) for s in self._states.values()]

    def state(self, study: str) -> StudyState:
        """A copy of one study's state."""
        with self._lock:
            return StudyState(**asdict(self._states[study]))

    def due(self, idle_s: float, now: float | None = None) -> list[str]:
        """Studies complete and not yet triaged with every instance, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            ready = [s for s in self._states.values() if s.due(now, idle_s)]
        return [s.study for s in sorted(ready, key=lambda s: s.last)]


def _sync_dir(folder: Path) -> None:
    """Flush a folder's entries (a file renamed into it) to disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system can sync a folder
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system that holds ``path``."""
    return shutil.disk_usage(path).free

"""``pneumotriage listen``: the node receives; the service triages each study once it is complete and sends the
results back.

One loop, woken by each arrival: studies silent for ``idle_s`` are triaged by the scan engine (the models loaded
once, kept warm) into ``studies/<study>/`` with their DICOM SR and SEG; the objects not yet acknowledged are sent to
the destination (retried with back-off while it is down); the worklist under ``--out`` (CSV, JSON, report, and
``studies.csv`` with each study's arrival, triage and send times) is rewritten after every change.

A restart (after a crash or ``kill -9``) reads the inbox back: instances received but not triaged are triaged,
results triaged but not acknowledged are sent, and nothing is triaged or sent twice (the state of each study is
saved atomically after each step; a resend after a kill between "stored" and "saved" replaces, never duplicates,
as the objects' UIDs are derived from their sources).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumotriage.errors import PneumotriageError
from pneumotriage.io import atomic_write_text
from pneumotriage.listen.inbox import Inbox, StudyState
from pneumotriage.listen.node import NodeOptions, StorageNode
from pneumotriage.listen.sender import Destination, SendError, StowDestination
from pneumotriage.postprocess import Thresholds
from pneumotriage.scan import ImageResult, ScanOptions
from pneumotriage.scan.finish import plain_path, thumbnail_path
from pneumotriage.scan.records import row_from

#: The columns of studies.csv: one row per study received.
STUDY_FIELDS = (
    "study_instance_uid",
    "instances",
    "last_received",
    "triaged_at",
    "urgent",
    "result_sent_at",
    "time_to_result_s",
    "send_error",
)


#: While studies queue, the worklist is rewritten at most this often (its report grows with every study).
WORKLIST_EVERY_S = 1.0


@dataclass(frozen=True)
class ListenOptions:
    #: Seconds without a new instance after which a study is complete.
    idle_s: float = 5.0
    #: Where results go (C-STORE to a node, or STOW-RS to a DICOMweb server); None keeps them under --out only.
    send_to: Destination | StowDestination | None = None
    #: The back-off between tries while the destination is down: from ``retry_min_s``, doubling to ``retry_max_s``.
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    #: Escalation: within its tier, a study waiting longer than this (seconds since its last image) moves up, the
    #: longest-waiting first; None leaves the worklist in its triage order.
    max_wait_s: float | None = None


def escalate(ranked: list[ImageResult], waited: dict[str, float], max_wait_s: float) -> list[ImageResult]:
    """The worklist with, inside each tier, the rows of studies that have waited longer than ``max_wait_s`` first
    (longest wait first), renumbered. Tiers never change: escalation only bounds the worst-case wait that ranking
    by urgency alone makes long for the rows below."""
    from pneumotriage.scan.records import TIERS

    def key(r: ImageResult) -> tuple[int, int, float]:
        wait = waited.get(r.study_instance_uid or "", 0.0)
        late = wait > max_wait_s
        return (TIERS.index(r.tier), 0 if late else 1, -wait if late else 0.0)

    order = sorted(ranked, key=key)  # stable: the triage order within each group
    for i, r in enumerate(order, 1):
        r.rank = i
    return order


def _iso(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


class Listener:
    """The service around one node. ``log`` receives one line per event worth telling (a study triaged, results
    sent, a send failing)."""

    def __init__(
        self,
        out: Path,
        *,
        classifier: Any,
        segmenter: Any,
        scan_options: ScanOptions,
        node: NodeOptions,
        options: ListenOptions,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.out, self.options, self.log = Path(out), options, log
        self.classifier, self.segmenter = classifier, segmenter
        # Each study is scanned in this process (a study holds a few images: worker processes would cost more than
        # they save), with the SR and SEG the results are made of.
        self.scan_options = dataclasses.replace(scan_options, workers=0, dicom_sr=True, dicom_seg=True)
        self.inbox = Inbox(self.out)
        self._wake = threading.Event()
        self._results: dict[str, list[ImageResult]] = {}
        self._objects: dict[str, list[tuple[Path, str]]] = {}
        self._about: dict[str, Any] = {}
        self._backoff = options.retry_min_s
        self._next_try = 0.0
        self._changed = True
        self._written = 0.0
        for state in self.inbox.states():
            self._load(state.study)
        self.node = StorageNode(node, self.inbox, on_stored=lambda study: self._wake.set())

    # Triage -----------------------------------------------------------------------------------------------------
    def _saved(self, study: str) -> Path:
        return self.inbox.folder(study) / "results.json"

    def _load(self, study: str) -> None:
        """The rows of a study triaged before a restart (checked as data anyone could have edited)."""
        path = self._saved(study)
        if not path.is_file():
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        self._results[study] = [row_from(row, f"{path} row {i}") for i, row in enumerate(data["results"], 1)]
        self._about = {"models": data["models"], "thresholds": data["thresholds"]}

    def triage(self, study: str) -> None:
        """Scan a complete study (only its new instances, when it was triaged before) and keep its rows."""
        from pneumotriage.scan import run as run_scan

        state = next(s for s in self.inbox.states() if s.study == study)
        seen = sorted(state.received)  # at least these: an instance arriving meanwhile may be scanned too
        folder = self.out / "studies" / study
        resume = (folder / ".scan" / "journal.jsonl").is_file()
        started = time.monotonic()
        try:
            summary = run_scan(
                [self.inbox.instances(study)],
                folder,
                classifier=self.classifier,
                segmenter=self.segmenter,
                options=dataclasses.replace(self.scan_options, resume=resume),
            )
        except PneumotriageError as exc:
            self.inbox.update(study, triaged=seen, triaged_at=time.time(), send_error=f"not triaged: {exc}")
            self.log(f"study {study}: not triaged: {exc}")
            self._changed = True
            return
        for r in summary.results:  # the pictures, where the combined report looks for them
            if r.file_stem:
                for picture in (thumbnail_path, plain_path):
                    source = picture(folder, r.file_stem)
                    if source.is_file():
                        target = picture(self.out, r.file_stem)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(source, target)
        self._about = {"models": summary.models, "thresholds": summary.thresholds.as_dict()}
        atomic_write_text(
            self._saved(study),
            json.dumps({**self._about, "results": [vars(r) for r in summary.results]}) + "\n",
        )
        self._results[study] = summary.results
        self._objects.pop(study, None)  # read again: this triage may have made more
        scanned = {Path(r.path).stem for r in summary.results}  # what the scan's walk found, arrivals included
        self.inbox.update(study, triaged=sorted(scanned | set(seen)), triaged_at=time.time())
        tiers = ", ".join(f"{r.tier}" for r in summary.results)
        self.log(
            f"study {study}: {len(summary.results)} images triaged in {time.monotonic() - started:.1f} s ({tiers})"
        )
        self._changed = True

    # Sending ----------------------------------------------------------------------------------------------------
    def pending(self, state: StudyState) -> list[tuple[Path, str]]:
        """The result objects of a triaged study the destination has not acknowledged: (file, SOP Instance UID)."""
        if state.triaged_at is None:
            return []
        if state.study not in self._objects:
            self._objects[state.study] = self._result_objects(state.study)
        return [(path, uid) for path, uid in self._objects[state.study] if uid not in state.sent]

    def _result_objects(self, study: str) -> list[tuple[Path, str]]:
        """A triaged study's SR and SEG files with their SOP Instance UIDs (read once per triage)."""
        import pydicom

        folder = self.out / "studies" / study / "dicom"
        return [
            (path, str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
            for path in sorted(folder.glob("*.dcm"))
        ]

    def send_pending(self, now: float) -> None:
        to = self.options.send_to
        if to is None or now < self._next_try:
            return
        for state in self.inbox.states():
            objects = self.pending(state)
            if not objects:
                continue
            try:
                stored = to.send([p for p, _ in objects], calling=self.node.options.ae_title)
            except SendError as exc:
                for uid in getattr(exc, "stored", []):
                    self.inbox.acknowledged(state.study, uid)
                self.inbox.update(state.study, send_error=exc.message)
                self.log(f"study {state.study}: {exc.message}; next try in {self._backoff:.0f} s")
                self._next_try = time.time() + self._backoff
                self._backoff = min(self._backoff * 2, self.options.retry_max_s)
                self._changed = True
                return
            for uid in stored:
                self.inbox.acknowledged(state.study, uid)
            done = next(s for s in self.inbox.states() if s.study == state.study)
            took = max(done.sent.values()) - done.last
            self.inbox.update(state.study, time_to_result_s=round(took, 3))
            self.log(
                f"study {state.study}: {len(stored)} result objects stored at {to}, {took:.1f} s after its last image"
            )
            self._backoff = self.options.retry_min_s
            self._changed = True

    # The worklist -----------------------------------------------------------------------------------------------
    def write_worklist(self) -> None:
        """The worklist of every study triaged so far, ranked together, and studies.csv."""
        from pneumotriage.scan.outputs import summarise, write_outputs
        from pneumotriage.scan.rank import rank

        rows = []
        for study, results in self._results.items():
            for r in results:  # its files live in the study's folder
                mask, overlay = (f"studies/{study}/{f}" if f else None for f in (r.mask_file, r.overlay_file))
                rows.append(dataclasses.replace(r, mask_file=mask, overlay_file=overlay))
        states = self.inbox.states()
        if rows:
            thresholds = Thresholds(**self._about.get("thresholds", {}))
            ranked = rank(rows)
            notes: tuple[str, ...] = ()
            limit = self.options.max_wait_s
            if limit is not None:
                waited = {s.study: time.time() - s.last for s in states}
                ranked = escalate(ranked, waited, limit)
                late = sum(w > limit for w in waited.values())
                if late:
                    notes = (f"{late} studies waiting over --max-wait {limit / 60:g} min moved up within their tiers",)
            summary = summarise(
                self.out,
                ranked,
                counts={},
                models=self._about.get("models", []),
                thresholds=thresholds,
                no_segment=self.scan_options.no_segment,
                plan={},
                skipped=[],
                timings={},
                notes=notes,
                urgent_probability=self.scan_options.urgent_probability,
            )
            write_outputs(summary, submission=False, no_phi=self.scan_options.no_phi)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(STUDY_FIELDS)
        for s in sorted(states, key=lambda s: s.last, reverse=True):
            results = self._results.get(s.study, [])
            writer.writerow(
                [
                    s.study,
                    len(s.received),
                    _iso(s.last),
                    _iso(s.triaged_at),
                    sum(r.tier == "urgent" for r in results),
                    _iso(max(s.sent.values())) if s.sent else "",
                    "" if s.time_to_result_s is None else s.time_to_result_s,
                    s.send_error or "",
                ]
            )
        atomic_write_text(self.out / "studies.csv", buffer.getvalue())

    # The loop ---------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One turn: each study now complete triaged and its results sent at once (a queue of studies does not
        hold back the first one's results), the worklist rewritten when it changed: at most once a second while
        studies are waiting, at once when none is."""
        for study in self.inbox.due(self.options.idle_s):
            self.triage(study)
            self.send_pending(time.time())
            if self._changed and time.monotonic() - self._written >= WORKLIST_EVERY_S:
                self._write()
        self.send_pending(time.time())
        if self._changed:
            self._write()

    def _write(self) -> None:
        self._changed = False
        self._written = time.monotonic()
        self.write_worklist()

    def serve(self, stop: threading.Event, tick_s: float = 0.25) -> None:
        """Run until ``stop`` is set."""
        while not stop.is_set():
            self.step()
            self._wake.wait(tick_s)
            self._wake.clear()

    def close(self) -> None:
        self.node.close()

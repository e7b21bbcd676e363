"""``pneumotriage listen``: the node receives; the service triages each study once it is complete and sends the
results back.

One loop, woken by each arrival. The instances of every study now complete (silent for ``idle_s``) that are not
yet triaged are scanned together, as one batch, by the scan engine (the models loaded once, kept warm) into
``batches/<n>/`` with their DICOM SR and SEG: a queue of studies costs one scan, not one per study. Each study's
rows and result objects are then filed under its inbox folder; the objects not yet acknowledged are sent to the
destination (in one association, retried with back-off while it is down); the worklist under ``--out`` (CSV, JSON,
report, and ``studies.csv`` with each study's arrival, triage and send times) is rewritten after every change.

A restart (after a crash or ``kill -9``) reads the inbox back: a batch cut short is finished from its journal (its
images are not scanned again), instances received but not triaged are triaged, results not acknowledged are sent,
and nothing is triaged or sent twice (each study's state is saved atomically after each step; a resend after a
kill between "stored" and "saved" replaces, never duplicates, as the objects' UIDs are derived from their
sources).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
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
from pneumotriage.outlayout import OutLayout
from pneumotriage.postprocess import Thresholds
from pneumotriage.scan import ImageResult, ScanOptions, row_from

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


#: A batch of this many images or more is scanned with the scan's worker processes too.
BATCH_WORKERS_FROM = 16


@dataclass(frozen=True)
class ListenOptions:
    #: Seconds without a new instance after which a study is complete.
    idle_s: float = 5.0
    #: Where results go (C-STORE to a node, or STOW-RS to a DICOMweb server); None keeps them under --out only.
    send_to: Destination | StowDestination | None = None
    #: The back-off between tries while the destination is down: from ``retry_min_s``, doubling to ``retry_max_s``.
    retry_min_s: float = 1.0
    retry_max_s: float = 60.0
    #: Also send, for a study with urgent images, a Key Object Selection marking them.
    kos: bool = False
    #: Escalation: within its tier, a study waiting longer than this (seconds since its last image) moves up, the
    #: longest-waiting first; None leaves the worklist in its triage order.
    max_wait_s: float | None = None


def escalate(ranked: list[ImageResult], waited: dict[str, float], max_wait_s: float) -> list[ImageResult]:
    """The worklist with, inside each tier, the rows of studies that have waited longer than ``max_wait_s`` first
    (longest wait first), renumbered. Tiers never change: escalation only bounds the worst-case wait that ranking
    by urgency alone makes long for the rows below."""
    from pneumotriage.scan import TIERS

    def key(r: ImageResult) -> tuple[int, int, float]:
        wait = waited.get(r.study_instance_uid or "", 0.0)
        late = wait > max_wait_s
        return (TIERS.index(r.tier), 0 if late else 1, -wait if late else 0.0)

    order = sorted(ranked, key=key)  # stable: the triage order within each group
    for i, r in enumerate(order, 1):
        r.rank = i
    return order


#: A batch as a saved row names it.
_BATCH = re.compile(r"batches/[0-9]{6}")


def _inside_batches(rel: str) -> bool:
    """A saved object path that stays under ``batches/`` (a plain relative path, no way out)."""
    parts = Path(rel).parts
    return len(parts) >= 3 and parts[0] == "batches" and ".." not in parts and not Path(rel).is_absolute()


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
        # With the SR and SEG the results are made of.
        self.scan_options = scan_options.but(dicom_sr=True, dicom_seg=True)
        self.inbox = Inbox(self.out)
        self._wake = threading.Event()
        self._send_wake = threading.Event()
        #: Each study's rows as their batch's scan wrote them, with the batch (``batches/<n>``) their files are in.
        self._results: dict[str, list[tuple[str, ImageResult]]] = {}
        self._objects: dict[str, list[tuple[Path, str]]] = {}
        self._about: dict[str, Any] = {}
        self._backoff = options.retry_min_s
        self._next_try = 0.0
        self._changed = True
        for state in self.inbox.states():
            self._load(state.study)
        self.finish_cut_batches()
        self.node = StorageNode(node, self.inbox, on_stored=lambda study: self._wake.set())

    # Triage -----------------------------------------------------------------------------------------------------
    def _saved(self, study: str) -> Path:
        return self.inbox.folder(study) / "results.json"

    def _load(self, study: str) -> None:
        """The rows and result objects of a study triaged before a restart (checked as data anyone could have
        edited: a row's fields and file names, an object's path inside ``batches/``)."""
        path = self._saved(study)
        if not path.is_file():
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        self._results[study] = [
            (str(item["batch"]), row_from(item["row"], f"{path} row {i}"))
            for i, item in enumerate(data["results"], 1)
            if _BATCH.fullmatch(str(item.get("batch", "")))
        ]
        self._objects[study] = [(self.out / rel, str(uid)) for rel, uid in data["objects"] if _inside_batches(str(rel))]
        self._about = {"models": data["models"], "thresholds": data["thresholds"]}

    def _batches(self) -> Path:
        return self.out / "batches"

    def finish_cut_batches(self) -> None:
        """Batches a kill cut short: finished from their journals, then filed (images done before are not
        scanned again)."""
        root = self._batches()
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            if (folder / "inputs.json").is_file() and not (folder / "filed").exists():
                files = [Path(f) for f in json.loads((folder / "inputs.json").read_text(encoding="utf-8"))]
                self._scan_batch(folder, [f for f in files if f.is_file()], resume=True)

    def triage_due(self) -> None:
        """Scan, as one batch, the untriaged instances of every study now complete, and file the results."""
        due = self.inbox.due(self.options.idle_s)
        if not due:
            return
        states = {s.study: s for s in self.inbox.states()}
        files = [
            self.inbox.instances(study) / f"{sop}.dcm"
            for study in due
            for sop in sorted(set(states[study].received) - set(states[study].triaged))
        ]
        root = self._batches()
        root.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
        folder = root / f"{number:06d}"
        folder.mkdir()
        atomic_write_text(folder / "inputs.json", json.dumps([str(f) for f in files]) + "\n")
        self._scan_batch(folder, files, resume=False)

    def _scan_batch(self, folder: Path, files: list[Path], *, resume: bool) -> None:
        from pneumotriage.scan import run as run_scan

        started = time.monotonic()
        # A few images are scanned in this process; a queue of them in worker processes too (their start-up
        # costs about a second, which a batch of a dozen images repays).
        workers = 0 if len(files) < BATCH_WORKERS_FROM else self.scan_options.run.workers
        study_of = {str(f): f.parent.parent.name for f in files}
        try:
            if not files:
                raise PneumotriageError("the batch's images are gone from the inbox")
            summary = run_scan(
                files,
                folder,
                classifier=self.classifier,
                segmenter=self.segmenter,
                options=self.scan_options.but(resume=resume, workers=workers),
            )
        except PneumotriageError as exc:
            for study in sorted(set(study_of.values())):
                done = sorted({Path(f).stem for f, s in study_of.items() if s == study})
                state = self.inbox.state(study)
                triaged = sorted(set(state.triaged) | set(done))
                self.inbox.update(study, triaged=triaged, triaged_at=time.time(), send_error=f"not triaged: {exc}")
                self.log(f"study {study}: not triaged: {exc}")
            (folder / "filed").touch()
            self._changed = True
            return
        self._about = {"models": summary.models, "thresholds": summary.thresholds.as_dict()}
        rows: dict[str, list[ImageResult]] = {}
        for r in summary.results:
            study = study_of.get(r.path) or Path(r.path).parent.parent.name
            rows.setdefault(study, []).append(r)
            if r.file_stem:  # its pictures, where the combined report looks for them
                for picture in (OutLayout.thumbnail, OutLayout.plain_thumbnail):
                    source = picture(OutLayout(folder), r.file_stem)
                    if source.is_file():
                        target = picture(OutLayout(self.out), r.file_stem)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(source, target)
        objects = self._result_objects(folder)
        batch = folder.relative_to(self.out).as_posix()
        for study, results in rows.items():
            stems = {r.file_stem for r in results if r.file_stem}
            mine = [(path, uid) for path, uid in objects if path.name.rsplit("-", 1)[0] in stems]
            self._file(study, [(batch, r) for r in results], mine)
            if self.options.kos:
                self._mark(study, folder, summary.models)
            tiers = ", ".join(r.tier for r in results)
            self.log(f"study {study}: {len(results)} images triaged ({tiers})")
        for study in sorted(set(study_of.values()) - set(rows)):  # every file the scan passed over (not an image)
            self._file(study, [], [])
            self.log(f"study {study}: passed over by the scan (see {folder.name}/skipped.csv)")
        for study in set(study_of.values()):  # each input done, row or not: a batch is never scanned twice
            state = self.inbox.state(study)
            scanned = {Path(f).stem for f, owner in study_of.items() if owner == study}
            if not scanned <= set(state.triaged):
                self.inbox.update(study, triaged=sorted(set(state.triaged) | scanned), triaged_at=time.time())
        (folder / "filed").touch()
        self.log(f"batch {folder.name}: {len(summary.results)} images of {len(rows)} studies in "
                 f"{time.monotonic() - started:.1f} s")  # fmt: skip
        self._changed = True

    def _file(self, study: str, results: list[tuple[str, ImageResult]], objects: list[tuple[Path, str]]) -> None:
        """A study's rows (with their batch) and result objects from one batch, added to what it had (a row of the
        same image replaced, so filing a batch again changes nothing), and the study marked triaged with those
        images."""
        keep = {r.key or r.path: (batch, r) for batch, r in self._results.get(study, [])}
        keep.update({r.key or r.path: (batch, r) for batch, r in results})
        self._results[study] = list(keep.values())
        held = {uid: path for path, uid in self._objects.get(study, [])}
        held.update({uid: path for path, uid in objects})
        self._objects[study] = [(path, uid) for uid, path in held.items()]
        document = {
            **self._about,
            "results": [{"batch": batch, "row": vars(r)} for batch, r in self._results[study]],
            "objects": [[path.relative_to(self.out).as_posix(), uid] for path, uid in self._objects[study]],
        }
        atomic_write_text(self._saved(study), json.dumps(document) + "\n")
        state = self.inbox.state(study)
        triaged = sorted(set(state.triaged) | {Path(r.path).stem for _, r in results})
        self.inbox.update(study, triaged=triaged, triaged_at=time.time())

    def _mark(self, study: str, folder: Path, models: list[dict[str, Any]]) -> None:
        """The study's Key Object Selection of its urgent images (all its batches'), as one more result object."""
        from pneumotriage.scan import write_kos

        path = folder / "dicom" / f"{study}-kos.dcm"
        rows = [r for _, r in self._results.get(study, [])]
        uid = write_kos(rows, path, models, no_phi=self.scan_options.write.no_phi)
        if uid is not None:
            self._file(study, [], [(path, uid)])

    def _result_objects(self, folder: Path) -> list[tuple[Path, str]]:
        """A batch's SR and SEG files with their SOP Instance UIDs."""
        import pydicom

        return [
            (path, str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
            for path in sorted((folder / "dicom").glob("*.dcm"))
            if not path.name.endswith("-kos.dcm")
        ]

    # Sending ----------------------------------------------------------------------------------------------------
    def pending(self, state: StudyState) -> list[tuple[Path, str]]:
        """The result objects of a study the destination has not acknowledged: (file, SOP Instance UID)."""
        return [(path, uid) for path, uid in self._objects.get(state.study, []) if uid not in state.sent]

    def send_pending(self, now: float) -> None:
        """Every object not yet acknowledged, of every study, in one association (one request for STOW-RS)."""
        to = self.options.send_to
        if to is None or now < self._next_try:
            return
        owner: dict[str, str] = {}
        files: list[Path] = []
        for state in self.inbox.states():
            for path, uid in self.pending(state):
                owner[uid] = state.study
                files.append(path)
        if not files:
            return
        try:
            stored = to.send(files, calling=self.node.options.ae_title)
        except SendError as exc:
            stored = list(getattr(exc, "stored", []))
            for study in dict.fromkeys(owner.values()):
                self.inbox.update(study, send_error=exc.message)
            self.log(f"{exc.message}; next try in {self._backoff:.0f} s")
            self._next_try = time.time() + self._backoff
            self._backoff = min(self._backoff * 2, self.options.retry_max_s)
        else:
            self._backoff = self.options.retry_min_s
        for uid in stored:
            if uid in owner:
                self.inbox.acknowledged(owner[uid], uid)
        for study in dict.fromkeys(owner[uid] for uid in stored if uid in owner):
            done = self.inbox.state(study)
            if self.pending(done):
                continue  # some of its objects are still to go
            took = max(done.sent.values()) - done.last
            self.inbox.update(study, time_to_result_s=round(took, 3))
            self.log(
                f"study {study}: {len(done.sent)} result objects stored at {to}, {took:.1f} s after its last image"
            )
        self._changed = True

    # The worklist -----------------------------------------------------------------------------------------------
    def write_worklist(self) -> None:
        """The worklist of every study triaged so far, ranked together, and studies.csv."""
        from pneumotriage.scan import rank, summarise, write_outputs

        states = self.inbox.states()
        by_study = {s.study: s for s in states}
        rows = [  # each row's files where its batch wrote them, and its study's arrival and send times
            dataclasses.replace(
                r,
                mask_file=f"{batch}/{r.mask_file}" if r.mask_file else None,
                overlay_file=f"{batch}/{r.overlay_file}" if r.overlay_file else None,
                received_at=_iso(by_study[study].last) if study in by_study else None,
                result_sent_at=_iso(max(by_study[study].sent.values()))
                if study in by_study and by_study[study].sent
                else None,
            )
            for study, results in self._results.items()
            for batch, r in results
        ]
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
                no_segment=self.scan_options.decide.no_segment,
                plan={},
                skipped=[],
                timings={},
                notes=notes,
                urgent_probability=self.scan_options.decide.urgent_probability,
            )
            write_outputs(summary, submission=False, no_phi=self.scan_options.write.no_phi)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(STUDY_FIELDS)
        for s in sorted(states, key=lambda s: s.last, reverse=True):
            results = [r for _, r in self._results.get(s.study, [])]
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
    def step(self, *, send: bool = True) -> None:
        """One turn: the studies now complete triaged (one batch), their results sent (unless a sender thread
        sends them), the worklist rewritten when it changed."""
        self.triage_due()
        if send:
            self.send_pending(time.time())
        else:
            self._send_wake.set()
        if self._changed:
            self._write()

    def _write(self) -> None:
        self._changed = False
        self.write_worklist()

    def serve(self, stop: threading.Event, tick_s: float = 0.25) -> None:
        """Run until ``stop`` is set. Results are sent from a thread of their own, so that a slow destination
        (a PACS indexing each object it stores) never holds back the triage of the next studies."""

        def sending() -> None:
            while not stop.is_set():
                self._send_wake.wait(tick_s)
                self._send_wake.clear()
                self.send_pending(time.time())

        sender = threading.Thread(target=sending, name="pneumotriage-sender", daemon=True)
        sender.start()
        try:
            while not stop.is_set():
                self.step(send=False)
                self._wake.wait(tick_s)
                self._wake.clear()
        finally:
            stop.set()
            sender.join(timeout=60)
        if self._changed:
            self._write()

    def close(self) -> None:
        self.node.close()

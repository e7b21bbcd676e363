"""pneumotriage listen against a real PACS on loopback (Debian's Orthanc): a study pushed to the node is triaged
once complete and its SR reaches Orthanc referencing its images; a destination that is down gets the results when
it returns, once; the node refuses what it must (AE titles and hosts not allowed, non-image SOP classes, a disk
under its watermark) and stores 20 associations at once."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (the pacs extra)")
pytest.importorskip("highdicom", reason="highdicom is not installed (the pacs extra)")

import pydicom  # noqa: E402
from orthanc import Orthanc, free_port  # noqa: E402
from pynetdicom import AE  # noqa: E402

from pneumotriage.listen import Destination, Listener, ListenOptions, NodeOptions  # noqa: E402
from pneumotriage.models import load_model  # noqa: E402
from pneumotriage.scan import ScanOptions  # noqa: E402
from pneumotriage.synth import StudySummary, write_study  # noqa: E402

#: Every wait in these tests ends: a node or a PACS that hangs fails the test, it never blocks the suite.
WAIT_S = 120.0


def push(files: Sequence[Path], port: int, *, calling: str = "MODALITY", called: str = "PNEUMOTRIAGE") -> list[int]:
    """C-STORE ``files`` to the node in one association; the statuses (an empty list: the association was
    refused)."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in dict.fromkeys((d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return []
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def _files(study: StudySummary) -> list[Path]:
    return [study.out / im.path for im in study.images]


@contextmanager
def listening(out: Path, models: dict[str, Path] | dict[str, str], **node: Any) -> Iterator[Listener]:
    """A listener serving in a thread until the block ends."""
    send_to = node.pop("send_to", None)
    idle = node.pop("idle", 0.5)
    kos = node.pop("kos", False)
    scan = node.pop("scan", ScanOptions.of(device="cpu"))
    lines: list[str] = []
    listener = Listener(
        out,
        classifier=load_model(models["classifier"]),
        segmenter=load_model(models["segmenter"]),
        scan_options=scan,
        node=NodeOptions(port=0, **node),
        options=ListenOptions(idle_s=idle, send_to=send_to, retry_min_s=0.5, retry_max_s=2.0, kos=kos),
        log=lines.append,
    )
    listener.lines = lines  # type: ignore[attr-defined]  # what it said, for the tests
    stop = threading.Event()
    thread = threading.Thread(target=listener.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
        listener.close()


def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {WAIT_S:.0f} s for {what}")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


def test_a_study_pushed_is_triaged_and_its_results_reach_the_pacs(
    pacs: Orthanc, models: dict[str, Path], tmp_path: Path
) -> None:
    study = write_study(tmp_path / "study", 3, positive_rate=0.5, size=(128, 128), seed=11)
    out = tmp_path / "node"
    to = Destination(pacs.ae_title, "127.0.0.1", pacs.dicom_port)
    with listening(out, models, send_to=to) as listener:
        assert push(_files(study), listener.node.port) == [0, 0, 0]
        srs = pacs.wait_for("SR", 3, WAIT_S)
        assert len(srs) == 3
        # Each SR is filed under its image's study and names its image.
        study_uids = {str(pydicom.dcmread(f).StudyInstanceUID) for f in _files(study)}
        assert {sr["StudyInstanceUID"] for sr in srs} <= study_uids
        referenced = set()
        for uid in pacs.get("/instances"):
            tags = pacs.get(f"/instances/{uid}/tags?simplify")
            if tags.get("Modality") == "SR":
                for item in tags.get("CurrentRequestedProcedureEvidenceSequence", []):
                    for series in item.get("ReferencedSeriesSequence", []):
                        for ref in series.get("ReferencedSOPSequence", []):
                            referenced.add(ref["ReferencedSOPInstanceUID"])
        assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in _files(study)} <= referenced
        rows = _until(lambda: len(_rows(out / "studies.csv")) == len(study_uids) and _rows(out / "studies.csv"), "rows")
        assert {r["study_instance_uid"] for r in rows} == study_uids
        assert sum(int(r["instances"]) for r in rows) == 3
        assert all(r["result_sent_at"] and float(r["time_to_result_s"]) > 0 for r in rows)
        worklist = _until(lambda: [r for r in _rows(out / "worklist.csv") if r["result_sent_at"]], "sent times")
        assert len(worklist) == 3 and all(r["tier"] in ("urgent", "review", "routine") for r in worklist)
        assert all(r["received_at"] <= r["result_sent_at"] for r in worklist)  # when it came, when its result went
        # Each SR in the PACS carries its image's tier, as the worklist has it.
        tier_of = {r["sop_instance_uid"]: r["tier"] for r in worklist}
        for uid in pacs.get("/instances"):
            if pacs.get(f"/instances/{uid}/simplified-tags")["Modality"] != "SR":
                continue
            sr = pydicom.dcmread(io.BytesIO(pacs.raw(f"/instances/{uid}/file")))
            image = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            source = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            assert _tier_in(sr) == tier_of[source].capitalize()
        # The node answers C-ECHO.
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", listener.node.port, ae_title="PNEUMOTRIAGE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()


def _tier_in(sr: Any) -> str | None:
    """The triage tier an SR states (its "Triage priority" evaluation), searched through its content tree."""
    for item in sr.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if names and names[0].CodeValue == "TIER":
            return str(item.ConceptCodeSequence[0].CodeMeaning)
        found = _tier_in(item)
        if found:
            return found
    return None


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("result_sent_at", "x")]  # studies.csv: the sent ones


def test_results_wait_for_a_pacs_that_is_down_and_arrive_once(
    pacs: Orthanc, models: dict[str, Path], tmp_path: Path
) -> None:
    study = write_study(tmp_path / "study", 2, positive_rate=0.5, size=(128, 128), seed=12)
    out = tmp_path / "node"
    pacs.stop()
    to = Destination(pacs.ae_title, "127.0.0.1", pacs.dicom_port)
    with listening(out, models, send_to=to) as listener:
        assert push(_files(study), listener.node.port) == [0, 0]
        failing = _until(lambda: [s for s in listener.inbox.states() if s.send_error], "a failed send")
        assert "could not be reached" in (failing[0].send_error or "")
        pacs.start()
        srs = pacs.wait_for("SR", 2, WAIT_S)
        assert len(srs) == 2
        time.sleep(2.0)  # further turns of the loop send nothing more
        states = listener.inbox.states()
        assert sum(len(s.sent) for s in states) == 2 and not any(s.send_error for s in states)
        sends = [line for line in listener.lines if "result objects stored" in line]  # type: ignore[attr-defined]
        assert len(sends) == len(states)  # each study's results sent once, after the failures
    assert len(pacs.instances("SR")) == 2


def test_the_node_refuses_what_it_must_and_stores_20_associations_at_once(
    models: dict[str, Path], tmp_path: Path
) -> None:
    study = write_study(tmp_path / "study", 20, positive_rate=0.3, size=(96, 96), seed=13)
    files = _files(study)
    with listening(tmp_path / "node", models, allow=("MODALITY",), idle=60.0, max_associations=25) as listener:
        port = listener.node.port
        assert push(files[:1], port, calling="STRANGER") == []  # not on the allow-list
        assert not listener.inbox.states()
        # A structured report is not an image: its presentation context is refused (and with no other, the
        # association with it), nothing stored.
        sr = tmp_path / "sr.dcm"
        ds = pydicom.dcmread(files[0])
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(sr)
        assert push([sr], port) == []
        assert not listener.inbox.states()
        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda f: push([f], port), files))
        assert statuses == [[0]] * 20
        stored = sum(len(s.received) for s in listener.inbox.states())
        assert stored == 20


def test_a_disk_under_the_watermark_refuses_associations(models: dict[str, Path], tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", 1, positive_rate=0.0, size=(96, 96), seed=14)
    with listening(tmp_path / "node", models, min_free=1 << 62, idle=60.0) as listener:  # more than any disk
        assert push(_files(study), listener.node.port) == []
        assert not listener.inbox.states()


def test_a_node_on_another_host_list_refuses_this_one(models: dict[str, Path], tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", 1, positive_rate=0.0, size=(96, 96), seed=15)
    with listening(tmp_path / "node", models, allow_hosts=("10.9.9.9",), idle=60.0) as listener:
        assert push(_files(study), listener.node.port) == []
        assert not listener.inbox.states()


def _one_study(study: StudySummary, folder: Path) -> list[Path]:
    """The study's images rewritten as one study of one patient (as a modality sends a series)."""
    folder.mkdir(parents=True)
    files = []
    first = pydicom.dcmread(_files(study)[0])
    for i, path in enumerate(_files(study)):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = first.StudyInstanceUID, first.PatientID, first.PatientName
        files.append(folder / f"{i}.dcm")
        ds.save_as(files[-1])
    return files


def _start_cli(out: Path, models: dict[str, Path], port: int, pacs: Orthanc, idle: float) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "pneumotriage", "listen", "--out", str(out), "--port", str(port), "--idle", str(idle)]
    args += ["--send-to", f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}", "--device", "cpu"]
    args += ["--classifier", str(models["classifier"]), "--segmenter", str(models["segmenter"])]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    _until(lambda: _answers(port) or proc.poll() is not None, "the listener's port")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_node_killed_mid_study_and_restarted_triages_and_sends_each_image_once(
    pacs: Orthanc, models: dict[str, Path], tmp_path: Path
) -> None:
    """kill -9 with one study done and another received but not yet complete: after the restart the first is
    neither triaged nor sent again, and the second is triaged once, whole, and its results sent once."""
    done = write_study(tmp_path / "a", 2, positive_rate=0.5, size=(96, 96), seed=16)
    later = _one_study(write_study(tmp_path / "b", 4, positive_rate=0.5, size=(96, 96), seed=17), tmp_path / "one")
    out, port = tmp_path / "node", free_port()
    first = _start_cli(out, models, port, pacs, idle=3.0)
    try:
        assert push(_files(done), port) == [0, 0]
        assert len(pacs.wait_for("SR", 2, WAIT_S)) == 2
        _until(lambda: (out / "studies.csv").is_file() and "result" in (out / "studies.csv").read_text(), "the csv")
        assert push(later, port) == [0, 0, 0, 0]  # complete 3 s after its last image: killed before that
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind
        first.wait(timeout=WAIT_S)
    second = _start_cli(out, models, port, pacs, idle=1.0)
    try:
        assert len(pacs.wait_for("SR", 6, WAIT_S)) == 6
        time.sleep(2.0)
    finally:
        second.send_signal(signal.SIGINT)
        said = second.communicate(timeout=WAIT_S)[1]
    study_b = str(pydicom.dcmread(later[0]).StudyInstanceUID)
    study_a = {str(pydicom.dcmread(f).StudyInstanceUID) for f in _files(done)}
    assert not any(uid in said for uid in study_a), said  # neither triaged nor sent again
    assert said.count(f"study {study_b}: 4 images triaged") == 1, said
    stored = [line for line in said.splitlines() if line.startswith(f"study {study_b}: ") and "objects stored" in line]
    assert len(stored) == 1, said  # its results sent once
    sops = {str(pydicom.dcmread(f).SOPInstanceUID) for f in later}
    journaled = [
        json.loads(line)["image_id"]
        for journal in (out / "batches").glob("*/.scan/journal.jsonl")
        for line in journal.read_text().splitlines()
    ]
    assert sorted(i for i in journaled if i in sops) == sorted(sops)  # each image triaged once


def test_results_stored_by_stow_rs_on_a_dicomweb_server(pacs: Orthanc, models: dict[str, Path], tmp_path: Path) -> None:
    from orthanc import DICOMWEB_PLUGIN

    from pneumotriage.listen import StowDestination

    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian's orthanc-dicomweb; .ci/run installs it)")
    study = write_study(tmp_path / "study", 2, positive_rate=0.5, size=(96, 96), seed=18)
    to = StowDestination.parse(f"{pacs.url}/dicom-web")
    with listening(tmp_path / "node", models, send_to=to) as listener:
        assert push(_files(study), listener.node.port) == [0, 0]
        srs = pacs.wait_for("SR", 2, WAIT_S)
        assert {sr["StudyInstanceUID"] for sr in srs} == {
            str(pydicom.dcmread(f).StudyInstanceUID) for f in _files(study)
        }
        _until(lambda: sum(len(s.sent) for s in listener.inbox.states()) == 2, "both acknowledged")


def test_a_folder_scan_sends_its_results_too(pacs: Orthanc, models: dict[str, Path], tmp_path: Path) -> None:
    """scan --send-to: the same sender after a batch scan; a destination that does not answer is one error line
    that says how to send again, and the objects stay under --out."""
    from typer.testing import CliRunner

    from pneumotriage.cli import app

    study = write_study(tmp_path / "study", 2, positive_rate=0.5, size=(96, 96), seed=19)
    common = ["--classifier", str(models["classifier"]), "--segmenter", str(models["segmenter"]), "--workers", "0"]
    out = tmp_path / "scan"
    sent = CliRunner().invoke(
        app, ["scan", str(study.out), "--out", str(out), *common, "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}"]
    )
    assert sent.exit_code == 0, sent.output
    assert f"sent {len(list((out / 'dicom').glob('*.dcm')))} DICOM objects" in sent.output  # SRs, and SEGs
    assert len(pacs.wait_for("SR", 2, WAIT_S)) == 2
    pacs.stop()
    again = CliRunner().invoke(
        app,
        ["scan", str(study.out), "--out", str(out), *common, "--resume", "--send-to", f"X@127.0.0.1:{pacs.dicom_port}"],
    )
    assert again.exit_code == 1 and "could not be reached" in again.output and "--resume to send them" in again.output
    assert len(list((out / "dicom").glob("*-sr.dcm"))) == 2


def test_escalation_moves_long_waiting_studies_up_within_their_tier_only() -> None:
    from pneumotriage.listen.service import escalate
    from pneumotriage.scan import ImageResult

    rows = [
        ImageResult("u1", "u1", "ok", tier="urgent", probability=0.9, study_instance_uid="s1"),
        ImageResult("r1", "r1", "ok", tier="review", probability=0.8, study_instance_uid="s2"),
        ImageResult("r2", "r2", "ok", tier="review", probability=0.5, study_instance_uid="s3"),
        ImageResult("o1", "o1", "ok", tier="routine", probability=0.2, study_instance_uid="s4"),
        ImageResult("o2", "o2", "ok", tier="routine", probability=0.1, study_instance_uid="s5"),
    ]
    waited = {"s1": 10.0, "s2": 60.0, "s3": 3600.0, "s4": 100.0, "s5": 7200.0}
    order = escalate(rows, waited, max_wait_s=1800.0)
    assert [r.image_id for r in order] == ["u1", "r2", "r1", "o2", "o1"]  # a tier is never crossed
    assert [r.rank for r in order] == [1, 2, 3, 4, 5]


def test_a_key_object_selection_marks_the_urgent_images(pacs: Orthanc, tmp_path: Path) -> None:
    """--kos: a study with urgent images also gets a Key Object Selection that references exactly those, filed
    under the study, marked as unverified AI output. (The demo models and a demo-like study: they outline.)"""
    from pneumotriage.demo import NAMES, demo_weights

    demo_weights()
    study = write_study(tmp_path / "study", 6, positive_rate=0.5, size=(256, 256), seed=7, ptx_scale=2.0)
    files = _one_study(study, tmp_path / "one")
    to = Destination(pacs.ae_title, "127.0.0.1", pacs.dicom_port)
    demo = {"classifier": NAMES[0], "segmenter": NAMES[1]}
    with listening(tmp_path / "node", demo, send_to=to, kos=True, scan=ScanOptions.of(device="cpu", tta=True)) as node:
        assert push(files, node.node.port) == [0] * 6
        _until(lambda: all(s.time_to_result_s is not None for s in node.inbox.states()), "results sent")
    worklist = list(csv.DictReader(open(tmp_path / "node" / "worklist.csv", newline="")))
    urgent = {r["sop_instance_uid"] for r in worklist if r["tier"] == "urgent"}
    assert urgent, "the demo models outlined nothing"
    masks = {r["mask_file"] for r in worklist if r["mask_file"]}
    assert masks and all(m.startswith("batches/") and (tmp_path / "node" / m).is_file() for m in masks)
    # A restart reads every study's rows back (outlined ones included) and writes the same worklist.
    with listening(tmp_path / "node", demo, send_to=to, kos=True, scan=ScanOptions.of(device="cpu", tta=True)):
        time.sleep(1.0)
    again = list(csv.DictReader(open(tmp_path / "node" / "worklist.csv", newline="")))
    assert [(r["image_id"], r["tier"], r["mask_file"]) for r in again] == [
        (r["image_id"], r["tier"], r["mask_file"]) for r in worklist
    ]
    (kos,) = [
        uid for uid in pacs.get("/instances") if pacs.get(f"/instances/{uid}/simplified-tags")["Modality"] == "KO"
    ]
    tags = pacs.get(f"/instances/{kos}/tags?simplify")
    marked = {
        ref["ReferencedSOPInstanceUID"]
        for item in tags["CurrentRequestedProcedureEvidenceSequence"]
        for series in item["ReferencedSeriesSequence"]
        for ref in series["ReferencedSOPSequence"]
    }
    assert marked == urgent
    # Each outlined image's SEG reached the PACS too.
    segs = pacs.instances("SEG")
    assert len(segs) == len(masks) and {t["StudyInstanceUID"] for t in segs} == {tags["StudyInstanceUID"]}
    assert tags["StudyInstanceUID"] == str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert "unverified" in tags["SeriesDescription"]


def test_the_association_limit_refuses_one_more(models: dict[str, Path], tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", 1, positive_rate=0.0, size=(96, 96), seed=21)
    with listening(tmp_path / "node", models, max_associations=1, idle=60.0) as listener:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", listener.node.port, ae_title="PNEUMOTRIAGE")
        try:
            assert held.is_established
            assert push(_files(study), listener.node.port) == []  # over the limit: refused, nothing stored
        finally:
            held.release()
        # Free again once the released association's thread has ended (a moment under load).
        _until(lambda: push(_files(study), listener.node.port) == [0], "the node to accept again")


def test_results_triaged_before_a_restart_and_never_acknowledged_are_sent_after_it(
    pacs: Orthanc, models: dict[str, Path], tmp_path: Path
) -> None:
    study = write_study(tmp_path / "study", 2, positive_rate=0.5, size=(96, 96), seed=22)
    to = Destination(pacs.ae_title, "127.0.0.1", pacs.dicom_port)
    pacs.stop()
    with listening(tmp_path / "node", models, send_to=to) as first:
        assert push(_files(study), first.node.port) == [0, 0]
        _until(lambda: all(s.send_error for s in first.inbox.states()) and first.inbox.states(), "failed sends")
    pacs.start()
    with listening(tmp_path / "node", models, send_to=to) as second:
        assert len(pacs.wait_for("SR", 2, WAIT_S)) == 2
        _until(lambda: all(s.time_to_result_s is not None for s in second.inbox.states()), "acknowledged")
        said = list(second.lines)  # type: ignore[attr-defined]
    assert not any("images triaged" in line for line in said)  # sent, not triaged again

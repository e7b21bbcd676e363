"""The scan cascade end to end: worklist, tiers, error rows, masks, submission, report, resume after kill, submit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import read_rows, scan_args
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.dicom import read_header
from pneumotriage.labels import read_rle_csv
from pneumotriage.scan import TIERS


def test_scan_end_to_end(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, scan_args(scan_input, out, models))
    assert result.exit_code == 4, result.output  # a DICOM failed, the rest were triaged
    rows = read_rows(out / "worklist.csv")
    assert len(rows) == 13  # the text file is not an image: listed apart
    assert [int(r["rank"]) for r in rows] == list(range(1, 14))
    assert [Path(r["path"]).name for r in read_rows(out / "skipped.csv")] == ["notes.txt"]

    errors = [r for r in rows if r["status"] == "error"]
    assert {Path(r["path"]).name for r in errors} == {"broken.dcm"}
    assert all(r["tier"] == "review" and r["path"] in r["error"] for r in errors)

    # ranked: tier order, then readable rows by falling probability
    order = [TIERS.index(r["tier"]) for r in rows]
    assert order == sorted(order)
    for tier in TIERS:
        probs = [float(r["probability"]) for r in rows if r["tier"] == tier and r["status"] == "ok"]
        assert probs == sorted(probs, reverse=True)

    ok = [r for r in rows if r["status"] == "ok"]
    # Something was outlined: urgent, or review where the outline is implausible (these barely trained models
    # outline whole images, and are flagged so).
    assert any(r["mask_file"] for r in ok)
    assert all(r["tier"] == "review" for r in ok if r["flag"])
    submission = read_rle_csv(out / "submission.csv")
    assert set(submission) == {r["image_id"] for r in ok} | {r["image_id"] for r in errors}
    for r in ok:
        header = read_header(r["path"])
        decoded = submission.masks_for(r["image_id"], header.rows, header.columns)
        if not r["mask_file"]:  # nothing outlined: no mask file, -1 in the submission, not urgent
            assert r["area_px"] in ("", "0") and not decoded.any() and r["overlay_file"] == ""
            assert r["tier"] != "urgent"
            continue
        mask = np.asarray(Image.open(out / r["mask_file"]))
        assert mask.shape == (header.rows, header.columns) and set(np.unique(mask)) <= {0, 255}
        assert int(r["area_px"]) == int(np.count_nonzero(mask)) > 0
        assert r["tier"] == ("review" if r["flag"] else "urgent")  # segmented run: urgent = outlined plausibly
        np.testing.assert_array_equal(decoded, mask > 0)
        overlay = Image.open(out / r["overlay_file"])
        assert overlay.mode == "RGB" and overlay.size[0] <= 512
        assert r["side"] in ("left", "right", "both")
        spacing = header.pixel_spacing_mm
        assert spacing is not None
        assert float(r["area_cm2"]) == pytest.approx(int(r["area_px"]) * spacing[0] * spacing[1] / 100, rel=1e-3)
    assert any(r["mask_file"] for r in ok)
    assert all(submission[r["image_id"]] == [] for r in errors)  # -1

    document = json.loads((out / "worklist.json").read_text())
    assert [r["image_id"] for r in document["worklist"]] == [r["image_id"] for r in rows]
    assert {m["role"] for m in document["models"]} == {"classifier", "segmenter"}
    assert all(len(m["sha256"]) == 64 for m in document["models"])
    html = (out / "report.html").read_text()
    assert html.count('<tr class="row ') == 13


def _journaled(proc: subprocess.Popen[Any], out: Path, rows: int) -> Path:
    """The journal of the scan ``proc`` writes into ``out``, once it holds ``rows`` finished images (the scan
    still running: it is stopped next)."""
    journal = out / ".scan" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= rows):
        assert proc.poll() is None, "the scan ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return journal


def test_scan_resume_after_kill_equals_full_run(scan_input: Path, models: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    base = [sys.executable, "-m", "pneumotriage", *scan_args(scan_input, full, models), "--batch-size", "1"]
    assert subprocess.run(base, env=env, capture_output=True, timeout=300).returncode == 4

    part = tmp_path / "part"
    args = [sys.executable, "-m", "pneumotriage", *scan_args(scan_input, part, models), "--batch-size", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = _journaled(proc, part, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(journal.read_text().splitlines())
    assert 3 <= done < 13 and not (part / "worklist.csv").exists()

    resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 4, resumed.stderr
    assert "done before the resume" in " ".join(resumed.stderr.split())
    # 12 images and the truncated DICOM (its header reads, its pixels fail): nothing redone, nothing lost
    assert len(journal.read_text().splitlines()) == 13

    def comparable(folder: Path) -> list[dict[str, str]]:
        return [
            {k: v for k, v in r.items() if k != "path" and k != "error"} for r in read_rows(folder / "worklist.csv")
        ]

    assert comparable(part) == comparable(full)
    assert (part / "submission.csv").read_text() == (full / "submission.csv").read_text()
    for mask in (full / "masks").iterdir():
        assert (part / "masks" / mask.name).read_bytes() == mask.read_bytes()


def test_scan_refuses_a_used_folder_and_missing_models(scan_input: Path, models: dict[str, Path], tmp_path: Path):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, scan_args(scan_input, out, models)).exit_code == 4
    again = runner.invoke(app, scan_args(scan_input, out, models))
    assert again.exit_code == 2 and "--resume" in again.output
    # A resume with another option is refused naming it, as it was then and is now.
    other = runner.invoke(app, [*scan_args(scan_input, out, models), "--resume", "--tta"])
    assert other.exit_code == 2 and "scanned with other options: --tta (off then, on now)" in other.output, other.output
    result = runner.invoke(app, ["scan", str(scan_input), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no models given" in result.output
    result = runner.invoke(
        app, ["scan", str(scan_input), "--out", str(tmp_path / "o3"), "--classifier", "demo-classifier"]
    )
    assert result.exit_code == 3 and "weights fetch demo-classifier" in result.output


def test_ctrl_c_says_how_many_images_were_done_and_how_to_go_on(
    scan_input: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    for copy in range(1, 6):  # 72 images: a scan long enough to be interrupted half-way (12 took 0.7 s)
        shutil.copytree(scan_input, scan_input / f"copy{copy}", ignore=shutil.ignore_patterns("copy*"))
    args = [sys.executable, "-m", "pneumotriage", *scan_args(scan_input, out, models), "--batch-size", "1"]
    # Ctrl-C's SIGINT as a terminal sends it: a test process may have inherited SIGINT ignored (pytest-xdist's
    # workers do), and a Python started so never raises KeyboardInterrupt
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (no threads started here)
    )
    journal = _journaled(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    done = len(journal.read_text().splitlines())
    assert f"interrupted: {done} images done and kept in" in " ".join(stderr.split()), stderr
    assert "with --resume to go on" in " ".join(stderr.split()) and "Traceback" not in stderr, stderr

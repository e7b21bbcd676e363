"""Builders and runners several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.labels import RleLabels
from pneumotriage.synth import StudySummary

runner = CliRunner()
T = TypeVar("T")
#: The side of the `tiny` study and models (conftest.py).
TINY_SIZE = 64


def scan_args(folder: Path, out: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [
        "scan",
        str(folder),
        "--out",
        str(out),
        "--classifier",
        str(models["classifier"]),
        "--segmenter",
        str(models["segmenter"]),
        "--workers",
        "0",
        "--no-progress",
        # an untrained-ish segmenter: make it outline something on every image past a low gate
        "--gate",
        "0.3",
        "--top-score",
        "0.2",
        "--min-area",
        "50",
        *extra,
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def rendered(report: Path | str, profile: Path) -> str:
    """report.html as headless Chromium leaves its DOM once the page's script has run (skips without Chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            report if isinstance(report, str) else report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def labels_of(rows: dict[str, list[str]]) -> RleLabels:
    labels = RleLabels(None)
    labels.update(rows)
    return labels


def blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random probability maps with blobs of several sizes."""
    noise = torch.from_numpy(rng.random((n, 1, size // 8, size // 8)).astype(np.float32))
    maps = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
    return (maps**3).numpy()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate_cli(study: StudySummary, cls: Path, seg: Path, out: Path) -> dict:
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(study.out),
            "--labels",
            str(study.labels_csv),
            "--classifier",
            str(cls),
            "--segmenter",
            str(seg),
            "--out",
            str(out),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--bootstrap",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["plots"] == ["calibration.png", "confusion.png", "dice_hist.png", "pr.png", "roc.png"]
    # the table shows the scan's decision first, then the classifier's operating points, labelled
    text = " ".join(result.output.split())
    md = doc["mask_decision"]
    assert "scan decision: TP FP FN TN" in text and f"{md['tp']} {md['fp']} {md['fn']} {md['tn']}" in text
    assert text.index("scan decision") < text.index("classifier probability: ROC AUC")
    for name in doc["plots"]:
        with Image.open(out / name) as image:
            image.verify()
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == doc["n_images"] == len(study.images)
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(doc["competition_dice"], abs=1e-6)
    return doc


def tune_cli(study: StudySummary, cls: Path, seg: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        ["tune", str(study.out), "--labels", str(study.labels_csv), "--segmenter", str(seg), "--classifier", str(cls),
         "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress", *extra],
    )  # fmt: skip


def within(seconds: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread, failing the test if it has not returned after ``seconds``: for
    a call that waits on child processes (a worker killed on purpose), which must fail, never block the suite."""
    answer: list[T] = []
    raised: list[BaseException] = []

    def call() -> None:
        try:
            answer.append(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the test's thread
            raised.append(exc)

    thread = threading.Thread(target=call, name="within", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {seconds:g} s")
    if raised:
        raise raised[0]
    return answer[0]

"""The scan's progress bar at 80 columns: the walk's count as the total as soon as the walk is over, files passed
over and done before counted as done, the time left whole."""

from __future__ import annotations

import io
import re
import time
from typing import Any

from rich.console import Console

from pneumotriage.cli.progress import with_progress


def _lines(job: Any) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with_progress(True, job, console=console)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", buf.getvalue()).replace("\r", "\n")
    return [line.rstrip() for line in text.split("\n") if line.strip()]


def test_the_bar_has_the_walks_total_once_it_is_over_and_fits_80_columns() -> None:
    base = {"event": "batch", "classified": 0, "segmented": 0, "errors": 0, "skipped": 0, "resumed": 0}

    def job(on_event: Any) -> None:
        on_event({**base, "discovered": 40, "walk_done": False, "decoded": 8})
        time.sleep(0.3)
        # the walk is over: 102 files, two of them not DICOM (passed over); up to 71 read and 1 unreadable
        for decoded in range(20, 72, 6):
            on_event({**base, "discovered": 102, "walk_done": True, "decoded": decoded, "skipped": 2})
            time.sleep(0.1)
        on_event(
            {**base, "discovered": 102, "walk_done": True, "decoded": 71, "errors": 1, "segmented": 30, "skipped": 2}
        )
        time.sleep(0.3)

    lines = _lines(job)
    assert any("8/?" in line and "of 40+ found" in line for line in lines), lines
    last = lines[-1]
    assert "74/102" in last and "segmented 30, 1 error" in last, lines
    assert re.search(r"\d:\d\d:\d\d", last), last  # the time left, whole
    assert "━" * 10 in lines[0] or "━" in last  # a bar, not three characters of one
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]


def test_counts_read_as_english() -> None:
    from pneumotriage.cli.console import counted

    assert [counted(n, "worker") for n in (0, 1, 2)] == ["0 workers", "1 worker", "2 workers"]
    assert counted(1, "file") == "1 file" and counted(3, "image") == "3 images"

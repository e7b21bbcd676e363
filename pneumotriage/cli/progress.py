"""Progress bars on stderr for the library's long jobs (scan, tune, training), fed by their progress events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pneumotriage.cli.console import err
from pneumotriage.runtime import Progress, ProgressEvent


def bars(*, show: bool = True, transient: bool = False) -> Any:
    """A rich progress display on stderr whose bars read: description, bar, done/total, time left, and an
    ``info`` field for the figures of the moment."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    return Progress(*columns, console=err, disable=not show, transient=transient)


def with_progress(show: bool, job: Callable[[Progress], Any]) -> Any:
    """Run ``job(on_event)`` with a progress bar on stderr (discovered / decoded / classified / segmented, ETA)
    fed by its scan's progress events."""
    with bars(show=show, transient=True) as bar:
        task = bar.add_task("scanning", total=None, info="")

        def on_event(event: ProgressEvent) -> None:
            if event["event"] == "start" and event["resumed"]:
                bar.update(task, info=f"{event['resumed']} done before")
            elif event["event"] == "batch":
                found = "" if event["walked"] else "+ (still discovering)"
                bar.update(
                    task,
                    total=event["discovered"],
                    completed=event["decoded"] + event["errors"],
                    info=f"classified {event['classified']}, segmented {event['segmented']}, errors {event['errors']}"
                    + found,
                )

        return job(on_event)

"""Progress bars on stderr for the library's long jobs (scan, tune, training), fed by their progress events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pneumotriage.cli.console import err
from pneumotriage.runtime import Progress, ProgressEvent


def bars(*, show: bool = True, transient: bool = False, console: Any = None) -> Any:
    """A rich progress display on stderr (or ``console``) whose bars read: description, bar, done/total, time
    left, and an ``info`` field for the figures of the moment; at 80 columns the bar keeps 20 of them and the
    time left shows whole."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    return Progress(*columns, console=console or err, disable=not show, transient=transient)


def with_progress(show: bool, job: Callable[[Progress], Any], *, console: Any = None) -> Any:
    """Run ``job(on_event)`` with a progress bar on stderr fed by its scan's progress events: files done (read,
    passed over as not DICOM, or done before a resume) of those the walk found, its total as soon as the walk is
    over (until then ``N+`` and no time left), and the images segmented and the errors so far."""
    with bars(show=show, transient=True, console=console) as bar:
        task = bar.add_task("scanning", total=None, info="")

        def on_event(event: ProgressEvent) -> None:
            if event["event"] == "start" and event["resumed"]:
                bar.update(task, info=f"{event['resumed']} done before")
            elif event["event"] == "batch":
                done = event["decoded"] + event["errors"] + event.get("skipped", 0) + event.get("resumed", 0)
                walking = "" if event["walk_done"] else f" of {event['discovered']}+ found"
                errors = event["errors"]
                bar.update(
                    task,
                    total=event["discovered"] if event["walk_done"] else None,
                    completed=done,
                    info=f"segmented {event['segmented']}, {errors} error{'s' if errors != 1 else ''}{walking}",
                )

        return job(on_event)

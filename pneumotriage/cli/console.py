"""Console output of the command line: the two consoles, errors as one line and their exit codes, and the
worklist and figures as tables."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pneumotriage.errors import ExitCode, PneumotriageError
from pneumotriage.io import printable, strict_json, terminal_safe

if TYPE_CHECKING:
    from pneumotriage.scan import ScanSummary

err = Console(stderr=True)

out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def shown(text: object) -> str:
    """Text from a file (a tag value, a file name, a message naming one) as rich markup that prints it as it is:
    its bytes made valid UTF-8, terminal control characters escaped, rich markup (``[/]``, ``[link=...]``)
    escaped."""
    return escape(terminal_safe(printable(str(text))))


def reports_errors(func: F) -> F:
    """Turn a library error into one red line on stderr and its exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PneumotriageError as exc:
            err.print(f"[bold red]error:[/] {shown(exc)}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(ExitCode.INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


#: Characters of an id kept in a table (its end: UIDs differ there); ``--json`` and the files hold them whole.
SHORT_ID = 12


def counted(n: int, word: str, plural: str | None = None) -> str:
    """``n`` and the word, in the plural unless ``n`` is 1: "1 worker", "3 workers", "1 image"."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def short(text: str, keep: int = SHORT_ID) -> str:
    """``text``, or "…" and its last ``keep`` characters, so that tables fit 80 columns."""
    return text if len(text) <= keep + 1 else "…" + text[-keep:]


def plain_table(title: str | None = None) -> Table:
    """A table as the console prints them: no box, one space between columns, the title on the left (so that it
    fits 80 columns and copies as plain text)."""
    return Table(title=title, title_justify="left", box=None, padding=(0, 1, 0, 0))


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` with no spaces at the ends of its lines (rich pads every cell to its column's width)."""
    console = console or out
    with console.capture() as captured:
        console.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def print_worklist(summary: ScanSummary, limit: int = 20) -> None:
    from pneumotriage.scan import reason_of

    table = plain_table(f"worklist: {shown(summary.out / 'worklist.csv')}")
    for col in ("rank", "tier", "probability", "image"):
        table.add_column(col, no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    style = {"urgent": "bold red", "review": "yellow", "routine": "green"}
    for r in summary.results[:limit]:
        why = shown(printable(reason_of(r, summary.thresholds, summary.decisions, summary.urgent_probability)))
        table.add_row(
            str(r.rank),
            f"[{style[r.tier]}]{r.tier}[/]",
            "" if r.probability is None else f"{r.probability:.3f}",
            shown(short(printable(r.image_id))),
            why if r.status == "ok" else f"[red]{why}[/]",
        )
    print_table(table)
    if len(summary.results) > limit:
        out.print(f"... {len(summary.results) - limit} more in worklist.csv", highlight=False)


def print_plan(summary: ScanSummary) -> None:
    p, t = summary.plan, summary.timings
    err.print(
        f"ran on {p['device']}: batch {p['batch_size']}, {counted(p['workers'], 'worker')}, "
        f"{counted(p['torch_threads'], 'torch thread')}"
        f" ({p['why']}); {t['model_s']:.1f} s in the models of {t['total_s']:.1f} s",
        highlight=False,
    )
    for role, chosen in (p.get("backends") or {}).items():
        err.print(f"{role} run by {chosen['version']} ({chosen['why']})", highlight=False)


def report_scan(summary: ScanSummary, *, as_json: bool, no_phi: bool, verbose: bool) -> None:
    """A finished scan's worklist (a table, or JSON on stdout), notes and counts."""
    from pneumotriage.scan import worklist_document, worklist_rows

    if as_json:
        print(strict_json(worklist_document(summary, worklist_rows(summary, no_phi=no_phi)), indent=1))
    else:
        print_worklist(summary)
    for note in summary.notes:
        err.print(f"[bold yellow]note:[/] {shown(note)}", highlight=False)
    if verbose:
        print_plan(summary)
    c = summary.counts
    err.print(
        f"{counted(c['images'], 'image')}: {c['urgent']} urgent, {c['review']} review, {c['routine']} routine, "
        f"{c['errors']} unreadable"
        + (f", {c['not_triaged']} not triaged" if c.get("not_triaged") else "")
        + f"; {summary.timings['total_s']:.1f} s"
        + (f" ({c['resumed']} done before the resume)" if c.get("resumed") else "")
        + (
            f"\n{counted(c['skipped'], 'file')} passed over (not DICOM, hidden, not a regular file): why in "
            f"{summary.out / 'skipped.csv'}"
            if c.get("skipped")
            else ""
        )
        + f"\nreport: {summary.out / 'report.html'}",
        highlight=False,
    )


def ci_text(value: float | None, ci: list[float | None] | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f"  [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text

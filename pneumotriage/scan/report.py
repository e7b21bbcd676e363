"""Stage 10, outputs: ``report.html``, one self-contained page a radiologist opens in a browser.

A reading list: the ranked worklist with the picture first (an outlined image's overlay, the grey image of the
others, for the first ``--report-thumbnails`` rows), the tier and the reason for it in plain words, compact ids
(whole on hover and when copied), one line a row at desk widths and a card a row at phone widths; a lightbox for
every row with a caption, the outline on or off and the arrow keys through the worklist; sorting by any column, a
tier filter, a text search, the legend and the run's details (timings, what ``auto`` chose, models, thresholds).

The page is rendered from the templates in ``pneumotriage/scan/templates`` (Jinja2, escaping every value: no
header text reaches the page as markup). Pictures are embedded as data URIs, so the file can be mailed or moved on
its own; the page's script reads no data from outside the file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, Template
from markupsafe import Markup
from pybase64 import b64encode

from pneumotriage.io import atomic_open, printable, store_files
from pneumotriage.outlayout import REPORT, OutLayout, thumbnail_name
from pneumotriage.postprocess import shown
from pneumotriage.scan.records import ImageResult, ScanSummary
from pneumotriage.scan.tiers import legend_items, order_key
from pneumotriage.version import __version__


def _data(path: Path | None) -> bytes | None:
    """A picture file's bytes in base64 for a data URI (None where there is none). Bytes, written to the page as
    they are: base64's alphabet holds nothing HTML escapes, and the page's text around them holds letters
    outside ASCII, so as text each picture would be widened to two bytes a letter and narrowed again."""
    if path is None:
        return None
    try:
        with open(path, "rb", buffering=0) as fh:
            return b64encode(fh.read())
    except OSError:
        return None


#: Where the rows go in the rendered page: the template renders the page around them; the rows, written by
#: :func:`_row`, go to the file as bytes.
_ROWS = "<!-- the worklist's rows -->"


class ReportThumbnails:
    """The thumbnails of the rows likely to head the worklist, kept in memory while the scan runs (at most about
    twice ``limit``: memory stays flat). At the end the first ``limit`` rows get theirs written from here, or
    (images done before a resume) decoded again; the report shows those."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: list[tuple[tuple[Any, ...], str, bytes]] = []

    def offer(self, result: ImageResult, thumb: bytes) -> None:
        if self.limit <= 0 or result.file_stem is None:
            return
        self._kept.append((order_key(result), result.file_stem, thumb))
        if len(self._kept) >= 2 * self.limit:
            self._kept.sort(key=lambda kept: kept[0])
            del self._kept[self.limit :]

    def write(
        self,
        out: Path,
        ranked: Sequence[ImageResult],
        missing: Callable[[list[ImageResult]], None],
        store: Callable[[list[Path], list[bytes]], None] | None = None,
    ) -> None:
        """Write the thumbnails of the first rows that have none: ``store`` writes the files of those kept
        (:func:`store_files` where not given), ``missing`` makes those not kept."""
        kept = {stem: thumb for _, stem, thumb in self._kept}
        layout = OutLayout(out)
        without = (r for r in ranked if r.status == "ok" and r.file_stem and not layout.thumbnail(r.file_stem).exists())
        wanted = list(itertools.islice(without, self.limit))  # the files of the rows after those are not looked at
        have = [r.file_stem for r in wanted if r.file_stem in kept]
        (store or store_files)([layout.thumbnail(stem) for stem in have], [kept[stem] for stem in have])
        missing([r for r in wanted if r.file_stem not in kept])


def thumbnail_files(out: Path, results: Sequence[ImageResult]) -> list[Path | None]:
    """Each result's thumbnail file where one was written (the folder listed once, not each row's file looked
    for: most rows have none)."""
    layout = OutLayout(out)
    try:
        with os.scandir(layout.thumbs) as entries:
            there = {entry.name for entry in entries if entry.is_file()}
    except OSError:  # no thumbnails at all
        return [None] * len(results)
    return [
        layout.thumbnail(r.file_stem) if r.file_stem and thumbnail_name(r.file_stem) in there else None for r in results
    ]


#: Names of skipped files shown in the report's footer (all are in skipped.csv).
_SKIPPED_SHOWN = 20

#: The worklist's columns in the report, after the picture: (row key, heading, cell class). The rest of a row
#: (paths, UIDs, model names) is in worklist.csv and worklist.json.
_COLUMNS = (
    ("rank", "Rank", "num"),
    ("tier", "Tier", "tier"),
    ("reason", "Reason", "reason"),
    ("probability", "Probability", "num"),
    ("area_cm2", "Area cm²", "num"),
    ("side", "Side", ""),
    ("image_id", "Image", "id"),
    ("patient_id", "Patient", "id"),
    ("accession", "Accession", ""),
    ("study_datetime", "Study date", ""),
    ("received_at", "Received", ""),
    ("result_sent_at", "Result sent", ""),
    ("view_position", "View", ""),
    ("modality", "Modality", ""),
)
#: Columns shown only when some row has a value (a node's arrival and send times; a folder scan has none).
_WHEN_FILLED = ("received_at", "result_sent_at")
#: Columns shown as a compact id: the end of the id, the whole one on hover and when copied.
_COMPACT = ("image_id", "patient_id")


@cache
def _template() -> Template:
    folder = resources.files("pneumotriage.scan") / "templates"
    env = Environment(autoescape=True, keep_trailing_newline=True)
    env.globals.update(
        css=Markup((folder / "report.css").read_text(encoding="utf-8")),
        js=Markup((folder / "report.js").read_text(encoding="utf-8")),
    )
    return env.from_string((folder / "report.html.j2").read_text(encoding="utf-8"))


def _text(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "probability":
        return f"{float(value):.3f}"
    if key == "area_cm2":  # nothing outlined: the reason says so
        return f"{float(value):.1f}" if value else ""
    if key in (
        "study_datetime",
        "received_at",
        "result_sent_at",
    ):  # ISO 8601: "2019-03-04T10:22:05" reads "2019-03-04 10:22"
        text = str(value).replace("T", " ")
        return text[:16] if len(text) >= 16 else text
    return str(value)


def _caption(row: dict[str, Any]) -> str:
    """What the lightbox says of a row's picture: which image, whose, when, its tier and why."""
    parts = [str(row.get("image_id"))]
    if row.get("patient_id"):
        parts.append(f"patient {row['patient_id']}")
    if row.get("study_datetime"):
        parts.append(_text("study_datetime", row["study_datetime"]))
    parts.append(f"#{row.get('rank')} {row.get('tier')}")
    if row.get("probability") is not None:
        parts.append(f"probability {_text('probability', row['probability'])}")
    if row.get("area_px"):
        cm2 = row.get("area_cm2")
        parts.append(f"area {cm2:.1f} cm² ({row['area_px']} px)" if cm2 is not None else f"area {row['area_px']} px")
    parts.append(str(row.get("reason") or ""))
    if row.get("notes"):
        parts.append(f"read with notes: {row['notes']}")
    return " · ".join(p for p in parts if p)


def _escape(value: Any) -> str:
    """``markupsafe.escape(value)`` as text (``&``, ``<``, ``>``, ``'`` and ``"`` as it writes them): the same
    bytes without a Markup object made for each (~1 us a call, 40 calls a row)."""
    kind = type(value)
    if kind is int or kind is float or kind is bool:  # a number's text holds nothing to escape
        return str(value)
    text: str
    if kind is str:
        text = value
    elif hasattr(value, "__html__"):
        return str(value.__html__())
    else:
        text = str(value)
    return (
        text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;").replace("'", "&#39;").replace('"', "&#34;")
    )


#: Each column's cell up to its value: (row key, the cell's opening with its class, its label).
_CELLS = tuple((key, f'<td class="{cls}', f' data-label="{_escape(label)}" data-v="') for key, label, cls in _COLUMNS)


def _row(out: Path, result: ImageResult, row: dict[str, Any], thumb: bytes | None, shown_keys: set[str]) -> list[bytes]:
    """One row of the page as HTML in UTF-8, in parts: its picture, cells (those of ``shown_keys``), caption and
    pictures (base64).

    Written here, not by the template: Jinja's lookup and escape of each attribute of each cell were most of the
    report's time (~0.06 ms a row). Every value is escaped as the template escapes it (markupsafe's ``escape``,
    :func:`_escape`); only the base64 pictures, whose alphabet holds nothing to escape, go in as they are."""
    cells = []
    for key, opening, label in _CELLS:
        if key not in shown_keys:
            continue
        value = row.get(key)
        text = _text(key, value)
        if not text:
            cells.append(f'{opening} empty"{label}{"" if value is None else _escape(value)}"></td>')
            continue
        escaped = _escape(value)
        head, shown = f'{opening}"{label}{escaped}"', escaped if text is value else _escape(text)
        if key in _COMPACT:
            cells.append(f'{head} title="{shown}"><span class="cid"><bdi>{shown}</bdi></span></td>')
        elif key == "reason":
            cells.append(f'{head} title="{shown}">{shown}</td>')
        else:
            cells.append(f"{head}>{shown}</td>")
    classes: list[str] = [result.tier]
    if result.status != "ok":
        classes.append("error")
    if result.flag:
        classes.append("flagged")
    stem = result.file_stem
    image_id = _escape(row.get("image_id") or "")  # made printable with the row (a file name may not be UTF-8)
    full = _data(out / result.overlay_file) if result.overlay_file else None
    plain = _data(OutLayout(out).plain_thumbnail(stem)) if result.overlay_file and stem else None
    parts = [
        f'<tr class="row {_escape(" ".join(classes))}" data-tier="{_escape(result.tier)}" data-id="{image_id}" '
        f'data-caption="{_escape(_caption(row))}"'.encode()
    ]
    if full:
        parts += (b' data-full="data:image/jpeg;base64,', full, b'"')
    if plain:
        parts += (b' data-plain="data:image/jpeg;base64,', plain, b'"')
    if thumb:
        opening = (
            f'>\n<td class="pic"><button class="open" type="button" title="enlarge"><img alt="picture of {image_id}" '
        )
        parts += (f'{opening}src="data:image/jpeg;base64,'.encode(), b64encode(thumb), b'"></button>')
    else:
        parts.append(b'>\n<td class="pic"><button class="open none" type="button" title="details">details</button>')
    parts.append(f"</td>{''.join(cells)}</tr>\n".encode())
    return parts


def write_report(summary: ScanSummary, rows: list[dict[str, Any]], *, no_phi: bool = False) -> None:
    """Render ``report.html`` for a ranked scan; ``rows`` are its worklist rows (printable, PHI already left out
    with ``no_phi``) in the order of ``summary.results``."""
    c = summary.counts
    counts = [
        (label, c.get(key, 0))
        for label, key in (
            ("images", "images"),
            ("urgent", "urgent"),
            ("review", "review"),
            ("routine", "routine"),
            ("unreadable", "errors"),
            ("not triaged", "not_triaged"),
        )
    ]
    by_id = {id(r): row for r, row in zip(summary.results, rows, strict=True)}
    shown_keys = {
        key
        for key, _, _ in _COLUMNS
        if (not rows or key in rows[0]) and (key not in _WHEN_FILLED or any(row.get(key) for row in rows))
    }
    thumbs = thumbnail_files(summary.out, summary.results)
    # Made as the page is written, one row at a time: the pictures of every row together can be many megabytes.
    page_rows = (
        _row(summary.out, r, by_id[id(r)], thumb.read_bytes() if thumb is not None else None, shown_keys)
        for r, thumb in zip(summary.results, thumbs, strict=True)
    )
    p = summary.plan
    plan = None
    if p:
        plan = {
            "head": f"{p.get('device')}, batch {p.get('batch_size')}, {p.get('workers')} workers, "
            f"{p.get('torch_threads')} torch threads",
            "why": p.get("why"),
            "backends": [f"{role}: {c['version']} ({c['why']})" for role, c in (p.get("backends") or {}).items()],
        }
    t = summary.thresholds
    timings = summary.timings
    pictured = sum(thumb is not None for thumb in thumbs)
    page = _template().render(
        notes=summary.notes,
        counts=counts,
        legend=[(key, Markup(text)) for key, text in legend_items(summary)],  # built here, from numbers only
        outlines=summary.decisions != "classifier",
        columns=[{"label": label} for key, label, _ in _COLUMNS if key in shown_keys],
        rows=Markup(_ROWS),
        pictured=pictured,
        more_rows=0 < pictured < len(thumbs),
        timing=f"{timings.get('total_s', 0.0):.1f} s in all, {timings.get('model_s', 0.0):.1f} s in the models",
        plan=plan,
        models=summary.models,
        thresholds=f"gate {shown(t.gate)}; review {shown(t.review_at)}; triplet top {shown(t.top_score)}, "
        f"min area {t.min_area:g} px at 1024², bottom {shown(t.bottom_score)}",
        skipped=[printable(Path(r.path).name) for r in summary.skipped[:_SKIPPED_SHOWN]],
        skipped_count=len(summary.skipped),
        skipped_more=len(summary.skipped) - _SKIPPED_SHOWN,
        no_phi=no_phi,
        version=__version__,
    )
    head, rows_here, tail = page.partition(_ROWS)
    assert rows_here, "the template has a place for the rows"
    with atomic_open(summary.out / REPORT) as fh:
        fh.write(head.encode())
        for parts in page_rows:
            fh.writelines(parts)
        fh.write(tail.encode())

"""Stage 10, outputs: ``report.html``, one self-contained page a radiologist opens in a browser.

The ranked worklist with thumbnails (every outlined image's overlay, and the first rows of the others), tier
colours, sorting by any column, a tier filter and a text search, and the run summary (counts, timings, what
``auto`` chose, models, thresholds). Thumbnails are embedded as data URIs, so the file can be mailed or moved on
its own. Every value from a DICOM header is HTML-escaped; the page's script reads no data from outside the file.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pneumotriage.io import atomic_open_text, atomic_write_bytes, printable
from pneumotriage.postprocess import shown
from pneumotriage.scan.finish import thumbnail_path
from pneumotriage.scan.rank import order_key
from pneumotriage.scan.records import ImageResult, ScanSummary
from pneumotriage.version import __version__

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em} .note{color:#8a1c00;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff} th,td{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:middle} th{cursor:pointer;background:#eee;position:sticky;top:0;user-select:none}
tr.urgent td.tier{background:#d7191c;color:#fff} tr.review td.tier{background:#fdae61} tr.routine td.tier{
background:#a6d96a} tr.error td{color:#8a1c00} img.thumb{height:96px;display:block}
.summary{display:flex;gap:2em;flex-wrap:wrap;margin:.8em 0} .summary div{background:#fff;padding:.5em .8em;
border:1px solid #ddd} .controls{margin:.8em 0} .mono{font-family:ui-monospace,monospace;font-size:12px}
.legend{margin:.6em 0;padding-left:1.2em} .legend .key{display:inline-block;min-width:4.5em;padding:0 .4em;
margin-right:.4em} .key.urgent{background:#d7191c;color:#fff} .key.review{background:#fdae61}
.key.routine{background:#a6d96a} td.flag{color:#8a1c00;font-weight:600}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
img[data-full]{cursor:zoom-in} #lightbox{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);
align-items:center;justify-content:center;cursor:zoom-out} #lightbox img{max-width:95vw;max-height:95vh}
"""

_JS = """
(function(){
  var table=document.getElementById('worklist'), body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows), dir={};
  function num(v){var x=parseFloat(v);return isNaN(x)?null:x;}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.addEventListener('click',function(){
      dir[col]=!dir[col];
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',dir[col]?'ascending':'descending');
      rows.sort(function(a,b){
        var x=a.cells[col].getAttribute('data-v'), y=b.cells[col].getAttribute('data-v');
        var nx=num(x), ny=num(y), c;
        if(nx!==null&&ny!==null){c=nx-ny;}else{c=String(x).localeCompare(String(y));}
        return dir[col]?c:-c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  var tier=document.getElementById('tier'), search=document.getElementById('search');
  function filter(){
    var t=tier.value, q=search.value.toLowerCase(), shown=0;
    rows.forEach(function(r){
      var ok=(!t||r.getAttribute('data-tier')===t)&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=ok?'':'none'; if(ok){shown++;}
    });
    document.getElementById('shown').textContent=shown;
  }
  tier.addEventListener('change',filter); search.addEventListener('input',filter); filter();
  var box=document.getElementById('lightbox'), big=document.getElementById('big');
  function show(img){big.src=img.getAttribute('data-full');big.alt=img.alt;box.style.display='flex';}
  box.addEventListener('click',function(){box.style.display='none';big.removeAttribute('src');});
  Array.prototype.forEach.call(document.querySelectorAll('img[data-full]'),function(img){
    img.addEventListener('click',function(){show(img);});
  });
  var m=/^#view=(.+)$/.exec(location.hash);  // a link straight to one image's overlay
  if(m){var hit=document.querySelector('img[data-full][data-image="'+CSS.escape(decodeURIComponent(m[1]))+'"]');
    if(hit){hit.click();}}  // the same click a reader gives it
  document.body.setAttribute('data-ready','1');
})();
"""

_COLUMNS = (
    ("rank", "Rank"),
    ("tier", "Tier"),
    ("probability", "Probability"),
    ("area_cm2", "Area cm²"),
    ("area_px", "Area px"),
    ("side", "Side"),
    ("image_id", "Image"),
    ("patient_id", "Patient"),
    ("accession", "Accession"),
    ("study_datetime", "Study date"),
    ("view_position", "View"),
    ("modality", "Modality"),
    ("status", "Status"),
)


def _overlay_data(out: Path, result: ImageResult) -> str | None:
    """The overlay JPEG of an outlined image, base64, for the lightbox (None without one)."""
    if not result.overlay_file:
        return None
    try:
        return base64.b64encode((out / result.overlay_file).read_bytes()).decode("ascii")
    except OSError:
        return None


_NOT_TRIAGED = (
    "an image <i>not triaged</i>: not a frontal chest radiograph, or not one read truly (its row says why; "
    "<code>--accept</code> widens the check)"
)


def legend_items(summary: ScanSummary) -> list[tuple[str, str]]:
    """What each tier means in this scan, built from the decisions that ran (the classifier alone, the classifier
    then the segmenter, or the segmenter alone) and the thresholds it ran at, so that it never contradicts a row."""
    from pneumotriage.scan.finish import MAX_BORDER_SHARE, MAX_OUTLINE_SHARE

    t = summary.thresholds
    gate, review = shown(t.gate), shown(t.review_at)
    unreadable = f"a file that could not be read, or {_NOT_TRIAGED}"
    if summary.decisions == "classifier":
        urgent = shown(summary.urgent_probability if summary.urgent_probability is not None else 0.9)
        why = "--no-segment" if summary.no_segment else "no segmenter given"
        items = [("urgent", f"classifier probability ≥ {urgent} (the classifier alone: {why}; no outlines)")]
        if t.review_at < float(urgent):
            items.append(("review", f"probability ≥ the review threshold {review} and below {urgent}; or {unreadable}"))
            items.append(("routine", f"probability below the review threshold {review}"))
        else:  # a review threshold at or above the urgent probability leaves no probability for review
            items.append(
                (
                    "review",
                    f"{unreadable} (the review threshold {review} is not below {urgent}: no image is review by its "
                    "probability)",
                )
            )
            items.append(("routine", f"probability below {urgent}"))
        return items
    scaled = (
        f"at least {t.min_area:g} pixels of a 1024 x 1024 image (scaled to each image's size: the Area px column "
        f"is at the image's own size) above {shown(t.top_score)}, the outline then drawn at {shown(t.bottom_score)}"
        + (f", parts under {t.min_component:g} px (at 1024²) dropped" if t.min_component else "")
    )
    implausible = (
        f"an implausible outline (over {MAX_OUTLINE_SHARE:.0%} of the image, or along over {MAX_BORDER_SHARE:.0%} "
        "of an image border: marked <i>implausible outline — check</i>)"
    )
    if summary.decisions == "segmenter":
        return [
            ("urgent", f"the segmenter outlined a pneumothorax ({scaled}; every image segmented, no classifier)"),
            (
                "review",
                f"nothing outlined but the segmenter's image score (its probability column) ≥ the review threshold "
                f"{review}; {implausible}; or {unreadable}",
            ),
            ("routine", f"nothing outlined and the segmenter's image score below {review}"),
        ]
    routine = f"nothing outlined and classifier probability below the review threshold {review}"
    if t.gate > t.review_at:
        routine += f" (images below the gate {gate} are not segmented)"
    return [
        ("urgent", f"the segmenter outlined a pneumothorax ({scaled}; images segmented from the gate {gate} up)"),
        (
            "review",
            f"nothing outlined but classifier probability ≥ the review threshold {review}; {implausible}; "
            f"or {unreadable}",
        ),
        ("routine", routine),
    ]


def _legend(summary: ScanSummary) -> str:
    """What the tiers mean (:func:`legend_items`), and what the outline colour means."""
    colour = (
        "<li>In the overlays, the outline is drawn in red and its inside tinted red.</li>"
        if summary.decisions != "classifier"
        else ""
    )
    rows = "".join(f"<li><span class='key {k}'>{k}</span> {text}</li>" for k, text in legend_items(summary))
    return f"<ul class='legend'>{rows}{colour}</ul>\n"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "probability":
        return f"{float(value):.3f}"
    if key == "study_datetime":  # ISO 8601 from the header: "2019-03-04T10:22:05" reads "2019-03-04 10:22"
        text = str(value).replace("T", " ")
        return text[:16] if len(text) >= 16 else text
    return str(value)


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

    def write(self, out: Path, ranked: Sequence[ImageResult], missing: Callable[[list[ImageResult]], None]) -> None:
        """Write the thumbnails of the first rows that have none; ``missing`` makes those not kept."""
        kept = {stem: thumb for _, stem, thumb in self._kept}
        wanted = [
            r for r in ranked if r.status == "ok" and r.file_stem and not thumbnail_path(out, r.file_stem).exists()
        ][: self.limit]
        for r in wanted:
            if r.file_stem in kept:
                atomic_write_bytes(thumbnail_path(out, r.file_stem), kept[r.file_stem], durable=False)
        missing([r for r in wanted if r.file_stem not in kept])


def iter_thumbnails(out: Path, results: Sequence[ImageResult]) -> Iterator[tuple[ImageResult, bytes | None]]:
    """Each result with its thumbnail (JPEG bytes) when one was written."""
    for r in results:
        path = thumbnail_path(out, r.file_stem) if r.file_stem else None
        yield r, (path.read_bytes() if path is not None and path.exists() else None)


#: Names of skipped files shown in the report's footer (all are in skipped.csv).
_SKIPPED_SHOWN = 20


def write_report(summary: ScanSummary, rows: list[dict[str, Any]], *, no_phi: bool = False) -> None:
    columns = [(k, label) for k, label in _COLUMNS if not rows or k in rows[0]]
    c = summary.counts
    with atomic_open_text(summary.out / "report.html") as fh:
        fh.write("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>")
        fh.write(
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        )
        fh.write(f"<title>pneumotriage worklist</title><style>{_CSS}</style></head>\n")
        fh.write(
            "<body><script>window.onerror=function(m){document.body.setAttribute('data-error',String(m));};</script>\n"
        )
        fh.write("<h1>Pneumothorax triage worklist</h1>\n")
        for note in summary.notes:
            fh.write(f"<p class='note'>{_e(note)}</p>\n")
        fh.write("<div class='summary'>")
        for label, key in (
            ("images", "images"),
            ("urgent", "urgent"),
            ("review", "review"),
            ("routine", "routine"),
            ("unreadable", "errors"),
            ("not triaged", "not_triaged"),
        ):
            fh.write(f"<div><b>{_e(c.get(key, 0))}</b> {label}</div>")
        total = summary.timings.get("total_s", 0.0)
        fh.write(f"<div>{total:.1f} s in all, {summary.timings.get('model_s', 0.0):.1f} s in the models</div>")
        p = summary.plan
        if p:
            fh.write(
                f"<div>{_e(p.get('device'))}, batch {_e(p.get('batch_size'))}, {_e(p.get('workers'))} workers, "
                f"{_e(p.get('torch_threads'))} torch threads<br><span class='mono'>{_e(p.get('why'))}</span></div>"
            )
        fh.write("</div>\n<div class='summary'>")
        for m in summary.models:
            fh.write(
                f"<div>{_e(m['role'])}: <b>{_e(m['name'])}</b> ({_e(m['model'])} @{_e(m['input_size'])} px)"
                f"<br><span class='mono'>sha256 {_e(m['sha256'])}</span>"
                + "".join(
                    f"<br>member <b>{_e(x['name'])}</b> ({_e(x['model'])} @{_e(x['input_size'])} px) "
                    f"<span class='mono'>sha256 {_e(x['sha256'])}</span>"
                    for x in m.get("members", [])
                )
                + "</div>"
            )
        t = summary.thresholds
        fh.write(
            f"<div>gate {shown(t.gate)}; review {shown(t.review_at)}; triplet top {shown(t.top_score)}, "
            f"min area {t.min_area:g} px at 1024², bottom {shown(t.bottom_score)}</div>"
        )
        fh.write("</div>\n")
        fh.write(_legend(summary))
        fh.write(
            "<div class='controls'>Tier <select id='tier'><option value=''>all</option>"
            "<option>urgent</option><option>review</option><option>routine</option></select> "
            "Search <input id='search' type='search' placeholder='image, patient, accession'> "
            "<span id='shown'></span> shown</div>\n"
        )
        fh.write("<table id='worklist'><thead><tr>")
        for _, label in columns:
            fh.write(f"<th>{_e(label)}</th>")
        fh.write("<th>Overlay</th><th>Note</th></tr></thead><tbody>\n")
        by_id = {id(r): row for r, row in zip(summary.results, rows, strict=True)}
        for result, thumb in iter_thumbnails(summary.out, summary.results):
            row = by_id[id(result)]
            classes = f"row {result.tier}" + (" error" if result.status != "ok" else "")
            fh.write(f"<tr class='{_e(classes)}' data-tier='{_e(result.tier)}'>")
            for key, _ in columns:
                value = row.get(key)
                cls = " class='tier'" if key == "tier" else (" class='mono'" if key == "image_id" else "")
                fh.write(f"<td{cls} data-v='{_e(value)}'>{_e(_fmt(key, value))}</td>")
            if thumb is not None:
                data = base64.b64encode(thumb).decode("ascii")
                full = _overlay_data(summary.out, result)
                shown_id = _e(row.get("image_id"))  # made printable with the row (a file name may not be UTF-8)
                zoom = f" data-full='data:image/jpeg;base64,{full}' data-image='{shown_id}'" if full else ""
                fh.write(
                    f"<td data-v=''><img class='thumb' alt='overlay of {shown_id}'{zoom} "
                    f"src='data:image/jpeg;base64,{data}'></td>"
                )
            else:
                fh.write("<td data-v=''></td>")
            reason = row.get("error") or row.get("flag")  # made printable with the row (names may not be UTF-8)
            flagged = " class='flag'" if row.get("flag") else ""
            fh.write(f"<td{flagged} data-v='{_e(reason)}'>{_e(reason)}</td></tr>\n")
        fh.write("</tbody></table>\n")
        # Click a thumbnail: its overlay at full size (the data sits in the thumbnail's attribute until then).
        fh.write("<div id='lightbox' title='click to close'><img id='big' alt=''></div>\n")
        if summary.skipped:
            fh.write(
                f"<p class='skipped'>{len(summary.skipped)} files passed over, not DICOM images (listed in "
                "skipped.csv): <span class='mono'>"
            )
            fh.write(", ".join(_e(printable(Path(r.path).name)) for r in summary.skipped[:_SKIPPED_SHOWN]))
            more = len(summary.skipped) - _SKIPPED_SHOWN
            fh.write((f" and {more} more" if more > 0 else "") + "</span></p>\n")
        phi = " Patient identifiers were left out (--no-phi)." if no_phi else ""
        fh.write(
            f"<p class='mono'>pneumotriage {_e(__version__)}.{_e(phi)} Decision support only: every image "
            "must still be read by a radiologist.</p>\n"
        )
        fh.write(f"<script>{_JS}</script></body></html>\n")

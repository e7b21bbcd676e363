"""The command-line layer: argument parsing, console output and exit codes. All work happens in the library.

Exit codes: 0 all went well; 1 an error stopped the command; 2 usage error; 3 weights missing;
4 some inputs could not be used (the rest were processed).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pneumotriage import __version__
from pneumotriage.dicom import DicomHeader, SkippedFile, discover, read_dicom
from pneumotriage.errors import DicomError, PneumotriageError, UsageError
from pneumotriage.io import printable

EXIT_INPUTS_FAILED = 4

app = typer.Typer(
    name="pneumotriage",
    help="Triage chest radiographs for pneumothorax from folders of DICOMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def _reports_errors(func: F) -> F:
    """Turn a library error into one red line on stderr and its exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PneumotriageError as exc:
            err.print(
                f"[bold red]error:[/] {escape(printable(str(exc)))}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"pneumotriage {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Triage chest radiographs for pneumothorax from folders of DICOMs."""


# --------------------------------------------------------------------------------------------------------------
# inspect


def _header_row(found: DicomHeader | SkippedFile, decode: bool) -> dict[str, Any]:
    if isinstance(found, SkippedFile):
        return {"path": str(found.path), "status": "skip", "reason": found.reason}
    h = found
    row: dict[str, Any] = {
        "path": str(h.path),
        "status": "ok" if h.usable else "skip",
        "reason": h.problem,
        "image_id": h.image_id,
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "patient_id": h.patient_id,
        "modality": h.modality,
        "view_position": h.view_position,
        "rows": h.rows,
        "columns": h.columns,
        "frames": h.frames,
        "photometric": h.photometric,
        "bits_stored": h.bits_stored,
        "transfer_syntax": h.transfer_syntax,
        "transfer_syntax_name": h.transfer_syntax_name,
        "pixel_spacing_mm": list(h.pixel_spacing_mm) if h.pixel_spacing_mm else None,
        "study_datetime": h.study_datetime.isoformat() if h.study_datetime else None,
        "warnings": list(h.warnings),
    }
    if decode and h.usable:
        try:
            image = read_dicom(h.path)
            row["warnings"] = image.warnings
        except DicomError as exc:
            row["status"], row["reason"] = "skip", exc.message
    return row


@app.command()
@_reports_errors
def inspect(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
    decode: Annotated[
        bool, typer.Option("--decode", help="Also decode the pixels, to catch damaged pixel data.")
    ] = False,
) -> None:
    """List the DICOMs found (header only) and say why any file would be skipped."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UsageError("no such file or folder", path=missing[0], hint="check the path")
    rows = [_header_row(found, decode) for found in discover(paths)]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        table = Table(title=f"{len(rows)} files", box=None, padding=(0, 1, 0, 0))
        for col in ("image id", "mod.", "size", "photometric", "bits", "syntax", "spacing", "status"):
            table.add_column(col, no_wrap=col not in ("syntax", "status"), overflow="fold")
        for row in rows:
            if "image_id" not in row:
                name = _short(printable(Path(row["path"]).name))
                table.add_row(name, "", "", "", "", "", "", f"[red]skip:[/] {row['reason']}")
                continue
            size = f"{row['rows']}x{row['columns']}" if row["rows"] else "?"
            spacing = "x".join(f"{v:.3g}" for v in row["pixel_spacing_mm"]) if row["pixel_spacing_mm"] else "-"
            status = "[green]ok[/]" if row["status"] == "ok" else f"[red]skip:[/] {row['reason']}"
            if row["status"] == "ok" and row["warnings"]:
                status += f" [yellow]({'; '.join(row['warnings'])})[/]"
            table.add_row(
                _short(printable(row["image_id"])),
                row["modality"] or "?",
                size,
                (row["photometric"] or "?").replace("MONOCHROME", "MONO"),
                str(row["bits_stored"] or "?"),
                (row["transfer_syntax_name"] or "?").split(" (")[0],  # "JPEG Baseline (Process 1)": its name
                spacing,
                status,
            )
        out.print(table)
    skipped = sum(r["status"] != "ok" for r in rows)
    err.print(f"{len(rows) - skipped} usable, {skipped} skipped", highlight=False)
    if skipped:
        raise typer.Exit(EXIT_INPUTS_FAILED)


# --------------------------------------------------------------------------------------------------------------
# synth


@app.command()
@_reports_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the study into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 20,
    positive_rate: Annotated[float, typer.Option(help="Share of images with a pneumothorax.")] = 0.3,
    size: Annotated[str, typer.Option(help="Image size: N or ROWSxCOLS.")] = "1024",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    photometric: Annotated[str, typer.Option(help="MONOCHROME2 (SIIM) or MONOCHROME1.")] = "MONOCHROME2",
    bits: Annotated[int, typer.Option(help="8 (JPEG Baseline, as SIIM), 12 or 16 (uncompressed).")] = 8,
    mask_shapes: Annotated[
        Path | None, typer.Option(help="SIIM label CSV whose real outlines shape the pneumothoraces.")
    ] = None,
    ptx_scale: Annotated[
        float, typer.Option(help="Size of the procedural pneumothoraces: 1 varied, 2 moderate to large.")
    ] = 1.0,
    workers: Annotated[
        int | None, typer.Option(help="Processes rendering images (default: the CPUs, up to 4, from 32 images).")
    ] = None,
) -> None:
    """Write a synthetic study of chest-radiograph phantoms with a SIIM-form train-rle.csv."""
    from rich.progress import Progress

    from pneumotriage.synth import parse_size, synth_workers, write_study

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("rendering phantoms", total=n)
        summary = write_study(
            out_dir,
            n,
            positive_rate=positive_rate,
            size=parse_size(size),
            seed=seed,
            photometric=photometric,
            bits=bits,
            mask_shapes=mask_shapes,
            ptx_scale=ptx_scale,
            progress=lambda done, total: progress.update(task, completed=done),
            workers=synth_workers(n) if workers is None else workers,
        )
    err.print(
        f"wrote {len(summary.images)} images ({summary.n_positive} with pneumothorax) to {summary.out}; "
        f"labels in {summary.labels_csv}",
        highlight=False,
    )


# --------------------------------------------------------------------------------------------------------------
# scan


def _default_weight(kind: str) -> str | None:
    """The registry's default model of a kind (``default = true`` and meant for patients), if any."""
    from pneumotriage.weights import load_registry

    for spec in load_registry().values():
        if spec.kind == kind and spec.default and spec.clinical:
            return spec.name
    return None


def _load(values: str | list[str] | None, kind: str) -> Any:
    """The model named by ``--classifier``/``--segmenter``; several names make an ensemble of them."""
    from pneumotriage.models import load_model
    from pneumotriage.models.ensemble import ensemble_of

    if not values:
        return None
    loaded = []
    for value in [values] if isinstance(values, str) else values:
        model = load_model(value)
        if model.spec.kind != kind:
            raise UsageError(f"--{kind} {value}: that is a {model.spec.kind}, not a {kind}")
        loaded.append(model)
    return ensemble_of(loaded)


def _default_list(values: list[str] | None, kind: str) -> list[str] | None:
    """``values``, else the registry's default model of ``kind`` (see :func:`_default_weight`)."""
    if values:
        return values
    default = _default_weight(kind)
    return [default] if default else None


#: Characters of an id kept in a table (its end: UIDs differ there); ``--json`` and the files hold them whole.
SHORT_ID = 12


def _short(text: str, keep: int = SHORT_ID) -> str:
    """``text``, or "…" and its last ``keep`` characters, so that tables fit 80 columns."""
    return text if len(text) <= keep + 1 else "…" + text[-keep:]


def _print_worklist(summary: Any, limit: int = 20) -> None:
    table = Table(
        title=f"worklist: {summary.out / 'worklist.csv'}", title_justify="left", box=None, padding=(0, 1, 0, 0)
    )
    for col in ("rank", "tier", "probability", "area cm²", "side", "image", "status"):
        table.add_column(col, overflow="fold")
    style = {"urgent": "bold red", "review": "yellow", "routine": "green"}
    for r in summary.results[:limit]:
        table.add_row(
            str(r.rank),
            f"[{style[r.tier]}]{r.tier}[/]",
            "" if r.probability is None else f"{r.probability:.3f}",
            "" if r.area_cm2 is None else f"{r.area_cm2:.1f}",
            r.side or "",
            _short(printable(r.image_id)),
            r.status if r.status == "ok" else f"[red]{r.status}[/]",
        )
    out.print(table)
    if len(summary.results) > limit:
        out.print(f"... {len(summary.results) - limit} more in worklist.csv", highlight=False)


def _print_plan(summary: Any) -> None:
    p, t = summary.plan, summary.timings
    err.print(
        f"ran on {p['device']}: batch {p['batch_size']}, {p['workers']} workers, {p['torch_threads']} torch threads"
        f" ({p['why']}); {t['model_s']:.1f} s in the models of {t['total_s']:.1f} s",
        highlight=False,
    )


def _with_progress(show: bool, job: Callable[[Callable[[dict[str, Any]], None]], Any]) -> Any:
    """Run ``job(on_event)`` with a rich progress bar on stderr (discovered / decoded / classified / segmented,
    ETA) fed by its scan's progress events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("scanning", total=None, info="")

        def on_event(event: dict[str, Any]) -> None:
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


@app.command()
@_reports_errors
def scan(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("scan-out"),
    classifier: ClassifierOpt = None,
    segmenter: SegmenterOpt = None,
    gate: Annotated[
        float | None,
        typer.Option(help="Classifier probability that sends an image to the segmenter (default: the checkpoint's)."),
    ] = None,
    top_score: Annotated[float | None, typer.Option(help="Triplet rule: pixel score that counts as confident.")] = None,
    min_area: Annotated[float | None, typer.Option(help="Triplet rule: confident pixels needed (at 1024²).")] = None,
    bottom_score: Annotated[float | None, typer.Option(help="Triplet rule: threshold of the final mask.")] = None,
    min_component: Annotated[
        float | None, typer.Option(help="Drop mask components smaller than this (px at 1024²).")
    ] = None,
    segment_all: SegmentAll = False,
    no_segment: Annotated[
        bool, typer.Option("--no-segment", help="Triage on the classifier alone (no outlines).")
    ] = False,
    tta: Tta = False,
    urgent_probability: Annotated[
        float, typer.Option(help="With --no-segment: the probability that makes an image urgent.")
    ] = 0.9,
    batch_size: ScanBatch = "auto",
    workers: ScanWorkers = "auto",
    device: Device = "auto",
    precision: PrecisionOpt = "auto",
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Compile the models (torch.compile) first: on an H100 1.7-1.9x their speed, after up to a minute "
            "of compiling at the first batch; for large folders (on a CPU the compiling outweighs most scans).",
        ),
    ] = False,
    rle: Annotated[str, typer.Option(help="submission.csv run-length form: relative (SIIM) or absolute.")] = (
        "relative"
    ),
    submission: Annotated[
        bool | None,
        typer.Option(
            help="Write submission.csv (default: yes, but not with --no-segment, where every row would be -1)."
        ),
    ] = None,
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg", help="Write OUT/dicom/<image>-seg.dcm, a DICOM Segmentation of each outline (for PACS)."
        ),
    ] = False,
    dicom_sr: Annotated[
        bool,
        typer.Option("--dicom-sr", help="Write OUT/dicom/<image>-sr.dcm, a DICOM Structured Report of each image."),
    ] = False,
    no_phi: Annotated[
        bool, typer.Option("--no-phi", help="Leave patient ID, accession and study date out of all outputs.")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in --out.")] = False,
    overlays: Annotated[bool, typer.Option(help="Write overlays/<image>.jpg for each outlined image.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the worklist as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say what auto chose, and the timings.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="K/N",
            help="Scan only shard K of N (K from 0) into --out, for a job array; `pneumotriage merge` then "
            "writes the worklist. Under torchrun each rank takes its shard by itself.",
        ),
    ] = None,
) -> None:
    """Triage DICOMs: classify all, segment the likely positives, write a ranked worklist, masks, a report.

    Under `torchrun --nproc-per-node G -m pneumotriage scan ...` each process scans its share of the files (on
    its own GPU) and the first merges them into one worklist."""
    from pneumotriage.scan import ranks as scan_ranks
    from pneumotriage.scan import run as run_scan
    from pneumotriage.scan.shards import Shard

    if rle not in ("relative", "absolute"):
        raise UsageError(f"--rle {rle!r}: choose relative or absolute")
    classifier = _default_list(classifier, "classifier")
    segmenter = None if no_segment else _default_list(segmenter, "segmenter")
    if classifier is None and segmenter is None:
        raise UsageError(
            "no models given and the registry names no default for real images: pass --classifier and "
            "--segmenter (a registry name or a checkpoint file), e.g. --classifier xrv-resnet50-res512-all "
            "--no-segment; `pneumotriage weights list` shows what there is"
        )
    options = _scan_options(
        batch_size,
        workers,
        gate=gate,
        top_score=top_score,
        min_area=min_area,
        bottom_score=bottom_score,
        min_component=min_component,
        segment_all=segment_all,
        no_segment=no_segment,
        tta=tta,
        urgent_probability=urgent_probability,
        device=device,
        precision=precision,
        compile=compile_models,
        submission=submission,
        dicom_seg=dicom_seg,
        dicom_sr=dicom_sr,
        rle_relative=rle == "relative",
        no_phi=no_phi,
        resume=resume,
        overlays=overlays,
    )
    one_shard = Shard.parse(shard) if shard is not None else None
    if one_shard is not None and scan_ranks.launched():
        raise UsageError("--shard under torchrun: each rank takes its own shard; leave --shard out")
    loaded_cls = _load(classifier, "classifier")
    loaded_seg = _load(segmenter, "segmenter")
    models = {"classifier": loaded_cls, "segmenter": loaded_seg}
    if scan_ranks.launched():
        with scan_ranks.joined(device) as ranks:
            options.device = str(ranks.device)
            options.resume = options.resume or ranks.restart > 0  # a restarted rank goes on from its journal
            merged = _with_progress(
                progress and ranks.rank == 0,
                lambda on_event: scan_ranks.run_ranks(
                    paths, out_dir, ranks, **models, options=options, progress=on_event
                ),
            )
        if merged is None:
            return  # not rank 0: quiet; rank 0 reports the whole job
        _report_scan(merged, as_json=as_json, no_phi=no_phi, verbose=verbose)
        if merged.failed:
            raise typer.Exit(EXIT_INPUTS_FAILED)
        return
    summary = _with_progress(
        progress,
        lambda on_event: run_scan(paths, out_dir, **models, options=options, progress=on_event, shard=one_shard),
    )
    if one_shard is not None:
        c = summary.counts
        err.print(
            f"shard {one_shard.label}: {c['images']} images ({c['urgent']} urgent, {c['errors']} unreadable) in "
            f"{summary.timings['total_s']:.1f} s; when every shard is done: pneumotriage merge {out_dir}",
            highlight=False,
        )
        if summary.failed:
            raise typer.Exit(EXIT_INPUTS_FAILED)
        return
    _report_scan(summary, as_json=as_json, no_phi=no_phi, verbose=verbose)
    if summary.failed:
        raise typer.Exit(EXIT_INPUTS_FAILED)


@app.command()
@_reports_errors
def merge(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="The --out of a scan run in shards.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the merged worklist as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say what auto chose, and the timings.")] = False,
) -> None:
    """Merge the finished shards of a sharded scan (`scan --shard K/N`) into one ranked worklist, submission and
    report. Exits 4, naming them, while any shard is missing (the outputs then hold the finished ones)."""
    from pneumotriage.scan.merge import ShardsMissing
    from pneumotriage.scan.merge import merge as merge_shards

    merged = merge_shards(out_dir)
    _report_scan(merged.summary, as_json=as_json, no_phi=merged.options.no_phi, verbose=verbose)
    if merged.missing:
        raise ShardsMissing(
            f"shard{'s' if len(merged.missing) > 1 else ''} {', '.join(merged.missing)} missing",
            path=out_dir,
            hint=f"run {'them' if len(merged.missing) > 1 else 'it'} (with --resume where started), then merge again",
        )
    if merged.summary.failed:
        raise typer.Exit(EXIT_INPUTS_FAILED)


def _report_scan(summary: Any, *, as_json: bool, no_phi: bool, verbose: bool) -> None:
    """A finished scan's worklist (a table, or JSON on stdout), notes and counts."""
    from pneumotriage.scan.outputs import worklist_document, worklist_rows

    if as_json:
        print(json.dumps(worklist_document(summary, worklist_rows(summary, no_phi=no_phi)), indent=1))
    else:
        _print_worklist(summary)
    for note in summary.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)
    if verbose:
        _print_plan(summary)
    c = summary.counts
    err.print(
        f"{c['images']} images: {c['urgent']} urgent, {c['review']} review, {c['routine']} routine, "
        f"{c['errors']} unreadable; {summary.timings['total_s']:.1f} s"
        + (f" ({c['resumed']} done before the resume)" if c.get("resumed") else "")
        + (f"\n{c['skipped']} files passed over, not DICOM: {summary.out / 'skipped.csv'}" if c.get("skipped") else "")
        + f"\nreport: {summary.out / 'report.html'}",
        highlight=False,
    )


@app.command()
@_reports_errors
def submit(
    test_dir: Annotated[Path, typer.Argument(metavar="TEST_DIR", help="Folder of the test DICOMs.")],
    sample_submission: Annotated[Path, typer.Option(help="The competition's sample submission CSV.")],
    out_file: Annotated[Path, typer.Option("--out", help="Submission CSV to write.")] = Path("submission.csv"),
    classifier: ClassifierOpt = None,
    segmenter: SegmenterOpt = None,
    work: Annotated[Path | None, typer.Option(help="Scan folder (default: OUT.scan beside --out).")] = None,
    segment_all: SegmentAll = False,
    tta: Tta = False,
    rle: Annotated[str, typer.Option(help="relative (SIIM) or absolute run-length form.")] = "relative",
    batch_size: ScanBatch = "auto",
    workers: ScanWorkers = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in the work folder.")] = False,
) -> None:
    """Write a Kaggle submission with exactly the sample's ImageIds (order kept, duplicates collapsed), each
    mask at its image's original resolution. ImageIds with no readable image get -1 and exit code 4."""
    from pneumotriage.labels import read_rle_csv, write_rle_csv
    from pneumotriage.scan import run as run_scan
    from pneumotriage.scan.outputs import absolute_rle, by_image_id

    if rle not in ("relative", "absolute"):
        raise UsageError(f"--rle {rle!r}: choose relative or absolute")
    if segmenter is None:
        raise UsageError("a submission needs masks: pass --segmenter (and usually --classifier)")
    sample_ids = list(read_rle_csv(sample_submission, strict=False))
    if not sample_ids:
        raise UsageError("the sample submission lists no ImageId", path=sample_submission)
    work = work or out_file.with_name(out_file.name + ".scan")
    summary = run_scan(
        [test_dir],
        work,
        classifier=_load(classifier, "classifier"),
        segmenter=_load(segmenter, "segmenter"),
        options=_scan_options(batch_size, workers, segment_all=segment_all, tta=tta, device=device, resume=resume),
    )
    found = {i: r.rle for i, r in by_image_id(summary.results).items() if r.status == "ok"}  # as scan's rule
    for note in summary.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)
    missing = [i for i in sample_ids if i not in found]
    rows = [(i, found.get(i, "-1") if rle == "relative" else absolute_rle(found.get(i, "-1"))) for i in sample_ids]
    write_rle_csv(out_file, rows, relative=rle == "relative")
    positive = sum(1 for _, value in rows if value.strip() != "-1")
    err.print(
        f"wrote {out_file}: {len(rows)} images, {positive} with a mask"
        + (f"; {len(missing)} ImageIds had no readable image and got -1 (first: {missing[0]})" if missing else ""),
        highlight=False,
    )
    if missing:
        raise typer.Exit(EXIT_INPUTS_FAILED)


# --------------------------------------------------------------------------------------------------------------
# weights

weights_app = typer.Typer(
    help="The weights registry (weights.toml) and the local cache: list, fetch, verify, import, path.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

_STATUS_STYLE = {"verified": "green", "cached": "yellow", "missing": "dim", "corrupt": "bold red"}


def _cache() -> Any:
    from pneumotriage.weights import WeightCache, load_registry

    return WeightCache(load_registry())


def _specs(cache: Any, names: list[str] | None) -> list[Any]:
    return [cache.registry.get_spec(n) for n in names] if names else list(cache.registry.values())


@weights_app.command("list")
@_reports_errors
def weights_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout instead of a table.")] = False,
    rehash: Annotated[bool, typer.Option("--verify", help="Re-hash cached files (slow for big files).")] = False,
) -> None:
    """Every weight in the registry with its cache status: verified, cached (not yet checked), missing, corrupt."""
    cache = _cache()
    rows = []
    for spec in cache.registry.values():
        st = cache.status(spec, rehash=rehash)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "arch": spec.arch,
                "encoder": spec.encoder,
                "input_size": spec.input_size,
                "url": spec.url,
                "sha256": spec.sha256,
                "sha256_prefix": spec.sha256_prefix,
                "pinned": spec.pinned,
                "observed_sha256": st.sha256,
                "status": st.status,
                "path": str(st.path),
                "size_mb": spec.size_mb,
                "licence": spec.licence,
                "clinical": spec.clinical,
                "recipe": spec.recipe,
                "description": spec.description,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title=f"weights in {cache.registry.path} (cache {cache.dir})",
        title_justify="left",
        box=None,
        padding=(0, 1, 0, 0),
    )
    table.add_column("name", no_wrap=True)
    for col in ("kind", "model", "size", "sha256", "status"):
        # Whole words ("classifier", never "classifi" over "er"); the model folds at its spaces.
        table.add_column(col, no_wrap=col != "model", min_width=13 if col == "model" else None)
    for row in rows:
        model = row["arch"] + (f" / {row['encoder']}" if row["encoder"] else "") + f" @{row['input_size']}"
        if row["sha256"]:
            sha = row["sha256"][:8] + "…"
        elif row["recipe"]:
            sha = "built here"
        else:
            sha = (row["sha256_prefix"] or "unpinned")[:8] + "…"
        size = f"{row['size_mb']:.0f} MB" if row["size_mb"] else "?"
        style = _STATUS_STYLE[row["status"]]
        table.add_row(row["name"], row["kind"], model, size, sha, f"[{style}]{row['status']}[/]")
    out.print(table)


@weights_app.command("fetch")
@_reports_errors
def weights_fetch(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Registry names (see `weights list`).")],
    mirror: Annotated[
        str | None,
        typer.Option(envvar="PNEUMOTRIAGE_MIRROR", help="Base URL that replaces the publisher's: MIRROR/<file>."),
    ] = None,
    offline: Annotated[
        bool, typer.Option(envvar="PNEUMOTRIAGE_OFFLINE", help="Forbid the network (use `weights import`).")
    ] = False,
    allow_unpinned: Annotated[
        bool, typer.Option(help="Accept a weight whose publisher gives no hash, and record the hash seen.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Download again even if a verified copy is cached.")] = False,
) -> None:
    """Download weights into the cache, verifying each file's sha256 before it is kept."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    cache = _cache()
    specs = _specs(cache, names)
    for spec in specs:
        with Progress(
            "{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task(spec.name, total=None)

            def report(done: int, total: int | None, task: Any = task, progress: Any = progress) -> None:
                progress.update(task, completed=done, total=total)

            path, digest = cache.fetch(
                spec, mirror=mirror, offline=offline, allow_unpinned=allow_unpinned, force=force, progress=report
            )
        note = "" if spec.pinned else " (unpinned: this hash is now recorded and checked from here on)"
        err.print(f"[green]ok[/] {spec.name}: sha256 {digest}{note}", highlight=False)
        out.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("verify")
@_reports_errors
def weights_verify(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="[NAME...]", help="Registry names; default every cached weight.")
    ] = None,
) -> None:
    """Re-hash cached weights. Exit 1 if any named weight is missing or any cached file does not match."""
    cache = _cache()
    failed = 0
    for spec in _specs(cache, names):
        st = cache.status(spec, rehash=True)
        if st.status == "missing" and not names:
            continue
        if st.status == "verified":
            err.print(f"[green]verified[/] {spec.name}: {st.sha256}", highlight=False)
            continue
        failed += 1
        try:
            cache.verify(spec)
        except PneumotriageError as exc:
            err.print(f"[bold red]{st.status}[/] {exc}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@weights_app.command("import")
@_reports_errors
def weights_import(
    name: Annotated[str, typer.Argument(help="Registry name.")],
    file: Annotated[Path, typer.Argument(help="The file, copied by hand (USB, internal share).")],
    allow_unpinned: Annotated[
        bool, typer.Option(help="Accept a weight whose publisher gives no hash, and record this file's hash.")
    ] = False,
) -> None:
    """Side-load a weight file into the cache after checking its sha256."""
    cache = _cache()
    path, digest = cache.import_file(cache.registry.get_spec(name), file, allow_unpinned=allow_unpinned)
    err.print(f"[green]ok[/] {name}: sha256 {digest}", highlight=False)
    out.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("path")
@_reports_errors
def weights_path(name: Annotated[str, typer.Argument(help="Registry name.")]) -> None:
    """Print the cached file of a weight (exit 3 with the commands that get it if it is missing)."""
    cache = _cache()
    out.print(str(cache.require(cache.registry.get_spec(name))), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------------------
# train

train_app = typer.Typer(
    help="Train the classifier or the segmenter on DICOMs and a SIIM-form label CSV.", no_args_is_help=True
)
app.add_typer(train_app, name="train")

DataArg = Annotated[Path, typer.Argument(metavar="DATA", help="Folder of training DICOMs (searched recursively).")]
LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="SIIM-form RLE label CSV.")]
# Options the train commands (and scan) share.
Epochs = Annotated[int, typer.Option(help="Epochs.")]
ImageSize = Annotated[int, typer.Option(help="Input side in pixels (images are resized to a square).")]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")]
Seed = Annotated[int, typer.Option(help="Seed for splits, sampling, augmentation and initialisation.")]
Device = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")]
Workers = Annotated[int, typer.Option(help="DataLoader worker processes decoding DICOMs.")]
Fold = Annotated[int, typer.Option(help="Validation fold (patient-grouped, stratified).")]
Folds = Annotated[int, typer.Option(help="Number of folds.")]
ValFraction = Annotated[float | None, typer.Option(help="Hold out this share instead of k-fold.")]
Patience = Annotated[int | None, typer.Option(help="Stop after this many epochs without improvement.")]
SwaEpochs = Annotated[
    int, typer.Option(help="Also write swa.pt: the weights of the last K epochs averaged, batch norm recomputed.")
]
Resume = Annotated[Path | None, typer.Option(help="Continue the run in this folder from its last.pt.")]
ShowProgress = Annotated[bool, typer.Option(help="Show progress bars on stderr.")]
Augmentation = Annotated[
    str,
    typer.Option(help="strong (flip, shift-scale-rotate, grid distortion, brightness/contrast/gamma), light or none."),
]
ClassifierOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Classifier: registry name, checkpoint or ensemble file; repeat for an ensemble (probabilities averaged)."
    ),
]
SegmenterOpt = Annotated[
    list[str] | None,
    typer.Option(help="Segmenter: registry name, checkpoint or ensemble file; repeat for an ensemble (maps averaged)."),
]
SegmentAll = Annotated[bool, typer.Option(help="Segment every image, not only those past the gate.")]
Tta = Annotated[bool, typer.Option(help="Average the segmenter over a horizontal flip.")]
BatchSize = Annotated[int, typer.Option(help="Images per batch.")]
ScanBatch = Annotated[
    str,
    typer.Option(
        "--batch-size",
        help="Images per model batch, or auto (on a CPU 1 at 512 px, up to 8 for small inputs; 64 on a GPU).",
    ),
]
ScanWorkers = Annotated[
    str,
    typer.Option(
        "--workers",
        help="Worker processes reading, decoding and finishing images, or auto (1 on a 2-core CPU; one per spare "
        "core with a GPU); 0 runs everything in this process.",
    ),
]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (bf16 + channels_last on CUDA), bf16 (also on a CPU with native bf16) or fp32.")
]
CacheDir = Annotated[Path | None, typer.Option(help="Folder for resized arrays, so later epochs skip decoding.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder: best.pt, last.pt, metrics.jsonl, config.json.")]


def _scan_options(batch_size: str, workers: str, **options: Any) -> Any:
    """:class:`pneumotriage.scan.ScanOptions` from the options scan, submit, evaluate and demo share."""
    from pneumotriage.scan import ScanOptions

    scan_options = ScanOptions(
        batch_size=_auto_int(batch_size, "--batch-size"), workers=_auto_int(workers, "--workers"), **options
    )
    scan_options.check()  # before any model is loaded or file written
    return scan_options


def _auto_int(value: str, option: str) -> int | None:
    """An option that takes a whole number or ``auto`` (None)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: give a whole number or auto") from None


def _share(text: str | None) -> tuple[float, float] | None:
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    try:
        parts = [float(p) for p in text.replace("->", ":").split(":")]
    except ValueError:
        raise UsageError(f"--positive-share {text!r}: give START:END such as 0.8:0.4, or one number") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise UsageError(f"--positive-share {text!r}: give START:END such as 0.8:0.4")
    return parts[0], parts[1]


def _run_training(kind: str, resume: Path | None, progress_on: bool, **options: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pneumotriage.train import TrainConfig, train

    if resume is not None:
        cfg = TrainConfig(kind=kind, data="", labels="", out=str(resume))
    else:
        if options["labels"] is None:
            raise UsageError("--labels is required (a SIIM-form RLE CSV)")
        if not options["data"].is_dir():
            raise UsageError("no such folder", path=options["data"])
        params: dict[str, Any] = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        cfg = TrainConfig(kind=kind, **params)
    rank = int(os.environ.get("RANK", "0"))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=err, disable=not progress_on or rank != 0) as bar:
        epochs = bar.add_task("epochs", total=cfg.epochs, info="")
        batches = bar.add_task("batches", total=None, info="")
        # Without a terminal (a log file, a CI job) the bars do not show: a line every half minute instead.
        quiet_bar = progress_on and rank == 0 and not err.is_terminal
        clock = {"run": time.monotonic(), "epoch": time.monotonic(), "said": time.monotonic(), "done": 0.0}
        state = {"epoch": 0, "epochs": cfg.epochs, "batches": 1}

        def eta(epoch: int, total: int, batch: int, batches_: int) -> str:
            """Time left for the run, from the time per batch so far in this run."""
            done = epoch - clock["done"] + batch / max(batches_, 1)  # epochs done in this process
            if done <= 0:
                return "?"
            left = (time.monotonic() - clock["run"]) / done * (total - epoch - batch / max(batches_, 1))
            return f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s"

        def on_event(event: dict[str, Any]) -> None:
            kind_ = event["event"]
            if kind_ == "weights":
                err.print(f"starting from {event['start']}", highlight=False)
            elif kind_ == "data":
                err.print(
                    f"train {event['train']} images ({event['train_positive']} positive), validation "
                    f"{event['val']} ({event['val_positive']} positive) on {event['device']}"
                    + (f" x{event['world_size']} processes" if event["world_size"] > 1 else ""),
                    highlight=False,
                )
            elif kind_ == "epoch_start":
                if clock["done"] == 0.0 and event["epoch"]:
                    clock["done"] = float(event["epoch"])  # resumed: epochs done before this process
                clock["epoch"] = time.monotonic()
                bar.update(epochs, completed=event["epoch"], total=event["epochs"])
                bar.reset(batches, total=event["batches"], info="")
                state.update(epoch=event["epoch"], epochs=event["epochs"], batches=event["batches"])
            elif kind_ == "batch":
                bar.update(batches, completed=event["batch"], info=f"loss {event['loss']:.4f}")
                if quiet_bar and time.monotonic() - clock["said"] >= 30:
                    clock["said"] = time.monotonic()
                    err.print(
                        f"epoch {state['epoch'] + 1}/{state['epochs']}: batch {event['batch']}/{state['batches']}, "
                        f"loss {event['loss']:.4f}; about "
                        f"{eta(state['epoch'], state['epochs'], event['batch'], state['batches'])} left",
                        highlight=False,
                    )
            elif kind_ == "epoch_end":
                m = event["metrics"]
                bar.update(epochs, completed=event["epoch"] + 1)
                sel = event["selection"]
                figures = ", ".join(
                    f"{k[4:]} {v:.3f}"
                    for k, v in m.items()
                    if k.startswith("val_")
                    and isinstance(v, float)
                    and k[4:] in (sel, "auc", "recall", "dice_positives")
                )
                star = " [green]*best[/]" if m.get("best") else ""
                took = time.monotonic() - clock["epoch"]
                left = eta(event["epoch"] + 1, state["epochs"], 0, 1) if event["epoch"] + 1 < state["epochs"] else ""
                err.print(
                    f"epoch {event['epoch'] + 1}/{state['epochs']}: loss {m.get('train_loss', float('nan')):.4f}, "
                    f"{figures}{star} ({took:.0f} s" + (f"; about {left} left)" if left else ")"),
                    highlight=False,
                )

        result = train(cfg, resume=resume is not None, progress=on_event)
    if rank == 0:
        stop = " (stopped early: no improvement)" if result.stopped_early else ""
        best = "none" if result.best_epoch is None else result.best_epoch + 1
        err.print(
            f"{result.epochs_run} epochs{stop}; best epoch {best} -> {result.run_dir / 'best.pt'}",
            highlight=False,
        )
        if result.swa_metrics:
            m, sel = result.swa_metrics, "auc" if cfg.kind == "classifier" else "competition_dice"
            best_value = result.best_metrics.get(f"val_{sel}")
            err.print(
                f"swa.pt (the last {m['averaged']} epoch{'s' if m['averaged'] != 1 else ''} averaged): "
                f"{sel.replace('_', ' ')} {m[sel]:.4f}"
                + (f" (best.pt: {best_value:.4f})" if isinstance(best_value, float) else ""),
                highlight=False,
            )
        for warning in result.warnings:
            err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)


@train_app.command("classifier")
@_reports_errors
def train_classifier(
    data: DataArg = Path("."),
    labels: LabelsOpt = None,
    out: OutOpt = Path("runs/classifier"),
    arch: Annotated[str, typer.Option(help="densenet121 (CheXNet), resnet50, resnet34 or efficientnet_b0.")] = (
        "densenet121"
    ),
    epochs: Epochs = 10,
    image_size: ImageSize = 256,
    batch_size: Annotated[int, typer.Option(help="Batch size (across all processes).")] = 16,
    lr: LearningRate = 3e-4,
    loss: Annotated[str, typer.Option(help="Loss terms and weights, e.g. bce:1 or bce:1,focal:1.")] = "bce:1",
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = 2,
    fold: Fold = 0,
    folds: Folds = 5,
    val_fraction: ValFraction = None,
    pretrained: Annotated[
        bool, typer.Option(help="Start from ImageNet weights, fetched into the cache if missing (exit 3 offline).")
    ] = True,
    augment: Augmentation = "strong",
    cache: CacheDir = None,
    precision: PrecisionOpt = "auto",
    patience: Patience = None,
    swa_epochs: SwaEpochs = 0,
    resume: Resume = None,
    progress: ShowProgress = True,
) -> None:
    """Train the stage-1 classifier; picks the best epoch by validation ROC AUC and its gate by Youden's J."""
    _run_training(
        "classifier",
        resume,
        progress,
        data=data,
        labels=labels,
        out=out,
        arch=arch,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        loss=loss,
        seed=seed,
        device=device,
        workers=workers,
        fold=fold,
        folds=folds,
        val_fraction=val_fraction,
        pretrained=pretrained,
        augment=augment,
        cache=cache,
        precision=precision,
        patience=patience,
        swa_epochs=swa_epochs,
    )


@train_app.command("segmenter")
@_reports_errors
def train_segmenter(
    data: DataArg = Path("."),
    labels: LabelsOpt = None,
    out: OutOpt = Path("runs/segmenter"),
    arch: Annotated[str, typer.Option(help="unet, unetpp or double_unet.")] = "unet",
    encoder: Annotated[
        str, typer.Option(help="resnet34 (Kaggle winners), vgg19_bn (case study), efficientnet_b0 or densenet121.")
    ] = "resnet34",
    empty_head: Annotated[bool, typer.Option(help="Add an image-level 'any pneumothorax' head.")] = False,
    epochs: Epochs = 10,
    image_size: ImageSize = 256,
    batch_size: Annotated[int, typer.Option(help="Batch size (across all processes).")] = 8,
    lr: LearningRate = 3e-4,
    loss: Annotated[str, typer.Option(help="Loss terms and weights.")] = "bce:3,dice:1,focal:4",
    positive_share: Annotated[
        str | None, typer.Option(help="Share of positive images per epoch, START:END (linear), or 'off'.")
    ] = "0.8:0.4",
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = 2,
    fold: Fold = 0,
    folds: Folds = 5,
    val_fraction: ValFraction = None,
    pretrained: Annotated[
        bool, typer.Option(help="Start the encoder from ImageNet weights, fetched if missing (exit 3 offline).")
    ] = True,
    augment: Augmentation = "strong",
    cache: CacheDir = None,
    precision: PrecisionOpt = "auto",
    patience: Patience = None,
    swa_epochs: SwaEpochs = 0,
    resume: Resume = None,
    progress: ShowProgress = True,
) -> None:
    """Train the stage-2 segmenter; picks the best epoch by the competition Dice on validation."""
    _run_training(
        "segmenter",
        resume,
        progress,
        data=data,
        labels=labels,
        out=out,
        arch=arch,
        encoder=encoder,
        empty_head=empty_head,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        loss=loss,
        positive_share=_share(positive_share),
        seed=seed,
        device=device,
        workers=workers,
        fold=fold,
        folds=folds,
        val_fraction=val_fraction,
        pretrained=pretrained,
        augment=augment,
        cache=cache,
        precision=precision,
        patience=patience,
        swa_epochs=swa_epochs,
    )


# --------------------------------------------------------------------------------------------------------------
# evaluate and tune


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give numbers separated by commas, e.g. 0.3,0.4") from None
    if not values:
        raise UsageError(f"{option}: give at least one value")
    return values


def _ci_text(value: float | None, ci: list[float | None] | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f"  [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def _print_metrics(doc: dict[str, Any], out_dir: Path) -> None:
    table = Table(title=f"evaluation: {out_dir / 'metrics.json'}", title_justify="left")
    table.add_column("figure")
    table.add_column("value  [95% CI]", overflow="fold")
    il, op, md = doc["image_level"], doc["image_level"]["operating_point"], doc["mask_decision"]
    # First what the scan decides (an outline drawn or not), as confusion.png shows it; then the image-level
    # score's own operating points, labelled as such.
    rows: list[tuple[str, str]] = [
        ("images (label positive)", f"{doc['n_images']} ({doc['n_positive']})"),
        ("competition Dice", _ci_text(doc["competition_dice"], doc["competition_dice_ci95"])),
        ("Dice on positives", _ci_text(doc["dice_positive_mean"], doc["dice_positive_mean_ci95"])),
        ("IoU", _ci_text(doc["iou_mean"], None)),
        ("scan decision (outlined): sensitivity", _ci_text(md["recall"], None)),
        ("scan decision: specificity", _ci_text(md["specificity"], None)),
        ("scan decision: precision, NPV", f"{_ci_text(md['precision'], None)}, {_ci_text(md['npv'], None)}"),
        ("scan decision: TP FP FN TN", f"{md['tp']} {md['fp']} {md['fn']} {md['tn']}"),
        (f"{il['score']}: ROC AUC", _ci_text(il["roc_auc"], il["roc_auc_ci95"])),
        (f"{il['score']}: PR AUC", _ci_text(il["pr_auc"], il["pr_auc_ci95"])),
        (f"{il['score']} >= {op['threshold']:.4g}: sensitivity", _ci_text(op["recall"], op["recall_ci95"])),
        (f"{il['score']} >= {op['threshold']:.4g}: specificity", _ci_text(op["specificity"], op["specificity_ci95"])),
        (f"{il['score']} >= {op['threshold']:.4g}: precision", _ci_text(op["precision"], op["precision_ci95"])),
        (f"{il['score']} >= {op['threshold']:.4g}: TP FP FN TN", f"{op['tp']} {op['fp']} {op['fn']} {op['tn']}"),
    ]
    for target, point in il["sensitivity_at_specificity"].items():
        rows.append((f"{il['score']}: sensitivity at specificity {target}", _ci_text(point["value"], point["ci95"])))
    for target, point in il["specificity_at_sensitivity"].items():
        rows.append((f"{il['score']}: specificity at sensitivity {target}", _ci_text(point["value"], point["ci95"])))
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


@app.command()
@_reports_errors
def evaluate(
    labels: Annotated[Path, typer.Option(help="SIIM-form RLE label CSV.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            metavar="[DATA]",
            help="Folder of labelled DICOMs: scanned with the models, or (with --predictions) read for sizes only.",
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, per_image.csv, plots.")] = Path(
        "evaluation"
    ),
    classifier: ClassifierOpt = None,
    segmenter: SegmenterOpt = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Score this Kaggle-format submission CSV instead of running models.")
    ] = None,
    rle: Annotated[str, typer.Option(help="--predictions run-length form: relative (SIIM) or absolute.")] = (
        "relative"
    ),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (0: none).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    segment_all: SegmentAll = False,
    tta: Tta = False,
    batch_size: ScanBatch = "auto",
    workers: ScanWorkers = "auto",
    device: Device = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in OUT/scan.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout instead of a table.")] = False,
    progress: ShowProgress = True,
) -> None:
    """Score models (scanning DATA) or a submission CSV against labels: the competition Dice, image-level
    ROC/PR, operating points with bootstrap intervals, plots, metrics.json and per_image.csv."""
    from pneumotriage.evaluate import evaluate_results, evaluate_submission, write_evaluation

    if rle not in ("relative", "absolute"):
        raise UsageError(f"--rle {rle!r}: choose relative or absolute")
    if bootstrap < 0:
        raise UsageError("--bootstrap must be 0 or more")
    failed = 0
    if predictions is not None:
        if classifier or segmenter:
            raise UsageError("give either --predictions or models (--classifier/--segmenter), not both")
        if data is not None and not data.exists():
            raise UsageError("no such file or folder", path=data)
        evaluation = evaluate_submission(
            predictions, labels, data=data, rle_relative=rle == "relative", bootstrap=bootstrap, seed=seed
        )
    else:
        if data is None:
            raise UsageError("give DATA (labelled DICOMs) to evaluate models, or --predictions to score a CSV")
        if classifier is None and segmenter is None:
            raise UsageError("give --classifier and/or --segmenter (registry names or files), or --predictions")
        loaded_cls, loaded_seg = _load(classifier, "classifier"), _load(segmenter, "segmenter")
        options = _scan_options(batch_size, workers, segment_all=segment_all, tta=tta, device=device, resume=resume)
        from pneumotriage.scan import run as run_scan

        models = {"classifier": loaded_cls, "segmenter": loaded_seg}
        summary = _with_progress(
            progress, lambda on: run_scan([data], out_dir / "scan", **models, options=options, progress=on)
        )
        source = {
            "mode": "models",
            "data": str(data),
            "scan": str(out_dir / "scan"),
            "models": summary.models,
            "thresholds": summary.thresholds,
            "score": "classifier probability" if loaded_cls is not None else "segmenter image score",
        }
        evaluation = evaluate_results(
            summary.results + summary.skipped,  # not-DICOM files: counted as not scored
            labels,
            threshold=summary.thresholds["gate"] if loaded_cls is not None else 0.5,
            source=source,
            bootstrap=bootstrap,
            seed=seed,
        )
        failed = evaluation.unreadable
        evaluation.notes += [n for n in summary.notes if "not for clinical use" in n]  # in metrics.json too
    write_evaluation(evaluation, out_dir)
    if as_json:
        print((out_dir / "metrics.json").read_text(), end="")
    else:
        _print_metrics(evaluation.metrics, out_dir)
    for note in evaluation.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)
    err.print(
        f"wrote {out_dir}: metrics.json, per_image.csv, {', '.join(evaluation.metrics['plots'])}", highlight=False
    )
    if failed:
        raise typer.Exit(EXIT_INPUTS_FAILED)


@app.command()
@_reports_errors
def tune(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Folder of labelled validation DICOMs.")],
    labels: Annotated[Path, typer.Option(help="SIIM-form RLE label CSV.")],
    segmenter: Annotated[
        list[str],
        typer.Option(help="Segmenter: registry name, checkpoint or ensemble file; repeat for an ensemble."),
    ],
    classifier: Annotated[
        list[str] | None,
        typer.Option(help="Classifier whose gate is tuned with the segmenter; repeat for an ensemble."),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The tuned file to write (new): a checkpoint (default tuned.pt), or for an ensemble an ensemble "
            "file (default tuned.json).",
        ),
    ] = None,
    oof: Annotated[
        bool,
        typer.Option(
            help="Out-of-fold: DATA is the fold runs' training data, and each image is predicted only by the run "
            "that held it out (give every fold's best.pt)."
        ),
    ] = False,
    sensitivity: Annotated[
        float | None, typer.Option(help="Fix the gate for this classifier sensitivity (e.g. 0.95), tune the rest.")
    ] = None,
    top_scores: Annotated[str | None, typer.Option(help="Grid of top_score values, e.g. 0.6,0.75,0.9.")] = None,
    min_areas: Annotated[str | None, typer.Option(help="Grid of min_area values (px at 1024²).")] = None,
    bottom_scores: Annotated[str | None, typer.Option(help="Grid of bottom_score values.")] = None,
    min_components: Annotated[str | None, typer.Option(help="Grid of min_component values (px at 1024²).")] = None,
    gates: Annotated[str | None, typer.Option(help="Grid of classifier gates.")] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Folder for cached predictions (default: PNEUMOTRIAGE_HOME/predictions).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write cached predictions.")] = False,
    tta: Tta = False,
    batch_size: ScanBatch = "auto",
    workers: ScanWorkers = "auto",
    device: Device = "auto",
    progress: ShowProgress = True,
    force: Annotated[
        bool, typer.Option(help="Write the checkpoint even where its best setting outlines no positive image.")
    ] = False,
) -> None:
    """Choose the gate, the triplet (top_score, min_area, bottom_score) and the smallest component kept to
    maximise the competition score on labelled images, and write them into a copy of the segmenter checkpoint.
    A setting that outlines none of the positive images is refused unless --force."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pneumotriage.tune import Grid
    from pneumotriage.tune import tune as run_tune
    from pneumotriage.weights import default_home

    if not data.exists():
        raise UsageError("no such file or folder", path=data)
    grid = Grid()
    for option, name, text in (
        ("--top-scores", "top_score", top_scores),
        ("--min-areas", "min_area", min_areas),
        ("--bottom-scores", "bottom_score", bottom_scores),
        ("--min-components", "min_component", min_components),
        ("--gates", "gate", gates),
    ):
        values = _floats(text, option)
        if values is not None:
            grid = Grid(**{**grid.__dict__, name: values})
    loaded_seg, loaded_cls = _load(segmenter, "segmenter"), _load(classifier, "classifier")
    out_file = out_file or Path("tuned.json" if loaded_seg.members else "tuned.pt")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not progress, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def on_event(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "cached":
                err.print(f"predictions read from the cache {event['path']}", highlight=False)
            elif kind in ("predicted", "counted"):
                if kind not in tasks:
                    tasks[kind] = bar.add_task(kind, total=event["total"])
                bar.update(tasks[kind], completed=event["done"])

        result = run_tune(
            data,
            labels,
            segmenter=loaded_seg,
            classifier=loaded_cls,
            out=out_file,
            grid=grid,
            sensitivity=sensitivity,
            cache_root=None if no_cache else (cache or default_home() / "predictions"),
            tta=tta,
            device=device,
            batch_size=_auto_int(batch_size, "--batch-size"),
            workers=_auto_int(workers, "--workers"),
            progress=on_event,
            force=force,
            oof=oof,
        )
    table = Table(title="best settings (competition Dice on these images)", title_justify="left")
    names = ("gate", "top_score", "min_area", "bottom_score", "min_component")
    for col in (*names, "competition Dice", ""):
        table.add_column(col, justify="right")
    chosen_row = {k: result.thresholds[k] for k in names}
    rows = list(result.top)
    if not any(all(row[k] == chosen_row[k] for k in names) for row in rows):
        rows.append({**chosen_row, "competition_dice": result.score})  # kept at the input's values: shown too
    for row in rows:
        table.add_row(
            *(f"{row[k]:g}" for k in names),
            f"{row['competition_dice']:.4f}",
            "chosen" if all(row[k] == chosen_row[k] for k in names) else "",
        )
    out.print(table)
    f = result.figures
    chosen = ", ".join(f"{k} {result.thresholds[k]:g}" for k in result.thresholds)
    err.print(
        f"chosen: {chosen}\ncompetition Dice {result.score:.4f} (the input's thresholds: {result.default_score:.4f}); "
        f"Dice on positives {_ci_text(f['dice_positive_mean'], None)}, "
        f"sensitivity {f['sensitivity']:.3f}, specificity {f['specificity']:.3f} on {f['n_images']} images\n"
        f"wrote {result.out}",
        highlight=False,
    )
    for note in result.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)


# --------------------------------------------------------------------------------------------------------------
# demo


@app.command()
@_reports_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the demo study and scan.")] = Path("demo-out"),
    n: Annotated[int, typer.Option("--n", help="Number of synthetic images.")] = 20,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 256,
    workers: ScanWorkers = "auto",
) -> None:
    """Make a synthetic study, build the synthetic demo weights if needed, scan, and show the worklist.

    The first run trains the two demo models on synthetic phantoms (a few minutes on a 2-core CPU) and caches
    them; later runs take seconds."""
    import shutil

    from rich.progress import Progress

    from pneumotriage.models import load_model
    from pneumotriage.scan import run as run_scan
    from pneumotriage.synth import write_study
    from pneumotriage.weights import WeightCache, load_registry

    study = out_dir / "study"
    if study.exists():
        shutil.rmtree(study)
    summary = write_study(study, n, positive_rate=0.4, size=(size, size), seed=7, ptx_scale=2.0)
    err.print(f"synthetic study: {n} images ({summary.n_positive} with pneumothorax) in {study}", highlight=False)
    cache = WeightCache(load_registry())
    missing = [
        spec
        for spec in (cache.registry.get_spec(name) for name in ("demo-classifier", "demo-segmenter"))
        if cache.status(spec).status == "missing"
    ]
    if missing:
        from pneumotriage.demo import build_all

        names = " and ".join(spec.name for spec in missing)
        err.print(f"building {names} (trained on synthetic phantoms, once; cached in {cache.dir})", highlight=False)
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task(f"training {missing[-1].name}", total=None)

            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "epoch_start":
                    bar.update(task, total=event["epochs"], completed=event["epoch"])

            build_all(missing, cache, progress=on_event)
    scan_dir = out_dir / "scan"
    if scan_dir.exists():
        shutil.rmtree(scan_dir)
    result = run_scan(
        sorted(p for p in study.iterdir() if p.is_dir()),  # the DICOMs, not the label CSV and manifest beside them
        scan_dir,
        classifier=load_model("demo-classifier"),
        segmenter=load_model("demo-segmenter"),
        options=_scan_options("auto", workers),
    )
    _print_worklist(result)
    truth = {im.image_id: im.positive for im in summary.images}
    found = sum(1 for r in result.results if r.tier == "urgent" and truth.get(r.image_id))
    c = result.counts
    err.print(
        f"{c['images']} images: {c['urgent']} urgent ({found} of the {summary.n_positive} true pneumothoraces), "
        f"{c['review']} review, {c['routine']} routine.\n"
        f"[bold yellow]Synthetic demo weights and images: not for clinical use.[/]\n"
        f"report: {result.out / 'report.html'}",
        highlight=False,
    )


#: The command-line parser's own error type (click's, which typer may vendor): a bad or missing option.
_ParserError: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The console script: every error, the parser's included, is one line starting "error:"."""
    try:
        code = app(standalone_mode=False)
    except _ParserError as exc:
        ctx = getattr(exc, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = escape(printable(exc.format_message().rstrip(".")))
        err.print(f"[bold red]error:[/] {message}{see}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""Commands about input data: inspect (DICOM headers), synth (a synthetic study) and demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumotriage.cli.console import (
    counted,
    err,
    plain_table,
    print_table,
    print_worklist,
    reports_errors,
    short,
    shown,
)
from pneumotriage.cli.options import (
    PrecisionOpt,
    ScanWorkers,
    scan_options,
)
from pneumotriage.dicom import describe, discover
from pneumotriage.errors import ExitCode, UsageError
from pneumotriage.io import printable, strict_json


@reports_errors
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
    rows = [describe(found, decode=decode) for found in discover(paths)]
    if as_json:
        typer.echo(strict_json(rows, indent=1))
    else:
        table = plain_table(counted(len(rows), "file"))
        for col in ("image id", "mod.", "size", "photometric", "bits", "syntax", "spacing", "status"):
            table.add_column(col, no_wrap=col not in ("syntax", "status"), overflow="fold")
        for row in rows:
            if "image_id" not in row:
                name = shown(short(printable(Path(row["path"]).name)))
                table.add_row(name, "", "", "", "", "", "", f"[red]skip:[/] {shown(row['reason'])}")
                continue
            size = f"{row['rows']}x{row['columns']}" if row["rows"] else "?"
            spacing = "x".join(f"{v:.3g}" for v in row["pixel_spacing_mm"]) if row["pixel_spacing_mm"] else "-"
            status = "[green]ok[/]" if row["status"] == "ok" else f"[red]skip:[/] {shown(row['reason'])}"
            if row["status"] == "ok" and row["warnings"]:
                status += f" [yellow]({shown('; '.join(row['warnings']))})[/]"
            table.add_row(
                shown(short(printable(row["image_id"]))),
                shown(row["modality"] or "?"),
                size,
                shown((row["photometric"] or "?").replace("MONOCHROME", "MONO")),
                str(row["bits_stored"] or "?"),
                (row["transfer_syntax_name"] or "?").split(" (")[0],  # "JPEG Baseline (Process 1)": its name
                spacing,
                status,
            )
        print_table(table)
    skipped = sum(r["status"] != "ok" for r in rows)
    err.print(f"{len(rows) - skipped} usable, {skipped} skipped", highlight=False)
    if skipped:
        raise typer.Exit(ExitCode.INPUTS_FAILED)


@reports_errors
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


@reports_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the demo study and scan.")] = Path("demo-out"),
    n: Annotated[int, typer.Option("--n", help="Number of synthetic images.")] = 20,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic study (each seed draws other patients).")] = 7,
    workers: ScanWorkers = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Make a synthetic study, scan it with the synthetic demo weights, and show the worklist.

    The demo weights ship with the package and are copied into the weights cache at the first run
    (`pneumotriage weights fetch demo-classifier demo-segmenter --rebuild` trains them here instead)."""
    from pneumotriage.demo import run_demo

    done = run_demo(out_dir, n=n, size=size, seed=seed, options=scan_options("auto", workers, precision=precision))
    summary, result = done.study, done.scan
    err.print(
        f"synthetic study: {n} images ({summary.n_positive} with pneumothorax) in {out_dir / 'study'}", highlight=False
    )
    for name in done.fetched:
        err.print(f"{name}: copied from the package into the weights cache", highlight=False)
    print_worklist(result)
    found = done.found
    c = result.counts
    err.print(
        f"{c['images']} images: {c['urgent']} urgent ({found} of the {summary.n_positive} true pneumothoraces), "
        f"{c['review']} review, {c['routine']} routine.\n"
        f"[bold yellow]Synthetic demo weights and images: not for clinical use.[/]\n"
        f"report: {result.out / 'report.html'}",
        highlight=False,
    )

"""``pneumotriage export`` and ``pneumotriage quantize``: models as ONNX graphs for CPU servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pneumotriage.cli.console import err, reports_errors
from pneumotriage.cli.options import relative_rle
from pneumotriage.errors import UsageError

ModelArg = Annotated[
    str, typer.Argument(metavar="MODEL", help="A registry name, a checkpoint, an ensemble file or an exported graph.")
]


@reports_errors
def export(
    model: ModelArg,
    onnx: Annotated[Path, typer.Option("--onnx", help="The ONNX file to write (an ensemble: one per member).")],
    check: Annotated[
        Path | None,
        typer.Option(help="DICOMs to check the graph against torch on (default: a few synthetic phantoms)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Check on at most this many of them.")] = 16,
    force: Annotated[bool, typer.Option(help="Write the graph even where it differs from torch.")] = False,
) -> None:
    """Write MODEL as an ONNX graph (batch dynamic) that describes itself: its input pipeline, size, thresholds and
    provenance in the file's metadata. Each installed runtime (ONNX Runtime, OpenVINO) is checked against torch on
    DICOMs read as the scan reads them; a graph off by more than 1e-4 in probability is not written."""
    from pneumotriage.deploy import export_model
    from pneumotriage.models import load_model
    from pneumotriage.models.exported import runtime_version

    if onnx.suffix.lower() != ".onnx":
        raise UsageError(f"--onnx {onnx}: name the file .onnx (scan, evaluate and tune know it by that)")
    if limit < 1:
        raise UsageError(f"--limit {limit}: give 1 or more")
    loaded = load_model(model)
    done = export_model(loaded, onnx, check=check, limit=limit, force=force)
    gaps = ", ".join(f"{runtime_version(r)} {g:.1e}" for r, g in done.parity.items())
    err.print(f"parity with torch on {done.images} images (largest |Δ probability|): {gaps}", highlight=False)
    for path in done.files:
        err.print(f"wrote {escape(str(path))}", highlight=False)
    if done.ensemble is not None:
        err.print(f"wrote {escape(str(done.ensemble))}: the ensemble of those graphs", highlight=False)


@reports_errors
def quantize(
    model: ModelArg,
    calibrate: Annotated[Path, typer.Option(help="Labelled DICOMs: calibration images and held-out images.")],
    labels: Annotated[Path, typer.Option(help="Their run-length label CSV (SIIM form).")],
    out: Annotated[Path, typer.Option("--out", help="The int8 ONNX file to write.")],
    held_out: Annotated[float, typer.Option(help="Share of the images held out to score the int8 model.")] = 0.5,
    max_auc_drop: Annotated[float, typer.Option(help="Refuse a model losing more AUC than this.")] = 0.005,
    max_dice_drop: Annotated[float, typer.Option(help="Refuse a segmenter losing more Dice than this.")] = 0.01,
    rle: Annotated[str, typer.Option(help="relative (SIIM) or absolute run-length form.")] = "relative",
    force: Annotated[bool, typer.Option(help="Write the int8 model even where it loses accuracy.")] = False,
) -> None:
    """Quantize MODEL to int8 (static, ONNX Runtime's QDQ form) with calibration images from a labelled folder,
    score it against the float32 model on held-out images (AUC; Dice on positives for a segmenter) with each
    installed runtime, and write it only where it keeps its accuracy. The file records those figures; a scan
    with it shows them."""
    from pneumotriage.deploy import quantize_model
    from pneumotriage.models import load_model

    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: name the file .onnx (scan, evaluate and tune know it by that)")
    for value, name in ((max_auc_drop, "--max-auc-drop"), (max_dice_drop, "--max-dice-drop")):
        if not 0 <= value <= 1:
            raise UsageError(f"{name} {value:g}: give 0 to 1")
    loaded = load_model(model)
    done = quantize_model(
        loaded,
        calibrate,
        labels,
        out,
        held_out=held_out,
        max_auc_drop=max_auc_drop,
        max_dice_drop=max_dice_drop,
        force=force,
        relative=relative_rle(rle),
        progress=lambda text: err.print(escape(text), highlight=False),
    )
    err.print(f"calibrated on {done.calibration} images; {done.summary()}", highlight=False)
    for reason in done.refused:
        err.print(f"[bold yellow]forced past:[/] {escape(reason)}", highlight=False)
    err.print(f"wrote {escape(str(out))}", highlight=False)

"""The options several commands share (their types and help), and the parsing of option values into what the
library takes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pneumotriage.errors import UsageError

if TYPE_CHECKING:
    from pneumotriage.scan import ScanOptions


def default_list(values: list[str] | None, kind: str) -> list[str] | None:
    """``values``, else the registry's default model of ``kind``, if it names one."""
    from pneumotriage.weights import load_registry

    if values:
        return values
    default = load_registry().default_for(kind)
    return [default] if default else None


DataArg = Annotated[Path, typer.Argument(metavar="DATA", help="Folder of training DICOMs (searched recursively).")]

LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="SIIM-form RLE label CSV.")]

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
        help="Processes decoding and finishing images: a number (0: none), or auto.",
    ),
]

PrecisionOpt = Annotated[
    str,
    typer.Option(
        envvar="PNEUMOTRIAGE_PRECISION",
        help="auto (bf16 on CUDA), bf16 or fp32.",
    ),
]

BackendOpt = Annotated[
    str,
    typer.Option(
        envvar="PNEUMOTRIAGE_BACKEND",
        help="What runs the models on a CPU: auto (the fastest installed, measured once per model and machine), "
        "torch, onnxruntime or openvino.",
    ),
]

AcceptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--accept",
        metavar="RULE",
        help="Triage images the input check refuses by RULE (repeat, or all); README lists the rules.",
    ),
]

CacheDir = Annotated[Path | None, typer.Option(help="Folder for resized arrays, so later epochs skip decoding.")]

OutOpt = Annotated[Path, typer.Option("--out", help="Run folder: best.pt, last.pt, metrics.jsonl, config.json.")]


def scan_options(batch_size: str, workers: str, **options: Any) -> ScanOptions:
    """:class:`pneumotriage.scan.ScanOptions` from the options scan, submit, evaluate and demo share."""
    from pneumotriage.scan import ScanOptions

    # checked as it is made: before any model is loaded or file written
    return ScanOptions.of(
        batch_size=auto_int(batch_size, "--batch-size"), workers=auto_int(workers, "--workers"), **options
    )


def auto_int(value: str, option: str) -> int | None:
    """An option that takes a whole number or ``auto`` (None)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: give a whole number or auto") from None


def share(text: str | None) -> tuple[float, float] | None:
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


def floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give numbers separated by commas, e.g. 0.3,0.4") from None
    if not values:
        raise UsageError(f"{option}: give at least one value")
    return values


def relative_rle(value: str) -> bool:
    """``--rle``: whether the run-length form is SIIM's relative one (else absolute)."""
    if value not in ("relative", "absolute"):
        raise UsageError(f"--rle {value!r}: choose relative or absolute")
    return value == "relative"

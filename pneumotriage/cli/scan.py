"""Commands that scan: scan (the worklist), merge (shards of a distributed scan) and submit (a Kaggle CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from pneumotriage.cli.console import (
    err,
    report_scan,
    reports_errors,
    shown,
)
from pneumotriage.cli.options import (
    AcceptOpt,
    BackendOpt,
    ClassifierOpt,
    Device,
    PrecisionOpt,
    ScanBatch,
    ScanWorkers,
    SegmentAll,
    SegmenterOpt,
    Tta,
    default_list,
    relative_rle,
    scan_options,
)
from pneumotriage.cli.progress import with_progress
from pneumotriage.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from pneumotriage.listen.sender import Destination, StowDestination


@reports_errors
def scan(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("scan-out"),
    classifier: ClassifierOpt = None,
    segmenter: SegmenterOpt = None,
    gate: Annotated[
        float | None,
        typer.Option(help="Classifier probability that sends an image to the segmenter (default: the checkpoint's)."),
    ] = None,
    review: Annotated[
        float | None,
        typer.Option(
            help="Probability from which an image with nothing outlined goes to review (default: the checkpoint's, "
            "else the gate)."
        ),
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
    backend: BackendOpt = "auto",
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Compile the models first (torch.compile): pays on a GPU for large folders.",
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
    send_to: Annotated[
        str | None,
        typer.Option(metavar="AE@HOST:PORT", help="Send the SR and SEG objects there by C-STORE after the scan."),
    ] = None,
    stow: Annotated[
        str | None, typer.Option(metavar="URL", help="Store the SR and SEG objects on this DICOMweb server.")
    ] = None,
    no_phi: Annotated[
        bool, typer.Option("--no-phi", help="Leave patient ID, accession and study date out of all outputs.")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in --out.")] = False,
    overlays: Annotated[bool, typer.Option(help="Write overlays/<image>.jpg for each outlined image.")] = True,
    report_thumbnails: Annotated[
        int, typer.Option(metavar="N", help="Pictures in report.html for the first N rows of the worklist.")
    ] = 100,
    accept: AcceptOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the worklist as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say what auto chose, and the timings.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="K/N",
            help="Scan only shard K of N (K from 0); `pneumotriage merge` then writes the worklist.",
        ),
    ] = None,
) -> None:
    """Triage DICOMs: classify all, segment the likely positives, write a ranked worklist, masks, a report.

    Under `torchrun --nproc-per-node G -m pneumotriage scan ...` each process scans its share of the files (on
    its own GPU) and the first merges them into one worklist."""
    from pneumotriage.distributed import launched
    from pneumotriage.models import load_models
    from pneumotriage.scan import Shard, journaled, torchrun
    from pneumotriage.scan import run as run_scan

    classifier = default_list(classifier, "classifier")
    segmenter = None if no_segment else default_list(segmenter, "segmenter")
    if classifier is None and segmenter is None:
        raise UsageError(
            "no models given and the registry names no default for real images: pass --classifier and "
            "--segmenter (a registry name or a checkpoint file), e.g. --classifier xrv-resnet50-res512-all "
            "--no-segment; `pneumotriage weights list` shows what there is"
        )
    destination = _destination(send_to, stow)
    if destination is not None:  # what is sent is made
        dicom_seg = dicom_sr = True
    options = scan_options(
        batch_size,
        workers,
        gate=gate,
        review=review,
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
        backend=backend,
        compile=compile_models,
        submission=submission,
        dicom_seg=dicom_seg,
        dicom_sr=dicom_sr,
        rle_relative=relative_rle(rle),
        no_phi=no_phi,
        resume=resume,
        overlays=overlays,
        report_thumbnails=report_thumbnails,
        accept=tuple(accept or ()),
    )
    one_shard = Shard.parse(shard) if shard is not None else None
    if one_shard is not None and launched():
        raise UsageError("--shard under torchrun: each rank takes its own shard; leave --shard out")
    # Built when first used: a scan run by a graph exported before never builds (nor imports torchvision for)
    # the torch networks.
    loaded_cls = load_models(classifier, "classifier", deferred=True)
    loaded_seg = load_models(segmenter, "segmenter", deferred=True)
    if launched():
        merged = torchrun.scan_launched(
            paths,
            out_dir,
            classifier=loaded_cls,
            segmenter=loaded_seg,
            options=options,
            shown=lambda rank0, job: with_progress(progress and rank0, job),
        )
        if merged is None:
            return  # not rank 0: quiet; rank 0 reports the whole job
        report_scan(merged, as_json=as_json, no_phi=no_phi, verbose=verbose)
        if merged.failed:
            raise typer.Exit(ExitCode.INPUTS_FAILED)
        return
    try:
        summary = with_progress(
            progress,
            lambda on_event: run_scan(
                paths,
                out_dir,
                classifier=loaded_cls,
                segmenter=loaded_seg,
                options=options,
                progress=on_event,
                shard=one_shard,
            ),
        )
    except KeyboardInterrupt:
        done = journaled(out_dir, one_shard)
        err.print(
            f"[yellow]interrupted[/]: {done} image{'s' if done != 1 else ''} done and kept in {shown(out_dir)}; "
            "run the same command with --resume to go on from there",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if one_shard is not None:
        c = summary.counts
        err.print(
            f"shard {one_shard.label}: {c['images']} images ({c['urgent']} urgent, {c['errors']} unreadable) in "
            f"{summary.timings['total_s']:.1f} s; when every shard is done: pneumotriage merge {out_dir}",
            highlight=False,
        )
        if summary.failed:
            raise typer.Exit(ExitCode.INPUTS_FAILED)
        return
    report_scan(summary, as_json=as_json, no_phi=no_phi, verbose=verbose)
    if destination is not None:
        _send(destination, out_dir)
    if summary.failed:
        raise typer.Exit(ExitCode.INPUTS_FAILED)


def _destination(send_to: str | None, stow: str | None) -> Destination | StowDestination | None:
    """Where ``--send-to`` or ``--stow`` sends the DICOM objects (None for neither)."""
    if send_to is None and stow is None:
        return None
    if send_to and stow:
        raise UsageError("give --send-to or --stow, not both")
    from pneumotriage.listen.node import require
    from pneumotriage.listen.sender import Destination, StowDestination

    require()
    return Destination.parse(send_to) if send_to else StowDestination.parse(stow or "")


def _send(destination: Any, out_dir: Path) -> None:
    """Send the scan's SR and SEG objects; a failure is one error line that says how to send them again."""
    from pneumotriage.listen.sender import SendError

    files = sorted((out_dir / "dicom").glob("*.dcm"))
    try:
        stored = destination.send(files)
    except SendError as exc:
        raise SendError(
            exc.message,
            hint=f"the objects are kept in {out_dir / 'dicom'}; run the same command with --resume to send them again",
        ) from None
    err.print(f"sent {len(stored)} DICOM objects to {shown(destination)}", highlight=False)


@reports_errors
def merge(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="The --out of a scan run in shards.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the merged worklist as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say what auto chose, and the timings.")] = False,
) -> None:
    """Merge the finished shards of a sharded scan (`scan --shard K/N`) into one ranked worklist, submission and
    report. Exits 4, naming them, while any shard is missing (the outputs then hold the finished ones)."""
    from pneumotriage.scan import ShardsMissing, merge_shards

    merged = merge_shards(out_dir)
    report_scan(merged.summary, as_json=as_json, no_phi=merged.options.write.no_phi, verbose=verbose)
    if merged.missing:
        raise ShardsMissing(
            f"shard{'s' if len(merged.missing) > 1 else ''} {', '.join(merged.missing)} missing",
            path=out_dir,
            hint=f"run {'them' if len(merged.missing) > 1 else 'it'} (with --resume where started), then merge again",
        )
    if merged.summary.failed:
        raise typer.Exit(ExitCode.INPUTS_FAILED)


@reports_errors
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
    backend: BackendOpt = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in the work folder.")] = False,
    accept: AcceptOpt = None,
) -> None:
    """Write a Kaggle submission with exactly the sample's ImageIds (order kept, duplicates collapsed), each
    mask at its image's original resolution. ImageIds with no readable image get -1 and exit code 4."""
    from pneumotriage.models import load_models
    from pneumotriage.submit import write_submission

    relative = relative_rle(rle)
    if segmenter is None:
        raise UsageError("a submission needs masks: pass --segmenter (and usually --classifier)")
    loaded_seg = load_models(segmenter, "segmenter", deferred=True)  # built when first used, as scan's
    assert loaded_seg is not None  # names were given
    done = write_submission(
        test_dir,
        sample_submission,
        out_file,
        classifier=load_models(classifier, "classifier", deferred=True),
        segmenter=loaded_seg,
        options=scan_options(
            batch_size,
            workers,
            segment_all=segment_all,
            tta=tta,
            device=device,
            backend=backend,
            resume=resume,
            accept=tuple(accept or ()),
        ),
        work=work,
        relative=relative,
    )
    for note in done.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)
    missing = done.missing
    err.print(
        f"wrote {out_file}: {done.rows} images, {done.with_mask} with a mask"
        + (f"; {len(missing)} ImageIds had no readable image and got -1 (first: {missing[0]})" if missing else ""),
        highlight=False,
    )
    if missing:
        raise typer.Exit(ExitCode.INPUTS_FAILED)

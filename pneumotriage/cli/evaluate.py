"""Commands that measure: evaluate (figures against labels) and tune (operating points on validation data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pneumotriage.cli.console import (
    ci_text,
    err,
    plain_table,
    print_table,
    reports_errors,
    shown,
)
from pneumotriage.cli.options import (
    BackendOpt,
    ClassifierOpt,
    Device,
    ScanBatch,
    ScanWorkers,
    SegmentAll,
    SegmenterOpt,
    ShowProgress,
    Tta,
    auto_int,
    floats,
    relative_rle,
    scan_options,
)
from pneumotriage.cli.progress import bars, with_progress
from pneumotriage.errors import ExitCode, UsageError


def _share(figure: dict[str, Any]) -> str:
    """A proportion as a diagnostic-accuracy study gives it: 0.912 [0.850, 0.950] 31/34."""
    if figure["value"] is None:
        return f"- 0/{figure['n']}"
    low, high = figure["ci95"]
    return f"{figure['value']:.3f} [{low:.3f}, {high:.3f}] {figure['k']}/{figure['n']}"


def clinical_rows(clinical: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows of the figures at the scan's own decision (``metrics.json``'s ``clinical``)."""
    decision = clinical["decision"]
    rows = [
        (f"sensitivity ({decision})", _share(clinical["flagged"]["sensitivity"])),
        (f"specificity ({decision})", _share(clinical["flagged"]["specificity"])),
    ]
    if "urgent" in clinical:
        rows += [
            ("sensitivity (urgent)", _share(clinical["urgent"]["sensitivity"])),
            ("specificity (urgent)", _share(clinical["urgent"]["specificity"])),
        ]
    for name, group in clinical["by_size"].items():
        rows.append((f"sensitivity, {name.replace('(', '').replace(')', '')}", _share(group["sensitivity"])))
    for view, group in clinical["by_view"].items():
        rows.append((f"sensitivity, view {view}", _share(group["sensitivity"])))
        rows.append((f"specificity, view {view}", _share(group["specificity"])))
    ece = clinical["calibration"]["ece"]
    rows.append(
        (f"calibration error (ECE, {clinical['calibration']['bins']} bins)", "-" if ece is None else f"{ece:.3f}")
    )
    return rows


def _print_metrics(doc: dict[str, Any], out_dir: Path) -> None:
    table = plain_table(f"evaluation: {shown(out_dir / 'metrics.json')}")
    table.add_column("figure", overflow="fold")
    table.add_column("value \\[95% CI]", overflow="fold")
    from pneumotriage.postprocess import shown as number

    il, op, md = doc["image_level"], doc["image_level"]["operating_point"], doc["mask_decision"]
    at = number(op["threshold"])
    # First what the scan decides (an outline drawn or not), as confusion.png shows it; then the image-level
    # score's own operating points, labelled as such.
    rows: list[tuple[str, str]] = [
        ("images (label positive)", f"{doc['n_images']} ({doc['n_positive']})"),
        *clinical_rows(doc["clinical"]),
        ("competition Dice", ci_text(doc["competition_dice"], doc["competition_dice_ci95"])),
        ("Dice on positives", ci_text(doc["dice_positive_mean"], doc["dice_positive_mean_ci95"])),
        ("IoU", ci_text(doc["iou_mean"], None)),
        ("scan decision (outlined): sensitivity", ci_text(md["recall"], None)),
        ("scan decision: specificity", ci_text(md["specificity"], None)),
        ("scan decision: precision, NPV", f"{ci_text(md['precision'], None)}, {ci_text(md['npv'], None)}"),
        ("scan decision: TP FP FN TN", f"{md['tp']} {md['fp']} {md['fn']} {md['tn']}"),
        (f"{il['score']}: ROC AUC", ci_text(il["roc_auc"], il["roc_auc_ci95"])),
        (f"{il['score']}: PR AUC", ci_text(il["pr_auc"], il["pr_auc_ci95"])),
        (f"{il['score']} >= {at}: sensitivity", ci_text(op["recall"], op["recall_ci95"])),
        (f"{il['score']} >= {at}: specificity", ci_text(op["specificity"], op["specificity_ci95"])),
        (f"{il['score']} >= {at}: precision", ci_text(op["precision"], op["precision_ci95"])),
        (f"{il['score']} >= {at}: TP FP FN TN", f"{op['tp']} {op['fp']} {op['fn']} {op['tn']}"),
    ]
    for target, point in il["sensitivity_at_specificity"].items():
        rows.append((f"{il['score']}: sensitivity at specificity {target}", ci_text(point["value"], point["ci95"])))
    for target, point in il["specificity_at_sensitivity"].items():
        rows.append((f"{il['score']}: specificity at sensitivity {target}", ci_text(point["value"], point["ci95"])))
    for name, value in rows:
        table.add_row(name, value)
    print_table(table)


@reports_errors
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
    large_cm2: Annotated[
        float,
        typer.Option(help="Labelled area (cm²) from which a pneumothorax counts as large in the figures by size."),
    ] = 20.0,
    segment_all: SegmentAll = False,
    tta: Tta = False,
    batch_size: ScanBatch = "auto",
    workers: ScanWorkers = "auto",
    device: Device = "auto",
    backend: BackendOpt = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan in OUT/scan.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout instead of a table.")] = False,
    progress: ShowProgress = True,
) -> None:
    """Score models (scanning DATA) or a submission CSV against labels: sensitivity and specificity at the
    scan's own decision (exact 95% intervals), by size and by view; the competition Dice; image-level ROC/PR and
    operating points with bootstrap intervals; calibration (ECE); plots, metrics.json and per_image.csv."""
    from pneumotriage.evaluate import evaluate_models, evaluate_submission, write_evaluation
    from pneumotriage.models import load_models

    relative = relative_rle(rle)
    if bootstrap < 0:
        raise UsageError("--bootstrap must be 0 or more")
    if not large_cm2 > 0:
        raise UsageError(f"--large-cm2 must be above 0, got {large_cm2:g}")
    failed = 0
    if predictions is not None:
        if classifier or segmenter:
            raise UsageError("give either --predictions or models (--classifier/--segmenter), not both")
        if data is not None and not data.exists():
            raise UsageError("no such file or folder", path=data)
        evaluation = evaluate_submission(
            predictions, labels, data=data, rle_relative=relative, bootstrap=bootstrap, seed=seed, large_cm2=large_cm2
        )
    else:
        if data is None:
            raise UsageError("give DATA (labelled DICOMs) to evaluate models, or --predictions to score a CSV")
        if classifier is None and segmenter is None:
            raise UsageError("give --classifier and/or --segmenter (registry names or files), or --predictions")
        loaded_cls, loaded_seg = load_models(classifier, "classifier"), load_models(segmenter, "segmenter")
        options = scan_options(
            batch_size, workers, segment_all=segment_all, tta=tta, device=device, backend=backend, resume=resume
        )
        evaluation = with_progress(
            progress,
            lambda on: evaluate_models(
                data,
                labels,
                out_dir,
                classifier=loaded_cls,
                segmenter=loaded_seg,
                options=options,
                bootstrap=bootstrap,
                seed=seed,
                large_cm2=large_cm2,
                progress=on,
            ),
        )
        failed = evaluation.unreadable
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
        raise typer.Exit(ExitCode.INPUTS_FAILED)


def review_table(review: dict[str, Any]) -> Table:
    """The review threshold at several target specificities and the chosen one: the triage each gives on the
    tuning images (an outlined image urgent; nothing outlined: review from the threshold up, else routine)."""
    from pneumotriage.postprocess import shown

    target = review["target"]
    title = (
        f"review threshold (specificity target {target['specificity']:g})"
        if "specificity" in target
        else f"review threshold (review share at most {target['share']:g})"
    )
    table = plain_table(title)
    for col in ("target spec.", "review", "sensitivity", "specificity", "review share", "chosen"):
        table.add_column(col, justify="right", no_wrap=True)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    chosen = review["figures"]
    rows = [(f"{r['specificity_target']:g}", r) for r in review["table"]]
    if not any(r["review"] == chosen["review"] for _, r in rows):
        rows.append(("", chosen))
    rows.sort(key=lambda row: row[1]["review"])
    for label, r in rows:
        table.add_row(
            label,
            shown(r["review"]),
            pct(r["sensitivity"]),
            pct(r["specificity"]),
            f"{r['review_share']:.3f}",
            "yes" if r["review"] == chosen["review"] else "",
        )
    return table


@reports_errors
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
        typer.Option(help="Out-of-fold: each image of DATA predicted only by the fold run that held it out."),
    ] = False,
    sensitivity: Annotated[
        float | None, typer.Option(help="Fix the gate for this classifier sensitivity (e.g. 0.95), tune the rest.")
    ] = None,
    review_specificity: Annotated[
        float | None,
        typer.Option(
            help="Choose the review threshold so that this share of the negatives stays routine (default 0.9)."
        ),
    ] = None,
    review_share: Annotated[
        float | None,
        typer.Option(help="Choose the review threshold so that at most this share of the images goes to review."),
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
    backend: BackendOpt = "auto",
    progress: ShowProgress = True,
    force: Annotated[
        bool, typer.Option(help="Write the checkpoint even where its best setting outlines no positive image.")
    ] = False,
) -> None:
    """Choose the gate, the triplet (top_score, min_area, bottom_score) and the smallest component kept to
    maximise the competition score on labelled images, and write them into a copy of the segmenter checkpoint.
    A setting that outlines none of the positive images is refused unless --force."""
    from pneumotriage.models import load_models
    from pneumotriage.postprocess import Thresholds
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
        values = floats(text, option)
        if values is not None:
            grid = Grid(**{**grid.__dict__, name: values})
    loaded_seg, loaded_cls = load_models(segmenter, "segmenter"), load_models(classifier, "classifier")
    assert loaded_seg is not None  # --segmenter is required
    out_file = out_file or Path("tuned.json" if loaded_seg.members else "tuned.pt")
    with bars(show=progress, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def on_event(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "cached":
                err.print(f"predictions read from the cache {event['path']}", highlight=False)
            elif kind in ("predicted", "counted"):
                if kind not in tasks:
                    tasks[kind] = bar.add_task(kind, total=event["total"], info="")
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
            backend=backend,
            batch_size=auto_int(batch_size, "--batch-size"),
            workers=auto_int(workers, "--workers"),
            progress=on_event,
            force=force,
            oof=oof,
            review_specificity=review_specificity,
            review_share=review_share,
        )
    table = plain_table("best settings (competition Dice on these images)")
    names = Thresholds.NAMES
    for col in (*(n.replace("_", " ") for n in names), "Dice", "chosen"):
        table.add_column(col, justify="right", no_wrap=True)
    chosen_row = {k: result.thresholds[k] for k in names}
    rows = list(result.top)
    if not any(all(row[k] == chosen_row[k] for k in names) for row in rows):
        rows.append({**chosen_row, "competition_dice": result.score})  # kept at the input's values: shown too
    for row in rows:
        table.add_row(
            *(f"{row[k]:g}" for k in names),
            f"{row['competition_dice']:.4f}",
            "yes" if all(row[k] == chosen_row[k] for k in names) else "",
        )
    print_table(table)
    if result.review is not None:
        print_table(review_table(result.review))
    f = result.figures
    chosen = ", ".join(f"{k} {result.thresholds[k]:g}" for k in result.thresholds)
    err.print(
        f"chosen: {chosen}\ncompetition Dice {result.score:.4f} (the input's thresholds: {result.default_score:.4f}); "
        f"Dice on positives {ci_text(f['dice_positive_mean'], None)}, "
        f"sensitivity {f['sensitivity']:.3f}, specificity {f['specificity']:.3f} on {f['n_images']} images\n"
        f"wrote {result.out}",
        highlight=False,
    )
    for note in result.notes:
        err.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)

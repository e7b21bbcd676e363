"""`pneumotriage train classifier|segmenter`: options in, one training run out."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from pneumotriage.cli.console import (
    err,
    reports_errors,
)
from pneumotriage.cli.help import PlainCommand
from pneumotriage.cli.options import (
    Augmentation,
    CacheDir,
    DataArg,
    Device,
    Epochs,
    Fold,
    Folds,
    ImageSize,
    LabelsOpt,
    LearningRate,
    OutOpt,
    Patience,
    PrecisionOpt,
    Resume,
    Seed,
    ShowProgress,
    SwaEpochs,
    ValFraction,
    Workers,
    share,
)
from pneumotriage.cli.progress import bars
from pneumotriage.errors import UsageError

train_app = typer.Typer(
    help="Train the classifier or the segmenter on DICOMs and a SIIM-form label CSV.", no_args_is_help=True
)


def _run_training(kind: str, resume: Path | None, progress_on: bool, **options: Any) -> None:
    """Train by :class:`~pneumotriage.train.TrainConfig` built from ``options``, which the commands name by its
    fields (paths given as strings), with progress bars and a closing summary."""
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
    with bars(show=progress_on and rank == 0) as bar:
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


@train_app.command("classifier", cls=PlainCommand)
@reports_errors
def train_classifier(
    data: DataArg = Path("."),
    labels: LabelsOpt = None,
    out: OutOpt = Path("runs/classifier"),
    arch: Annotated[
        str, typer.Option(help="densenet121 (CheXNet), resnet50, resnet34, efficientnet_b0 or densenet_mini (compact).")
    ] = ("densenet121"),
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
    options = dict(locals())  # every option above, by the TrainConfig field it sets
    _run_training("classifier", options.pop("resume"), options.pop("progress"), **options)


@train_app.command("segmenter", cls=PlainCommand)
@reports_errors
def train_segmenter(
    data: DataArg = Path("."),
    labels: LabelsOpt = None,
    out: OutOpt = Path("runs/segmenter"),
    arch: Annotated[str, typer.Option(help="unet, unetpp or double_unet.")] = "unet",
    encoder: Annotated[
        str,
        typer.Option(
            help="resnet34 (Kaggle winners), vgg19_bn (case study), efficientnet_b0, densenet121 or densenet_mini."
        ),
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
    options = dict(locals())  # every option above, by the TrainConfig field it sets
    options["positive_share"] = share(positive_share)
    _run_training("segmenter", options.pop("resume"), options.pop("progress"), **options)

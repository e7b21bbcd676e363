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


class _TrainingProgress:
    """A run's progress events as bars (or, without a terminal, a line every half minute) and a line per epoch,
    with the time left estimated from the time per batch so far in this process."""

    def __init__(self, bar: Any, epochs: int, *, quiet: bool) -> None:
        self.bar, self.quiet = bar, quiet
        self.epochs_task = bar.add_task("epochs", total=epochs, info="")
        self.batches_task = bar.add_task("batches", total=None, info="")
        now = time.monotonic()
        self.run_started, self.epoch_started, self.said = now, now, now
        self.done_before = 0.0  # epochs a resumed run had done before this process
        self.epoch, self.epochs, self.batches = 0, epochs, 1

    def eta(self, epoch: int, batch: int, batches: int) -> str:
        """Time left for the run, from the time per batch so far in this run."""
        done = epoch - self.done_before + batch / max(batches, 1)  # epochs done in this process
        if done <= 0:
            return "?"
        left = (time.monotonic() - self.run_started) / done * (self.epochs - epoch - batch / max(batches, 1))
        return f"{left / 60:.1f} min" if left >= 90 else f"{left:.0f} s"

    def on_event(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "_" + event["event"], None)
        if handler is not None:
            handler(event)

    def _weights(self, event: dict[str, Any]) -> None:
        err.print(f"starting from {event['start']}", highlight=False)

    def _data(self, event: dict[str, Any]) -> None:
        err.print(
            f"train {event['train']} images ({event['train_positive']} positive), validation "
            f"{event['val']} ({event['val_positive']} positive) on {event['device']}"
            + (f" x{event['world_size']} processes" if event["world_size"] > 1 else ""),
            highlight=False,
        )

    def _epoch_start(self, event: dict[str, Any]) -> None:
        if self.done_before == 0.0 and event["epoch"]:
            self.done_before = float(event["epoch"])  # resumed
        self.epoch_started = time.monotonic()
        self.bar.update(self.epochs_task, completed=event["epoch"], total=event["epochs"])
        self.bar.reset(self.batches_task, total=event["batches"], info="")
        self.epoch, self.epochs, self.batches = event["epoch"], event["epochs"], event["batches"]

    def _batch(self, event: dict[str, Any]) -> None:
        self.bar.update(self.batches_task, completed=event["batch"], info=f"loss {event['loss']:.4f}")
        if self.quiet and time.monotonic() - self.said >= 30:
            self.said = time.monotonic()
            err.print(
                f"epoch {self.epoch + 1}/{self.epochs}: batch {event['batch']}/{self.batches}, "
                f"loss {event['loss']:.4f}; about {self.eta(self.epoch, event['batch'], self.batches)} left",
                highlight=False,
            )

    def _epoch_end(self, event: dict[str, Any]) -> None:
        m = event["metrics"]
        self.bar.update(self.epochs_task, completed=event["epoch"] + 1)
        sel = event["selection"]
        figures = ", ".join(
            f"{k[4:]} {v:.3f}"
            for k, v in m.items()
            if k.startswith("val_") and isinstance(v, float) and k[4:] in (sel, "auc", "recall", "dice_positives")
        )
        star = " [green]*best[/]" if m.get("best") else ""
        took = time.monotonic() - self.epoch_started
        left = self.eta(event["epoch"] + 1, 0, 1) if event["epoch"] + 1 < self.epochs else ""
        err.print(
            f"epoch {event['epoch'] + 1}/{self.epochs}: loss {m.get('train_loss', float('nan')):.4f}, "
            f"{figures}{star} ({took:.0f} s" + (f"; about {left} left)" if left else ")"),
            highlight=False,
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
        # Without a terminal (a log file, a CI job) the bars do not show: a line every half minute instead.
        shown = _TrainingProgress(bar, cfg.epochs, quiet=progress_on and rank == 0 and not err.is_terminal)
        result = train(cfg, resume=resume is not None, progress=shown.on_event)
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

"""The run: epochs, validation, checkpoints (``last.pt``, ``best.pt``, ``swa.pt``), curves and resuming."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from pneumotriage.datasets import EpochSampler, RadiographDataset, make_augment
from pneumotriage.dicom import SkippedFile, discover
from pneumotriage.errors import UsageError
from pneumotriage.folds import index_dataset
from pneumotriage.io import atomic_write_bytes, atomic_write_text, strict_json
from pneumotriage.labels import read_rle_csv
from pneumotriage.losses import parse_loss
from pneumotriage.models import DEFAULT_THRESHOLDS, build_model, meta_of, provenance, save_checkpoint, unwrap
from pneumotriage.runtime import Progress, autocast_for, progress_event, use_bf16
from pneumotriage.train.config import SELECTION_METRIC, SELECTION_RULE, TrainConfig, TrainResult
from pneumotriage.train.data import data_fingerprint, loader, split_records, write_oof
from pneumotriage.train.dist import Dist, broadcast_int, distributed, record_rank_checksums
from pneumotriage.train.steps import (
    Objective,
    best_warnings,
    better,
    predict,
    selection_key,
    to_device,
    train_step,
    validation_metrics,
)
from pneumotriage.weights import load_state_dict


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """The metrics lines of epochs <= ``upto_epoch``, counted from 1 as metrics.jsonl and the console count them
    (a killed run may have logged one epoch past its checkpoint)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and int(row.get("epoch", 10**9)) <= upto_epoch:
            lines.append(row)
    return lines


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(strict_json(r) + "\n" for r in rows))  # an undefined figure is null


def starting_weights(cfg: TrainConfig) -> str:
    """What a new run starts from, said in its first lines. With ``cfg.pretrained`` (the default) the backbone's
    ImageNet weights come from the weight cache, fetched through the registry (sha256-checked) when missing: a
    run never falls back to random weights unasked. Offline, or where the download fails, it stops with the
    commands that get the file (exit 3); ``--no-pretrained`` is the way to start from random weights."""
    from pneumotriage.models import ENCODERS
    from pneumotriage.weights import WeightCache, WeightError, load_registry, mirror_from_env, offline_from_env

    cfg.spec()  # an unknown architecture or encoder is a usage error before anything else
    if not cfg.pretrained:
        return "random weights (--no-pretrained)"
    backbone = cfg.arch if cfg.kind == "classifier" else ENCODERS[cfg.encoder or ""].backbone
    registry = load_registry()
    spec = next((s for s in registry.values() if s.kind == "backbone" and s.arch == backbone), None)
    if spec is None:
        raise UsageError(
            f"no ImageNet weights are registered for {backbone}",
            hint="pass --no-pretrained to start from random weights",
        )
    cache = WeightCache(registry)
    try:
        if cache.status(spec).status != "missing":
            digest = cache.verify(spec).sha256 or "?"  # in the cache: checked against its hash
        else:
            _, digest = cache.fetch(spec, mirror=mirror_from_env(), offline=offline_from_env())
    except WeightError as exc:
        raise type(exc)(
            f"training starts from the ImageNet weights {spec.name!r}, which cannot be had: {exc.message}",
            hint=f"run `pneumotriage weights fetch {spec.name}` where there is a network, or copy the file here and "
            f"run `pneumotriage weights import {spec.name} FILE`; or pass --no-pretrained to start from random "
            "weights",
        ) from None
    return f"ImageNet weights {spec.name} (sha256 {digest[:12]}...)"


@torch.no_grad()
def recompute_batch_norm(
    model: nn.Module, loader: DataLoader[dict[str, Any]], device: torch.device, bf16: bool
) -> None:
    """Batch-norm running statistics recomputed as a plain average over the training images: those of averaged
    weights are not the average of the epochs' statistics (``torch.optim.swa_utils.update_bn`` does the same for
    loaders of bare tensors; these batches are dicts)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was_training = model.training
    model.train()
    for batch in loader:
        batch = to_device(batch, device, bf16)
        with autocast_for(device, bf16):
            model(batch["image"])
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)


#: Seconds between two drawings of ``curves.png`` during a run (the last epoch is always drawn).
CURVES_EVERY_S = 30.0


def _write_curves(path: Path, history: list[dict[str, Any]], selection: str) -> None:
    """curves.png beside metrics.jsonl, redrawn as :class:`TrainConfig` ``curves`` says."""
    import pneumotriage.plots as plots

    atomic_write_bytes(path, plots.curves_png(history, selection), durable=False)


def train(cfg: TrainConfig, *, resume: bool = False, progress: Progress | None = None) -> TrainResult:
    """Train one model as ``cfg`` says; with ``resume``, continue the run in ``cfg.out`` from its ``last.pt``."""
    run_dir = Path(cfg.out)
    cfg, state = _resumed(cfg, run_dir, resume)
    emit = progress or (lambda event: None)
    # A folder with no DICOM in it is said at once, before the network is asked for a backbone.
    if state is None and not any(not isinstance(f, SkippedFile) for f in discover(cfg.data)):
        raise UsageError("no DICOM files found", path=cfg.data, hint="give the folder of training DICOMs as DATA")
    # Before any process group or data: a backbone that cannot be had stops the run at once (exit 3).
    start = starting_weights(cfg) if state is None else None

    with distributed(cfg.device) as (dist, device):
        if not dist.main:
            emit = lambda event: None  # noqa: E731 (rank 0 alone reports)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        data = _Data(cfg, dist, device)
        if start is not None:
            emit(progress_event("weights", start=start))
        emit(data.event(device, dist))
        run = _Run(cfg, run_dir, data, dist, device, state, emit)
        run.epochs()
        return run.finish()


def _resumed(cfg: TrainConfig, run_dir: Path, resume: bool) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The configuration to train by and, with ``resume``, the state of ``last.pt`` (the run's own configuration
    comes with it). A new run refuses a folder that holds one."""
    last_path = run_dir / "last.pt"
    if resume:
        if not last_path.is_file():
            raise UsageError("nothing to resume: no last.pt", path=run_dir, hint="start a new run without --resume")
        state = load_state_dict(last_path)
        return TrainConfig.from_dict({**state["config"], "out": str(run_dir)}), state
    if last_path.exists():
        raise UsageError(
            "this run folder already holds a run",
            path=run_dir,
            hint="pass --resume to continue it, or choose another --out",
        )
    return cfg, None


class _Data:
    """A run's images: the labelled index split into training and validation, and their loaders."""

    def __init__(self, cfg: TrainConfig, dist: Dist, device: torch.device) -> None:
        labels = read_rle_csv(cfg.labels, relative=cfg.relative_rle)
        self.index = index_dataset(cfg.data, cfg.labels, relative=cfg.relative_rle)
        records = self.index.records
        if len(records) < 4:
            unlabelled = len(self.index.images_without_labels)
            raise UsageError(
                f"only {len(records)} labelled images found ({unlabelled} DICOMs here have no row in --labels)",
                path=cfg.data,
                hint="give the label CSV of these images as --labels" if unlabelled else "train on at least 4 images",
            )
        try:
            self.train_records, self.val_records = split_records(cfg, records)
        except ValueError as exc:
            raise UsageError(str(exc), path=cfg.data) from None
        self.fingerprint = data_fingerprint(self.train_records, self.val_records)
        self.n_pos = sum(r.positive for r in self.train_records)
        if self.n_pos == 0 or self.n_pos == len(self.train_records):
            raise UsageError("the training split needs both positive and negative images", path=cfg.labels)
        masks = cfg.kind == "segmenter"
        train_set = RadiographDataset(
            self.train_records,
            labels,
            cfg.image_size,
            masks=masks,
            augment=make_augment(cfg.augment),
            cache_dir=cfg.cache,
        )
        val_set = RadiographDataset(self.val_records, labels, cfg.image_size, masks=masks, cache_dir=cfg.cache)
        self.sampler = EpochSampler(
            train_set.positives,
            epochs=cfg.epochs,
            seed=cfg.seed,
            positive_share=cfg.positive_share if masks else None,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        per_rank_batch = max(1, cfg.batch_size // dist.world_size)
        self.train_loader = loader(train_set, per_rank_batch, cfg.workers, self.sampler, device, cfg.seed)
        self.val_loader = loader(val_set, per_rank_batch, cfg.workers, None, device, cfg.seed)

    def event(self, device: torch.device, dist: Dist) -> dict[str, Any]:
        return progress_event(
            "data",
            train=len(self.train_records),
            train_positive=self.n_pos,
            val=len(self.val_records),
            val_positive=sum(r.positive for r in self.val_records),
            skipped=len(self.index.skipped),
            device=str(device),
            world_size=dist.world_size,
        )


class _Run:
    """A run under way: the model and its optimiser, where the run stands (the best epoch, the epochs without
    improvement, the metrics so far), and the run folder it writes."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        data: _Data,
        dist: Dist,
        device: torch.device,
        state: dict[str, Any] | None,
        emit: Progress,
    ) -> None:
        self.cfg, self.run_dir, self.data, self.dist, self.device, self.emit = cfg, run_dir, data, dist, device, emit
        self.best_path, self.metrics_path = run_dir / "best.pt", run_dir / "metrics.jsonl"
        self.model = build_model(cfg.spec(), pretrained=cfg.pretrained)
        self.pretrained_used = bool(meta_of(self.model)["pretrained"])
        # What it learns from: a model that saw synthetic phantoms is never clinical, in any output.
        train_records = data.train_records
        self.trained_on = provenance(sum(r.synthetic for r in train_records) / max(1, len(train_records)))
        if state is not None:
            self.model.load_state_dict(state["state_dict"])
        self.model.to(device)
        self.bf16 = use_bf16(device, cfg.precision)
        if self.bf16:
            self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.epochs, eta_min=cfg.lr * 0.01
        )
        pos_weight = (len(train_records) - data.n_pos) / data.n_pos
        self.objective = Objective(cfg.kind, parse_loss(cfg.loss), pos_weight=pos_weight)
        self.start_epoch, self.stale = 0, 0
        self.best_value: list[float] | float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.swa = AveragedModel(self.model, use_buffers=False) if cfg.swa_epochs and dist.main else None
        if state is not None:
            self._restore(state)
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.selection = SELECTION_METRIC[cfg.kind]
        self.thresholds = dict(DEFAULT_THRESHOLDS[cfg.kind])
        self.stopped_early = False
        self.epoch = self.start_epoch - 1
        self.curves_drawn, self.curves_rows = -float("inf"), 0

    def _restore(self, state: dict[str, Any]) -> None:
        """Where a resumed run stood at its last checkpoint."""
        if self.swa is not None and state.get("swa_state") is not None:
            self.swa.load_state_dict(state["swa_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_value, self.best_epoch = state.get("best_value"), state.get("best_epoch")
        self.stale = int(state.get("stale", 0))
        # the checkpoint's epoch index is 0-based
        self.history = _read_metrics(self.metrics_path, int(state["epoch"]) + 1)

    def epochs(self) -> None:
        """The epochs left: each trained, then validated and checkpointed (rank 0), until the last or until
        ``patience`` epochs without improvement."""
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            self.epoch = epoch
            if cfg.patience is not None and self.stale >= cfg.patience:
                self.stopped_early = True
                self.epoch = epoch - 1  # the last epoch that ran
                break
            seen, loss_sum, train_time = self._train_epoch(epoch)
            if self.swa is not None and epoch >= cfg.epochs - cfg.swa_epochs:
                self.swa.update_parameters(self.model)
            row: dict[str, Any] = {}
            if self.dist.main:
                row = self._validate(epoch, seen, loss_sum, train_time)
            self.stale = broadcast_int(self.stale, self.dist, self.device)
            self.emit(progress_event("epoch_end", epoch=epoch, metrics=row, selection=self.selection))

    def _train_epoch(self, epoch: int) -> tuple[int, float, float]:
        """One pass over the epoch's training images: the images seen, their summed loss and the seconds taken."""
        data = self.data
        data.sampler.set_epoch(epoch)
        data.train_loader.generator.manual_seed(self.cfg.seed * 1000 + epoch)
        self.net.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        self.emit(progress_event("epoch_start", epoch=epoch, epochs=self.cfg.epochs, batches=len(data.train_loader)))
        for i, batch in enumerate(data.train_loader):
            loss = train_step(self.net, self.objective, self.optimizer, batch, self.device, self.bf16)
            n = int(batch["image"].shape[0])
            seen += n
            loss_sum += float(loss) * n
            self.emit(progress_event("batch", epoch=epoch, batch=i + 1, loss=loss_sum / seen))
        self.scheduler.step()
        return seen, loss_sum, time.perf_counter() - t0

    def _validate(self, epoch: int, seen: int, loss_sum: float, train_time: float) -> dict[str, Any]:
        """Validation figures, metrics.jsonl and the curves, then best.pt (when the epoch is the best so far) and
        last.pt: the epoch's row."""
        cfg = self.cfg
        pred = predict(
            unwrap(self.net), self.data.val_loader, self.device, cfg.kind, self.thresholds, self.bf16, self.objective
        )
        metrics = validation_metrics(cfg.kind, pred, cfg.gate_sensitivity)
        value = selection_key(cfg.kind, metrics)
        improved = better(value, self.best_value)
        row = {
            "epoch": epoch + 1,  # counted from 1, as the console and the curves count
            "train_loss": loss_sum / max(seen, 1),
            "train_images_per_s": seen * self.dist.world_size / train_time,
            "lr": self.scheduler.get_last_lr()[0],
            **{f"val_{k}": v for k, v in metrics.items()},
            "best": improved,
        }
        self.history.append(row)
        _write_metrics(self.metrics_path, self.history)
        if cfg.curves and (epoch == cfg.epochs - 1 or time.monotonic() - self.curves_drawn >= CURVES_EVERY_S):
            _write_curves(self.run_dir / "curves.png", self.history, self.selection)
            self.curves_drawn, self.curves_rows = time.monotonic(), len(self.history)
        if improved:
            write_oof(self.run_dir / "oof.csv", self.data.val_records, pred)
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            self._save_best(epoch, metrics, value)
        else:
            self.stale += 1
        self._save_last(epoch, metrics)
        return row

    def _save_best(self, epoch: int, metrics: dict[str, Any], value: list[float]) -> None:
        best_thresholds = dict(self.thresholds)
        if self.cfg.kind == "classifier":
            best_thresholds["gate"] = float(metrics["gate"])
        save_checkpoint(
            self.best_path,
            self.model,
            thresholds=best_thresholds,
            config=self.cfg.to_dict(),
            data_fingerprint=self.data.fingerprint,
            metrics={
                "selection": self.selection,
                "selection_rule": list(SELECTION_RULE[self.cfg.kind]),
                "selection_values": value,
                **metrics,
            },
            epoch=epoch,
            extra={"pretrained": self.pretrained_used, "world_size": self.dist.world_size, **self.trained_on},
        )

    def _save_last(self, epoch: int, metrics: dict[str, Any]) -> None:
        save_checkpoint(
            self.run_dir / "last.pt",
            self.model,
            config=self.cfg.to_dict(),
            data_fingerprint=self.data.fingerprint,
            metrics=metrics,
            epoch=epoch,
            extra={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "stale": self.stale,
                "pretrained": self.pretrained_used,
                "world_size": self.dist.world_size,
                "swa_state": self.swa.state_dict() if self.swa is not None else None,
                **self.trained_on,
            },
        )

    def finish(self) -> TrainResult:
        """The curves drawn to the end, the ranks' weights compared, the averaged model (``swa_epochs``) written
        as swa.pt, and the result with what the user must know of it."""
        if self.cfg.curves and self.dist.main and len(self.history) > self.curves_rows:  # stopped early
            _write_curves(self.run_dir / "curves.png", self.history, self.selection)
        record_rank_checksums(self.model, self.dist, self.best_path, self.device)
        swa_metrics = self._swa() if self.swa is not None and int(self.swa.n_averaged) > 0 else {}
        best_epoch = self.best_epoch
        best_metrics = next(
            (r for r in self.history if best_epoch is not None and r.get("epoch") == best_epoch + 1), {}
        )
        warnings = best_warnings(self.cfg.kind, best_epoch, best_metrics)
        return TrainResult(
            self.run_dir, self.epoch + 1, best_epoch, best_metrics, self.stopped_early, warnings, swa_metrics
        )

    def _swa(self) -> dict[str, Any]:
        """The averaged weights' batch norm recomputed, validated and written as swa.pt; their figures."""
        assert self.swa is not None
        cfg, data = self.cfg, self.data
        averaged: nn.Module = self.swa.module
        recompute_batch_norm(averaged, data.train_loader, self.device, self.bf16)
        pred = predict(averaged, data.val_loader, self.device, cfg.kind, self.thresholds, self.bf16, self.objective)
        swa_metrics = {**validation_metrics(cfg.kind, pred, cfg.gate_sensitivity), "averaged": int(self.swa.n_averaged)}
        swa_thresholds = dict(self.thresholds)
        if cfg.kind == "classifier":
            swa_thresholds["gate"] = float(swa_metrics["gate"])
        save_checkpoint(
            self.run_dir / "swa.pt",
            averaged,
            thresholds=swa_thresholds,
            config=cfg.to_dict(),
            data_fingerprint=data.fingerprint,
            metrics={"selection_values": selection_key(cfg.kind, swa_metrics), **swa_metrics},
            epoch=self.epoch,
            extra={
                "swa": {"epochs": cfg.swa_epochs, "averaged": int(self.swa.n_averaged)},
                "pretrained": self.pretrained_used,
                **self.trained_on,
            },
        )
        self.emit(
            progress_event("swa", metrics=swa_metrics, averaged=int(self.swa.n_averaged), selection=self.selection)
        )
        return swa_metrics

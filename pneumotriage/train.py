"""Training of both stages: one loop for the classifier and the segmenter, from one CPU to many GPUs.

- Data: the dataset index (DICOMs matched with the label CSV), a patient-grouped stratified fold (or held-out
  share) for validation, :class:`~pneumotriage.datasets.RadiographDataset` decoded in DataLoader workers.
- Device: auto picks cuda > mps > cpu; on CUDA, bf16 autocast and channels_last. ``precision="bf16"`` also
  uses them on a CPU with native bf16 (AVX512-BF16 / AMX), faster there (docs/performance.md); ``"fp32"`` turns
  them off.
- Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
  GPU, gloo on CPU), each rank takes its slice of every epoch, and rank 0 alone validates, logs and writes.
- Every epoch: validation, ``metrics.jsonl`` (one JSON line per epoch), ``last.pt`` (with optimiser state, for
  ``--resume``), and ``best.pt`` when the validation metric improved. Writes are atomic, so a run killed at any
  moment resumes from its last finished epoch.

The library never prints: progress goes to the ``progress`` callback as small event dicts.

Why one module of ~800 lines: the loop, validation, checkpointing and resuming share the run folder's state and
the distributed set-up; data, losses, metrics and models live in their own modules.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from pneumotriage.datasets import AUGMENT_LEVELS, EpochSampler, RadiographDataset, make_augment
from pneumotriage.dicom import SkippedFile, discover
from pneumotriage.errors import PneumotriageError, UsageError
from pneumotriage.folds import ImageRecord, index_dataset, patient_folds, split_fold
from pneumotriage.io import atomic_write_bytes, atomic_write_text, strict_json
from pneumotriage.labels import read_rle_csv
from pneumotriage.losses import ComboLoss, parse_loss
from pneumotriage.metrics import binary_metrics, roc_auc, threshold_for_sensitivity, youden_threshold
from pneumotriage.models import DEFAULT_THRESHOLDS, ModelSpec, build_model, provenance, save_checkpoint, unwrap
from pneumotriage.models.foreign import RUNTIMES
from pneumotriage.models.spec import IMPORTED_CLASSIFIERS, IMPORTED_SEGMENTERS
from pneumotriage.postprocess import Thresholds, triplet_keep
from pneumotriage.runtime import PRECISIONS, Progress, autocast_for, pick_device, use_bf16
from pneumotriage.weights import load_state_dict

DEFAULT_LOSS = {"classifier": "bce:1", "segmenter": "bce:3,dice:1,focal:4"}
#: The validation figure that picks the best epoch (higher is better).
SELECTION_METRIC = {"classifier": "auc", "segmenter": "competition_dice"}
#: How epochs that tie on it are told apart, in order: for a segmenter, Dice on the positive images with the
#: triplet rule, then without it (a model that outlines nothing ties on the competition Dice with every other
#: such epoch, all of them scored on the negatives alone); then the lower validation loss.
SELECTION_RULE = {
    "classifier": ("auc", "-loss"),
    "segmenter": ("competition_dice", "dice_positives_triplet", "dice_positives", "-loss"),
}


@dataclass
class TrainConfig:
    """One training run. ``pneumotriage train classifier|segmenter`` sets these fields from its options of the
    same names; ``config.json`` in the run folder holds them, so that ``--resume`` and ``tune --oof`` rebuild it."""

    #: "classifier" (stage 1, one logit per image) or "segmenter" (stage 2, a mask logit per pixel).
    kind: str
    #: The folder of training DICOMs (searched recursively) and its SIIM-form RLE label CSV.
    data: str
    labels: str
    #: The run folder: best.pt, last.pt, metrics.jsonl, config.json, oof.csv, curves.png.
    out: str
    #: Architecture (:data:`~pneumotriage.models.CLASSIFIERS` or :data:`~pneumotriage.models.SEGMENTERS`);
    #: empty: densenet121 for a classifier, unet for a segmenter.
    arch: str = ""
    #: A segmenter's encoder (:data:`~pneumotriage.models.ENCODERS`); None: resnet34.
    encoder: str | None = None
    #: A segmenter's extra image-level head ("is there any pneumothorax"), trained beside the mask.
    empty_head: bool = False
    epochs: int = 10
    #: The side, in pixels, images are resized to (square).
    image_size: int = 256
    #: Images per step, across all processes under torchrun.
    batch_size: int = 8
    #: Peak learning rate of AdamW with cosine decay, and its weight decay.
    lr: float = 3e-4
    weight_decay: float = 1e-4
    #: Seeds the fold split, sampling, augmentation and initialisation.
    seed: int = 0
    #: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    #: DataLoader worker processes that decode DICOMs.
    workers: int = 2
    #: Validation: fold ``fold`` of ``folds`` (patient-grouped, stratified); or, with ``val_fraction``, that share
    #: held out instead.
    fold: int = 0
    folds: int = 5
    val_fraction: float | None = None
    #: The loss, e.g. "bce+dice+focal" (:func:`~pneumotriage.losses.parse_loss`); empty: the kind's default.
    loss: str = ""
    #: A segmenter's share of positive images per epoch, from the first to the last (linear), as the SIIM-ACR
    #: winners' 0.8 -> 0.4; None: the data's own share.
    positive_share: tuple[float, float] | None = None
    #: Start the backbone from its cached ImageNet weights (fetched when missing); False: random weights.
    pretrained: bool = True
    #: Augmentation level: "none", "light" or "strong".
    augment: str = "strong"
    #: A folder for resized arrays, so that later epochs skip decoding.
    cache: str | None = None
    #: Stop after this many epochs without a better validation score; None: run every epoch.
    patience: int | None = None
    #: The label CSV's run-length form: SIIM's relative one, or absolute.
    relative_rle: bool = True
    #: auto (bf16 + channels_last on CUDA), bf16 (also on a CPU with native bf16) or fp32.
    precision: str = "auto"
    #: Classifier: choose the gate as the highest threshold that keeps this share of the validation positives
    #: (a triage cascade's operating point: the segmenter's triplet rule removes what it lets through); None:
    #: Youden's J (sensitivity + specificity - 1 at its largest).
    gate_sensitivity: float | None = None
    #: Stochastic weight averaging: the weights of the last ``swa_epochs`` epochs averaged
    #: (``torch.optim.swa_utils.AveragedModel``), batch-norm statistics recomputed over the training images, and
    #: written as ``swa.pt`` beside ``best.pt`` with its own validation figures. 0: none.
    swa_epochs: int = 0
    #: Draw ``curves.png`` beside ``metrics.jsonl``: after the first epoch, then again once :data:`CURVES_EVERY_S`
    #: have passed since the last drawing, and after the last epoch (a drawing takes ~0.2-0.75 s: after every
    #: epoch of a short run it took a fifth of the time). The demo build, whose run folders are thrown away,
    #: turns it off.
    curves: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_LOSS:
            raise UsageError(f"unknown model kind {self.kind!r}; valid: classifier, segmenter")
        if not self.arch:
            self.arch = "densenet121" if self.kind == "classifier" else "unet"
        if self.kind == "segmenter" and not self.encoder:
            self.encoder = "resnet34"
        if self.kind == "classifier":
            self.encoder = None
        imported = {**IMPORTED_CLASSIFIERS, **IMPORTED_SEGMENTERS, **RUNTIMES}
        if self.arch in imported:
            raise UsageError(
                f"{self.arch} ({imported[self.arch]}) is only ever imported with `pneumotriage convert`, "
                "not trained here"
            )
        if not self.loss:
            self.loss = DEFAULT_LOSS[self.kind]
        if self.positive_share is not None:
            self.positive_share = (float(self.positive_share[0]), float(self.positive_share[1]))
            if not all(0.0 <= s <= 1.0 for s in self.positive_share):
                raise UsageError("positive shares must lie in [0, 1]")
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise UsageError("epochs and batch size must be >= 1 and the image size >= 32")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise UsageError(f"--swa-epochs {self.swa_epochs}: give 0 (none) up to --epochs ({self.epochs})")
        if self.val_fraction is None and not 0 <= self.fold < self.folds:
            raise UsageError(f"--fold must be in 0..{self.folds - 1}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise UsageError("--val-fraction must lie strictly between 0 and 1")
        parse_loss(self.loss)
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.augment not in AUGMENT_LEVELS:
            raise UsageError(f"unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENT_LEVELS)}")

    def spec(self) -> ModelSpec:
        return ModelSpec(
            kind=self.kind,
            arch=self.arch,
            encoder=self.encoder,
            input_size=self.image_size,
            empty_head=self.empty_head and self.kind == "segmenter",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positive_share"] = list(self.positive_share) if self.positive_share else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        if d.get("positive_share") is not None:
            d["positive_share"] = tuple(d["positive_share"])
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int | None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    #: What the user must know of the result (a best checkpoint that outlines nothing).
    warnings: list[str] = field(default_factory=list)
    #: The averaged model's validation figures (with ``swa_epochs``), written as swa.pt.
    swa_metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# device and distribution


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist(), pick_device(device_name)
        return
    import torch.distributed as tdist

    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist, device
    finally:
        tdist.destroy_process_group()


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


# --------------------------------------------------------------------------------------------------------------
# data


def split_records(cfg: TrainConfig, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    if cfg.val_fraction is not None:
        k = max(2, round(1 / cfg.val_fraction))
        assignment = patient_folds(records, k, seed=cfg.seed)
        return [r for r, f in zip(records, assignment, strict=True) if f != 0], [
            r for r, f in zip(records, assignment, strict=True) if f == 0
        ]
    return split_fold(records, cfg.fold, cfg.folds, seed=cfg.seed)


def _write_oof(path: Path, records: list[ImageRecord], pred: dict[str, np.ndarray]) -> None:
    """best.pt's out-of-fold predictions: one row per validation image, in the loader's order (the records'):
    its label, the model's image-level score, and for a segmenter the triplet's decision and Dice at the
    checkpoint's thresholds. Written atomically with best.pt, so the two always belong together."""
    columns = [k for k in ("scores", "predicted", "dice_triplet", "dice_plain") if k in pred]
    names = {"scores": "score", "predicted": "outlined", "dice_triplet": "dice", "dice_plain": "dice_at_0.5"}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "label", *(names[c] for c in columns)])
    for i, r in enumerate(records):
        values = [int(pred[c][i]) if c == "predicted" else f"{float(pred[c][i]):.6f}" for c in columns]
        writer.writerow([r.image_id, int(pred["labels"][i]), *values])
    atomic_write_text(path, buffer.getvalue())


def data_fingerprint(train: list[ImageRecord], val: list[ImageRecord]) -> str:
    """A short hash of which images (and labels) went into training and validation."""
    digest = hashlib.sha256()
    for tag, records in (("train", train), ("val", val)):
        for r in sorted(records, key=lambda r: r.image_id):
            digest.update(f"{tag}|{r.image_id}|{int(r.positive)}|{r.mask_area}\n".encode())
    return digest.hexdigest()[:16]


def _loader(
    dataset: RadiographDataset, batch_size: int, workers: int, sampler: Any, device: torch.device, seed: int
) -> DataLoader[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=generator,
        drop_last=False,
    )


# --------------------------------------------------------------------------------------------------------------
# one step, one epoch


class Objective(nn.Module):
    """The training loss of a model kind: the combo loss on the main output, half of it on deep-supervision
    outputs, and BCE on the segmenter's image-level head."""

    def __init__(self, kind: str, weights: dict[str, float], pos_weight: float | None) -> None:
        super().__init__()
        self.kind = kind
        self.combo = ComboLoss(weights, pos_weight if kind == "classifier" else None)
        self.present = ComboLoss({"bce": 1.0})

    def forward(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "classifier":
            loss: torch.Tensor = self.combo(output, batch["label"])
            return loss
        loss = self.combo(output["mask"], batch["mask"])
        for aux in output.get("aux", []):
            loss = loss + 0.5 * self.combo(aux, batch["mask"])
        if "present" in output:
            loss = loss + self.present(output["present"], batch["label"])
        return loss


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


def train_step(
    net: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    device: torch.device,
    bf16: bool | None = None,
) -> torch.Tensor:
    """One optimisation step on one batch (bf16 autocast and channels_last where ``bf16``, by default on CUDA);
    returns the detached loss."""
    fast = device.type == "cuda" if bf16 is None else bf16
    batch = _to_device(batch, device, fast)
    with autocast_for(device, fast):
        output = net(batch["image"])
    loss: torch.Tensor = objective(output, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return loss.detach()


def _dice(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of boolean (B, H, W) stacks, 1 where both are empty (the competition rule)."""
    inter = (pred & true).flatten(1).sum(1).float()
    total = (pred.flatten(1).sum(1) + true.flatten(1).sum(1)).float()
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp(min=1))


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader[dict[str, Any]],
    device: torch.device,
    kind: str,
    thresholds: dict[str, float] | None = None,
    bf16: bool | None = None,
    objective: nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """Per-image results over a loader, in its order, without keeping any probability map (memory stays flat
    with the validation set): ``labels`` and ``scores`` (N,); for a segmenter also ``dice_plain`` (masks at 0.5),
    ``dice_triplet`` (the triplet rule with ``thresholds``) and ``predicted`` (the triplet found a pneumothorax);
    with ``objective``, ``loss`` (each image its batch's loss)."""
    t = Thresholds.from_mapping(thresholds or {})  # what the checkpoint holds, defaults for the rest
    model.eval()
    out: dict[str, list[np.ndarray]] = {
        "labels": [],
        "scores": [],
        "dice_plain": [],
        "dice_triplet": [],
        "predicted": [],
        "loss": [],
    }
    for batch in loader:
        fast = device.type == "cuda" if bf16 is None else bf16
        batch = _to_device(batch, device, fast)
        with autocast_for(device, fast):
            output = model(batch["image"])
        if objective is not None:
            out["loss"].append(np.full(len(batch["label"]), float(objective(output, batch))))
        out["labels"].append(batch["label"].cpu().numpy() >= 0.5)
        if kind == "classifier":
            out["scores"].append(torch.sigmoid(output.float()).cpu().numpy())
            continue
        p = torch.sigmoid(output["mask"].float())[:, 0]
        true = batch["mask"][:, 0] >= 0.5
        keep = triplet_keep(p, top_score=t.top_score, min_area=t.min_area)
        post = (p > t.bottom_score) & keep[:, None, None]
        out["dice_plain"].append(_dice(p >= 0.5, true).cpu().numpy())
        out["dice_triplet"].append(_dice(post, true).cpu().numpy())
        out["predicted"].append(keep.cpu().numpy())
        score = torch.sigmoid(output["present"].float()) if "present" in output else p.flatten(1).amax(1)
        out["scores"].append(score.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def validation_metrics(kind: str, pred: dict[str, np.ndarray], gate_sensitivity: float | None = None) -> dict[str, Any]:
    """Summary figures of :func:`predict`'s per-image results; a classifier's gate by Youden's J, or for
    ``gate_sensitivity`` (where the validation set has positives)."""
    y, s = pred["labels"], pred["scores"]
    metrics: dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum()), "auc": roc_auc(y, s)}
    if kind == "classifier":
        if gate_sensitivity is not None and y.any():
            gate = threshold_for_sensitivity(y, s, gate_sensitivity)
        else:
            gate = youden_threshold(y, s)
        metrics["gate"] = gate
        at = binary_metrics(y, s, gate)
        metrics.update({k: at[k] for k in ("precision", "recall", "specificity", "f1")})
        if "loss" in pred:
            metrics["loss"] = float(pred["loss"].mean())
        return metrics
    plain, post = pred["dice_plain"], pred["dice_triplet"]
    metrics["competition_dice"] = float(post.mean())
    metrics["dice_plain"] = float(plain.mean())
    metrics["dice_positives"] = float(plain[y].mean()) if y.any() else float("nan")
    metrics["dice_positives_triplet"] = float(post[y].mean()) if y.any() else float("nan")
    at = binary_metrics(y, pred["predicted"].astype(float), 0.5)
    metrics.update({k: at[k] for k in ("precision", "recall", "specificity")})
    if "loss" in pred:
        metrics["loss"] = float(pred["loss"].mean())
    return metrics


def selection_key(kind: str, metrics: dict[str, Any]) -> list[float]:
    """An epoch's validation figures in :data:`SELECTION_RULE` order, each higher-is-better (an undefined one
    counts as the worst)."""
    key = []
    for name in SELECTION_RULE[kind]:
        value = metrics.get(name.lstrip("-"))
        value = float(value) if value is not None else math.nan
        key.append(-math.inf if math.isnan(value) else -value if name.startswith("-") else value)
    return key


def _better(new: list[float], old: list[float] | float | None) -> bool:
    if old is None:
        return True
    if not isinstance(old, list):  # a run started before ties were broken: its single figure
        old = [-math.inf if math.isnan(old) else float(old)]
    return new > old


def _param_checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


# --------------------------------------------------------------------------------------------------------------
# the run


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
        batch = _to_device(batch, device, bf16)
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
    last_path, best_path, metrics_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.jsonl"
    state: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise UsageError("nothing to resume: no last.pt", path=run_dir, hint="start a new run without --resume")
        state = load_state_dict(last_path)
        cfg = TrainConfig.from_dict({**state["config"], "out": str(run_dir)})
    elif last_path.exists():
        raise UsageError(
            "this run folder already holds a run",
            path=run_dir,
            hint="pass --resume to continue it, or choose another --out",
        )
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

        labels = read_rle_csv(cfg.labels, relative=cfg.relative_rle)
        index = index_dataset(cfg.data, cfg.labels, relative=cfg.relative_rle)
        records = index.records
        if len(records) < 4:
            unlabelled = len(index.images_without_labels)
            raise UsageError(
                f"only {len(records)} labelled images found ({unlabelled} DICOMs here have no row in --labels)",
                path=cfg.data,
                hint="give the label CSV of these images as --labels" if unlabelled else "train on at least 4 images",
            )
        try:
            train_records, val_records = split_records(cfg, records)
        except ValueError as exc:
            raise UsageError(str(exc), path=cfg.data) from None
        fingerprint = data_fingerprint(train_records, val_records)
        n_pos = sum(r.positive for r in train_records)
        if n_pos == 0 or n_pos == len(train_records):
            raise UsageError("the training split needs both positive and negative images", path=cfg.labels)
        if start is not None:
            emit({"event": "weights", "start": start})
        emit(
            {
                "event": "data",
                "train": len(train_records),
                "train_positive": n_pos,
                "val": len(val_records),
                "val_positive": sum(r.positive for r in val_records),
                "skipped": len(index.skipped),
                "device": str(device),
                "world_size": dist.world_size,
            }
        )

        masks = cfg.kind == "segmenter"
        augment = make_augment(cfg.augment)
        train_set = RadiographDataset(
            train_records, labels, cfg.image_size, masks=masks, augment=augment, cache_dir=cfg.cache
        )
        val_set = RadiographDataset(val_records, labels, cfg.image_size, masks=masks, cache_dir=cfg.cache)
        sampler = EpochSampler(
            train_set.positives,
            epochs=cfg.epochs,
            seed=cfg.seed,
            positive_share=cfg.positive_share if masks else None,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        per_rank_batch = max(1, cfg.batch_size // dist.world_size)
        train_loader = _loader(train_set, per_rank_batch, cfg.workers, sampler, device, cfg.seed)
        val_loader = _loader(val_set, per_rank_batch, cfg.workers, None, device, cfg.seed)

        model = build_model(cfg.spec(), pretrained=cfg.pretrained)
        pretrained_used = bool(model.meta["pretrained"])  # type: ignore[index]
        # What it learns from: a model that saw synthetic phantoms is never clinical, in any output.
        trained_on = provenance(sum(r.synthetic for r in train_records) / max(1, len(train_records)))
        if state is not None:
            model.load_state_dict(state["state_dict"])
        model.to(device)
        bf16 = use_bf16(device, cfg.precision)
        if bf16:
            model.to(memory_format=torch.channels_last)
        net: nn.Module = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
        objective = Objective(cfg.kind, parse_loss(cfg.loss), pos_weight=(len(train_records) - n_pos) / n_pos)

        start_epoch, best_value, best_epoch, stale = 0, None, None, 0
        history: list[dict[str, Any]] = []
        swa = AveragedModel(model, use_buffers=False) if cfg.swa_epochs and dist.main else None
        if swa is not None and state is not None and state.get("swa_state") is not None:
            swa.load_state_dict(state["swa_state"])
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            best_value, best_epoch = state.get("best_value"), state.get("best_epoch")
            stale = int(state.get("stale", 0))
            history = _read_metrics(metrics_path, int(state["epoch"]) + 1)  # the checkpoint's epoch index is 0-based
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

        selection = SELECTION_METRIC[cfg.kind]
        thresholds = dict(DEFAULT_THRESHOLDS[cfg.kind])
        stopped_early = False
        epoch = start_epoch - 1
        curves_drawn, curves_rows = -float("inf"), 0
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience is not None and stale >= cfg.patience:
                stopped_early = True
                break
            sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(cfg.seed * 1000 + epoch)
            net.train()
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            emit({"event": "epoch_start", "epoch": epoch, "epochs": cfg.epochs, "batches": len(train_loader)})
            for i, batch in enumerate(train_loader):
                loss = train_step(net, objective, optimizer, batch, device, bf16)
                n = int(batch["image"].shape[0])
                seen += n
                loss_sum += float(loss) * n
                emit({"event": "batch", "epoch": epoch, "batch": i + 1, "loss": loss_sum / seen})
            scheduler.step()
            train_time = time.perf_counter() - t0
            if swa is not None and epoch >= cfg.epochs - cfg.swa_epochs:
                swa.update_parameters(model)

            row: dict[str, Any] = {}
            if dist.main:
                pred = predict(unwrap(net), val_loader, device, cfg.kind, thresholds, bf16, objective)
                metrics = validation_metrics(cfg.kind, pred, cfg.gate_sensitivity)
                value = selection_key(cfg.kind, metrics)
                improved = _better(value, best_value)
                row = {
                    "epoch": epoch + 1,  # counted from 1, as the console and the curves count
                    "train_loss": loss_sum / max(seen, 1),
                    "train_images_per_s": seen * dist.world_size / train_time,
                    "lr": scheduler.get_last_lr()[0],
                    **{f"val_{k}": v for k, v in metrics.items()},
                    "best": improved,
                }
                history.append(row)
                _write_metrics(metrics_path, history)
                if cfg.curves and (epoch == cfg.epochs - 1 or time.monotonic() - curves_drawn >= CURVES_EVERY_S):
                    _write_curves(run_dir / "curves.png", history, selection)
                    curves_drawn, curves_rows = time.monotonic(), len(history)
                if improved:
                    _write_oof(run_dir / "oof.csv", val_records, pred)
                    best_value, best_epoch, stale = value, epoch, 0
                    best_thresholds = dict(thresholds)
                    if cfg.kind == "classifier":
                        best_thresholds["gate"] = float(metrics["gate"])
                    save_checkpoint(
                        best_path,
                        model,
                        thresholds=best_thresholds,
                        config=cfg.to_dict(),
                        data_fingerprint=fingerprint,
                        metrics={
                            "selection": selection,
                            "selection_rule": list(SELECTION_RULE[cfg.kind]),
                            "selection_values": value,
                            **metrics,
                        },
                        epoch=epoch,
                        extra={"pretrained": pretrained_used, "world_size": dist.world_size, **trained_on},
                    )
                else:
                    stale += 1
                save_checkpoint(
                    last_path,
                    model,
                    config=cfg.to_dict(),
                    data_fingerprint=fingerprint,
                    metrics=metrics,
                    epoch=epoch,
                    extra={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "best_value": best_value,
                        "best_epoch": best_epoch,
                        "stale": stale,
                        "pretrained": pretrained_used,
                        "world_size": dist.world_size,
                        "swa_state": swa.state_dict() if swa is not None else None,
                        **trained_on,
                    },
                )
            stale = _broadcast_int(stale, dist, device)
            emit({"event": "epoch_end", "epoch": epoch, "metrics": row, "selection": selection})

        if cfg.curves and dist.main and len(history) > curves_rows:  # stopped early: the last epochs drawn too
            _write_curves(run_dir / "curves.png", history, selection)
        _record_rank_checksums(model, dist, best_path, device)
        swa_metrics: dict[str, Any] = {}
        if swa is not None and int(swa.n_averaged) > 0:
            averaged: nn.Module = swa.module
            recompute_batch_norm(averaged, train_loader, device, bf16)
            pred = predict(averaged, val_loader, device, cfg.kind, thresholds, bf16, objective)
            swa_metrics = {**validation_metrics(cfg.kind, pred, cfg.gate_sensitivity), "averaged": int(swa.n_averaged)}
            swa_thresholds = dict(thresholds)
            if cfg.kind == "classifier":
                swa_thresholds["gate"] = float(swa_metrics["gate"])
            save_checkpoint(
                run_dir / "swa.pt",
                averaged,
                thresholds=swa_thresholds,
                config=cfg.to_dict(),
                data_fingerprint=fingerprint,
                metrics={"selection_values": selection_key(cfg.kind, swa_metrics), **swa_metrics},
                epoch=epoch,
                extra={
                    "swa": {"epochs": cfg.swa_epochs, "averaged": int(swa.n_averaged)},
                    "pretrained": pretrained_used,
                    **trained_on,
                },
            )
            emit({"event": "swa", "metrics": swa_metrics, "averaged": int(swa.n_averaged), "selection": selection})
        best_metrics = next((r for r in history if best_epoch is not None and r.get("epoch") == best_epoch + 1), {})
        warnings = best_warnings(cfg.kind, best_epoch, best_metrics)
        return TrainResult(run_dir, epoch + 1, best_epoch, best_metrics, stopped_early, warnings, swa_metrics)


def best_warnings(kind: str, best_epoch: int | None, best: dict[str, Any]) -> list[str]:
    """What a finished run says of its best.pt when the best epoch is still no good: a segmenter that outlines no
    validation positive, a classifier ranking worse than chance (the first epoch is always "best" of one)."""
    epoch = best_epoch + 1 if best_epoch is not None else "?"
    warnings = []
    if kind == "segmenter" and best.get("val_n_positive") and not best.get("val_recall"):
        warnings.append(
            f"best.pt (epoch {epoch}) outlines none of the {best['val_n_positive']} validation positives with its "
            "thresholds: train longer, or check the labels; `pneumotriage tune` will refuse it"
        )
    auc = best.get("val_auc")
    if kind == "classifier" and isinstance(auc, float) and math.isfinite(auc) and auc < 0.5:
        warnings.append(
            f"best.pt (epoch {epoch}) has a validation ROC AUC of {auc:.2f}, worse than chance: it is only the best "
            "of poor epochs; train longer or on more images, or check the labels, before using it"
        )
    return warnings


def _broadcast_int(value: int, dist: Dist, device: torch.device) -> int:
    if not dist.enabled:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.broadcast(t, src=0)
    return int(t.item())


def _record_rank_checksums(model: nn.Module, dist: Dist, best_path: Path, device: torch.device) -> None:
    """Under DDP, gather every rank's parameter checksum and write them beside the checkpoints: they must agree."""
    if not dist.enabled:
        return
    import torch.distributed as tdist

    mine = torch.tensor([_param_checksum(model)], dtype=torch.float64, device=device)
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, mine)
    if dist.main:
        values = [float(g.item()) for g in gathered]
        atomic_write_text(
            best_path.parent / "ranks.json",
            json.dumps({"world_size": dist.world_size, "param_checksums": values}, indent=2) + "\n",
        )
        if len(set(values)) != 1:
            raise PneumotriageError(f"ranks ended with different weights: {values}", path=best_path.parent)
    _barrier(dist)

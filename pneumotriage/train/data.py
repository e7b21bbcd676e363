"""A run's data: the validation split, the loaders, the out-of-fold predictions and the data's fingerprint."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pneumotriage.datasets import RadiographDataset
from pneumotriage.folds import ImageRecord, patient_folds, split_fold
from pneumotriage.io import atomic_write_text
from pneumotriage.train.config import TrainConfig


def split_records(cfg: TrainConfig, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    if cfg.val_fraction is not None:
        k = max(2, round(1 / cfg.val_fraction))
        assignment = patient_folds(records, k, seed=cfg.seed)
        return [r for r, f in zip(records, assignment, strict=True) if f != 0], [
            r for r, f in zip(records, assignment, strict=True) if f == 0
        ]
    return split_fold(records, cfg.fold, cfg.folds, seed=cfg.seed)


def write_oof(path: Path, records: list[ImageRecord], pred: dict[str, np.ndarray]) -> None:
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


def loader(
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

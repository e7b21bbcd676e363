"""One optimiser step, validation predictions and figures, and how the best epoch is chosen."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pneumotriage.losses import ComboLoss
from pneumotriage.metrics import binary_metrics, roc_auc, threshold_for_sensitivity, youden_threshold
from pneumotriage.postprocess import Thresholds, triplet_keep
from pneumotriage.runtime import autocast_for
from pneumotriage.train.config import SELECTION_RULE


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


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
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
    batch = to_device(batch, device, fast)
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
        batch = to_device(batch, device, fast)
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


def better(new: list[float], old: list[float] | float | None) -> bool:
    if old is None:
        return True
    if not isinstance(old, list):  # a run started before ties were broken: its single figure
        old = [-math.inf if math.isnan(old) else float(old)]
    return new > old


def param_checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in model.parameters()))


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

"""Segmentation and classification losses: BCE + soft Dice + focal, weighted as in ``bce:3,dice:1,focal:4``."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from pneumotriage.errors import UsageError

LOSS_TERMS = ("bce", "dice", "focal")


def parse_loss(text: str) -> dict[str, float]:
    """``"bce:3,dice:1,focal:4"`` -> ``{"bce": 3.0, "dice": 1.0, "focal": 4.0}``; a bare name weighs 1."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, value = part.partition(":")
        name = name.strip().lower()
        if name not in LOSS_TERMS:
            raise UsageError(f"unknown loss term {name!r} in {text!r}; valid: {', '.join(LOSS_TERMS)}")
        try:
            weight = float(value) if value else 1.0
        except ValueError:
            raise UsageError(f"loss weight {value!r} for {name} is not a number") from None
        if weight < 0:
            raise UsageError(f"loss weight for {name} is negative")
        weights[name] = weights.get(name, 0.0) + weight
    if not any(weights.values()):
        raise UsageError(f"loss {text!r} has no term with a positive weight")
    return weights


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per image then averaged; an empty target with an empty prediction costs ~0."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017): BCE down-weighted by (1 - p_t)^gamma on easy pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


class ComboLoss(nn.Module):
    def __init__(self, weights: dict[str, float], pos_weight: float | None = None) -> None:
        super().__init__()
        self.weights = {k: v for k, v in weights.items() if v}
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        total = logits.new_zeros(())
        if "bce" in self.weights:
            pw = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
            total = total + self.weights["bce"] * F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
        if "dice" in self.weights:
            total = total + self.weights["dice"] * soft_dice_loss(logits, target)
        if "focal" in self.weights:
            total = total + self.weights["focal"] * focal_loss(logits, target)
        return total

"""Input scaling, part of every model so that callers always pass grey images in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn

from pneumotriage.normalisations import NORMALISATIONS


class Normalise(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in NORMALISATIONS:
            raise KeyError(f"unknown normalisation {name!r}; valid: {', '.join(NORMALISATIONS)}")
        self.name = name
        self.offset, self.scale = NORMALISATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset == 0.0 and self.scale == 1.0:
            return x
        return (x - self.offset) / self.scale

    def extra_repr(self) -> str:
        return self.name

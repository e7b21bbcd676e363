"""Input scaling, part of every model so that callers always pass grey images (B, 1, H, W), whatever the network
takes: one channel scaled by an offset and a scale, or (an RGB normalisation) the grey channel repeated on three,
each scaled by its own mean and standard deviation."""

from __future__ import annotations

import torch
from torch import nn

from pneumotriage.normalisations import NORMALISATIONS, RGB_NORMALISATIONS, names


class Normalise(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.rgb = name in RGB_NORMALISATIONS
        if self.rgb:
            mean, std = RGB_NORMALISATIONS[name]
            self.mean: torch.Tensor
            self.std: torch.Tensor
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            self.offset, self.scale = 0.0, 1.0
        elif name in NORMALISATIONS:
            self.offset, self.scale = NORMALISATIONS[name]
        else:
            raise KeyError(f"unknown normalisation {name!r}; valid: {', '.join(names())}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rgb:
            return (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if self.offset == 0.0 and self.scale == 1.0:
            return x
        return (x - self.offset) / self.scale

    def extra_repr(self) -> str:
        return self.name

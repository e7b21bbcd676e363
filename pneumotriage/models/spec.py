"""What a model is, apart from its weights: :class:`ModelSpec` (enough to rebuild the network), the default
operating thresholds, and :class:`LoadedModel` (a network with its spec, thresholds and provenance).

A leaf of :mod:`pneumotriage.models`: the checkpoint loader and the ensembles both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.models.classifiers import CLASSIFIERS
from pneumotriage.models.encoders import ENCODERS
from pneumotriage.models.segmenters import SEGMENTERS
from pneumotriage.normalisations import NORMALISATIONS
from pneumotriage.postprocess import Thresholds

#: Default operating thresholds by model kind (:class:`~pneumotriage.postprocess.Thresholds`' defaults), used
#: until validation (or ``pneumotriage tune``) chooses others: a classifier holds the gate, a segmenter the rest.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "classifier": {"gate": Thresholds().gate},
    "segmenter": {k: v for k, v in Thresholds().as_dict().items() if k != "gate"},
}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: enough to rebuild a model from a state dict."""

    kind: str  # "classifier" | "segmenter"
    arch: str
    encoder: str | None = None
    input_size: int = 512
    normalisation: str = "imagenet"
    outputs: int = 1
    output_index: int = 0
    empty_head: bool = False

    def __post_init__(self) -> None:
        if self.kind == "classifier":
            _check(self.arch, CLASSIFIERS, "classifier")
        elif self.kind == "segmenter":
            _check(self.arch, SEGMENTERS, "segmenter")
            _check(self.encoder or "", ENCODERS, "encoder")
        else:
            raise UsageError(f"unknown model kind {self.kind!r}; valid: classifier, segmenter")
        _check(self.normalisation, NORMALISATIONS, "normalisation")
        if self.input_size < 32:
            raise UsageError(f"input size {self.input_size} is below 32 pixels")

    @property
    def title(self) -> str:
        return f"{self.arch}/{self.encoder}" if self.encoder else self.arch


def _check(name: str, registry: dict[str, Any], what: str) -> None:
    if name not in registry:
        raise UsageError(f"unknown {what} {name!r}; valid: {', '.join(registry)}")


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint or a registry weight, in eval mode, with what describes it."""

    model: nn.Module
    spec: ModelSpec
    thresholds: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None
    name: str | None = None
    #: An ensemble's members (:mod:`pneumotriage.models.ensemble`); empty for one model.
    members: list[LoadedModel] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> Any:
        return self.model(x)

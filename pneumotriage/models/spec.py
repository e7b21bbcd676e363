"""What a model is, apart from its weights: :class:`ModelSpec` (enough to rebuild the network), the default
operating thresholds, and :class:`LoadedModel` (a network with its spec, thresholds and provenance).

A leaf of :mod:`pneumotriage.models`: the checkpoint loader and the ensembles both build on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.models.classifiers import CLASSIFIERS
from pneumotriage.models.encoders import ENCODERS
from pneumotriage.models.foreign import ACTIVATIONS, RUNTIMES
from pneumotriage.models.segmenters import SEGMENTERS
from pneumotriage.models.smp_unet import SMP_ENCODERS
from pneumotriage.normalisations import known, names
from pneumotriage.pipelines import NATIVE, PIPELINES, InputKey
from pneumotriage.postprocess import Thresholds

#: Default operating thresholds by model kind (:class:`~pneumotriage.postprocess.Thresholds`' defaults), used
#: until validation (or ``pneumotriage tune``) chooses others: a classifier holds the gate, a segmenter the rest.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "classifier": {"gate": Thresholds().gate},
    "segmenter": {k: v for k, v in Thresholds().as_dict().items() if k not in ("gate", "review")},
}


CROPS = ("none", "centre", "ten")
#: Segmenters only ever converted from other projects' files (:mod:`pneumotriage.imports`), never trained here.
IMPORTED_SEGMENTERS = {
    "smp_unet": "segmentation_models_pytorch's Unet",
    "smp_unetplusplus": "segmentation_models_pytorch's UnetPlusPlus",
}
#: Classifiers likewise only ever converted (their networks differ from the trainable ones of the same name).
IMPORTED_CLASSIFIERS = {"densenet121_keras": "Keras 2.1.4's DenseNet121 (CheXNet-Keras)"}


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
    #: How its input is made from a DICOM (:data:`pneumotriage.pipelines.PIPELINES`): the tool's own for a model
    #: trained here, the publisher's for an imported one.
    pipeline: str = NATIVE
    #: A classifier's test-time crops of ``crop_size`` from its ``input_size`` input, probabilities averaged:
    #: "none", "centre" (torchvision's CenterCrop) or "ten" (TenCrop: four corners and the centre, and the same
    #: of the mirrored image).
    crops: str = "none"
    crop_size: int = 0
    #: What the chosen output is: a logit, or (a program brought through the generic door with its sigmoid
    #: inside) a probability already.
    activation: str = "logit"

    def __post_init__(self) -> None:
        if self.kind == "classifier":
            _check(self.arch, {**CLASSIFIERS, **IMPORTED_CLASSIFIERS, **RUNTIMES}, "classifier")
        elif self.kind == "segmenter":
            _check(self.arch, {**SEGMENTERS, **IMPORTED_SEGMENTERS, **RUNTIMES}, "segmenter")
            if self.arch not in RUNTIMES:
                _check(self.encoder or "", SMP_ENCODERS if self.arch in IMPORTED_SEGMENTERS else ENCODERS, "encoder")
        else:
            raise UsageError(f"unknown model kind {self.kind!r}; valid: classifier, segmenter")
        if not known(self.normalisation):
            raise UsageError(f"unknown normalisation {self.normalisation!r}; valid: {', '.join(names())}")
        _check(self.pipeline, PIPELINES, "input pipeline")
        if not isinstance(self.input_size, int) or self.input_size < 32:
            raise UsageError(f"input size {self.input_size} is below 32 pixels")
        if self.input_size > MAX_INPUT_SIZE:
            raise UsageError(f"input size {self.input_size} is over the {MAX_INPUT_SIZE} pixels a model may take")
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown output activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.activation != "logit" and self.arch not in RUNTIMES:
            raise UsageError("only a program brought through the generic door gives probabilities")
        if not 0 <= self.output_index < max(self.outputs, 1):
            raise UsageError(f"output index {self.output_index} is not among the model's {self.outputs} outputs")
        if self.crops not in CROPS:
            raise UsageError(f"unknown crops {self.crops!r}; valid: {', '.join(CROPS)}")
        if self.crops != "none" and not 32 <= self.crop_size <= self.input_size:
            raise UsageError(f"crop size {self.crop_size} is not between 32 and the input size {self.input_size}")
        if self.crops != "none" and self.kind != "classifier":
            raise UsageError("test-time crops are for classifiers only")

    @property
    def input_key(self) -> InputKey:
        """The input the scan makes for this model: its size by its pipeline."""
        return InputKey(self.input_size, self.pipeline)

    @property
    def title(self) -> str:
        return f"{self.arch}/{self.encoder}" if self.encoder else self.arch


#: The largest input a model may declare: the SIIM images are 1,024 px; 2,048 covers any chest model published.
MAX_INPUT_SIZE = 2048


def _check(name: str, registry: dict[str, Any], what: str) -> None:
    if name not in registry:
        raise UsageError(f"unknown {what} {name!r}; valid: {', '.join(registry)}")


def describe_module(
    model: nn.Module,
    spec: ModelSpec | None = None,
    thresholds: dict[str, float] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Give the module itself what describes it (those given): a checkpoint written from it, its export and the
    exported graph's metadata read them from the module (:func:`spec_of`, :func:`meta_of`)."""
    for name, value in (("spec", spec), ("thresholds", thresholds), ("meta", meta)):
        if value is not None:
            setattr(model, name, value)


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec :func:`describe_module` gave ``model``."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{type(model).__name__} was not built by pneumotriage: it has no ModelSpec")
    return spec


def meta_of(model: nn.Module) -> dict[str, Any]:
    """The meta :func:`describe_module` gave ``model`` (empty where none)."""
    meta = getattr(model, "meta", None)
    return meta if isinstance(meta, dict) else {}


class Deferred:
    """A network not built yet: how to build it. A :class:`LoadedModel` given one builds it when its ``model`` is
    first read, so that a scan whose backend runs an exported graph never builds (nor imports torchvision for)
    the torch network."""

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        self.build = build


class LoadedModel:
    """A model rebuilt from a checkpoint or a registry weight, in eval mode, with what describes it.

    ``model`` is the network; given as a :class:`Deferred`, it is built the first time it is read (once, whichever
    thread reads it first). ``members``: an ensemble's (:mod:`pneumotriage.models.ensemble`); empty for one model.
    """

    def __init__(
        self,
        model: nn.Module | Deferred,
        spec: ModelSpec,
        thresholds: dict[str, float],
        meta: dict[str, Any] | None = None,
        path: Path | None = None,
        sha256: str | None = None,
        name: str | None = None,
        members: list[LoadedModel] | None = None,
    ) -> None:
        self._network = model
        self.spec, self.thresholds, self.meta = spec, thresholds, meta if meta is not None else {}
        self.path, self.sha256, self.name = path, sha256, name
        self.members: list[LoadedModel] = members if members is not None else []

    @property
    def model(self) -> nn.Module:
        network = self._network
        if isinstance(network, Deferred):
            with _BUILDING:
                if isinstance(self._network, Deferred):  # not built by another thread meanwhile
                    self._network = self._network.build()
                network = self._network
        assert isinstance(network, nn.Module)
        return network

    @property
    def built(self) -> bool:
        """Whether the network exists yet (reading ``model`` builds it)."""
        return not isinstance(self._network, Deferred)

    def with_model(self, model: nn.Module | Deferred) -> LoadedModel:
        """The same description over another network (a prepared copy, a runtime's)."""
        return LoadedModel(
            model, self.spec, self.thresholds, self.meta, self.path, self.sha256, self.name, self.members
        )

    def __call__(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def __repr__(self) -> str:
        network = type(self._network).__name__ if self.built else "not built yet"
        return f"LoadedModel({self.name or self.spec.title!r}, {network}, sha256={str(self.sha256)[:12]})"


_BUILDING = threading.RLock()  # re-entered: a prepared copy or an ensemble builds the networks it is made of

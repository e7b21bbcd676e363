"""Models of the cascade, their registries, and the one self-describing checkpoint format.

- Classifiers (:data:`CLASSIFIERS`): ``densenet121`` (CheXNet-style, default), ``resnet50``, ``resnet34``,
  ``efficientnet_b0``, ``densenet_mini`` (a compact DenseNet without ImageNet weights, for the synthetic demo).
- Segmenters (:data:`SEGMENTERS`): ``unet``, ``unetpp``, ``double_unet``, each over an encoder of
  :data:`ENCODERS`: ``vgg19_bn``, ``resnet34``, ``efficientnet_b0``, ``densenet121``, ``densenet_mini``.

A checkpoint is a plain dict (loadable with ``torch.load(..., weights_only=True)``): what to build
(:class:`ModelSpec`), the operating thresholds, the training config, a fingerprint of the training data, the
validation metrics, the package version and the state dict. :func:`load_model` rebuilds the model from it.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes, sha256_file
from pneumotriage.models.classifiers import CLASSIFIERS, Classifier
from pneumotriage.models.encoders import ENCODERS
from pneumotriage.models.foreign import RUNTIMES, ForeignProgram
from pneumotriage.models.segmenters import SEGMENTERS, Segmenter
from pneumotriage.models.smp_unet import SMP_ARCHS
from pneumotriage.models.spec import (
    DEFAULT_THRESHOLDS,
    Deferred,
    LoadedModel,
    ModelSpec,
    describe_module,
    meta_of,
    spec_of,
)
from pneumotriage.version import __version__
from pneumotriage.weights import WeightError, load_state_dict

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_THRESHOLDS",
    "ENCODERS",
    "SEGMENTERS",
    "Classifier",
    "Deferred",
    "LoadedModel",
    "ModelSpec",
    "Segmenter",
    "build_model",
    "describe_module",
    "imagenet_state",
    "load_model",
    "load_models",
    "meta_of",
    "save_checkpoint",
    "spec_of",
]

CHECKPOINT_FORMAT = "pneumotriage-checkpoint"
CHECKPOINT_VERSION = 1


def imagenet_state(backbone: str, *, home: str | Path | None = None) -> dict[str, Any] | None:
    """The ImageNet state dict of a torchvision backbone if its registry weight is in the verified cache, else None.

    Never downloads: ``pneumotriage weights fetch <backbone>-imagenet`` does that.
    """
    from pneumotriage.weights import WeightCache, load_registry

    try:
        registry = load_registry()
    except WeightError:
        return None
    spec = next((s for s in registry.values() if s.kind == "backbone" and s.arch == backbone), None)
    if spec is None:
        return None
    cache = WeightCache(registry, home)
    if cache.status(spec).status == "missing":
        return None
    return load_state_dict(cache.require(spec))


def build_model(spec: ModelSpec, *, pretrained: bool = False) -> nn.Module:
    """A fresh model; with ``pretrained`` the encoder/backbone starts from cached ImageNet weights when present.

    The model carries ``spec`` (and, once loaded from a checkpoint, ``thresholds`` and ``meta``).
    """
    model: nn.Module
    if spec.arch in RUNTIMES:  # a program brought through the generic door: its bytes come with the checkpoint
        model = ForeignProgram(
            spec.arch,
            spec.kind,
            normalisation=spec.normalisation,
            output_index=spec.output_index,
            activation=spec.activation,
        )
        state = None
    elif spec.kind == "classifier":
        state = imagenet_state(spec.arch) if pretrained else None
        model = Classifier(
            spec.arch,
            state,
            outputs=spec.outputs,
            output_index=spec.output_index,
            normalisation=spec.normalisation,
            crops=spec.crops,
            crop_size=spec.crop_size,
        )
    else:
        assert spec.encoder is not None
        if spec.arch in SMP_ARCHS:  # only ever imported: no ImageNet start
            model = SMP_ARCHS[spec.arch](spec.encoder, None, normalisation=spec.normalisation)
            state = None
        else:
            state = imagenet_state(ENCODERS[spec.encoder].backbone) if pretrained else None
            model = SEGMENTERS[spec.arch](
                spec.encoder, state, empty_head=spec.empty_head, normalisation=spec.normalisation
            )
    describe_module(model, spec, dict(DEFAULT_THRESHOLDS[spec.kind]), {"pretrained": state is not None})
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


#: What every output says of a model trained, even in part, on synthetic phantoms.
SYNTHETIC_NOTE = "trained on synthetic images"


def provenance(synthetic_share: float) -> dict[str, Any]:
    """The checkpoint fields that say what a model was trained on: the share of synthetic images among its
    training images, and for any share above 0, ``clinical: false`` with :data:`SYNTHETIC_NOTE`."""
    share = round(float(synthetic_share), 4)
    if share > 0:
        return {"synthetic_share": share, "clinical": False, "note": SYNTHETIC_NOTE}
    return {"synthetic_share": share}


def checkpoint_dict(
    model: nn.Module,
    *,
    thresholds: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    metrics: dict[str, Any] | None = None,
    epoch: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    bare = unwrap(model)
    spec = spec_of(bare)
    state = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        **asdict(spec),
        "thresholds": dict(thresholds if thresholds is not None else getattr(bare, "thresholds", {})),
        "config": dict(config or {}),
        "data_fingerprint": data_fingerprint,
        "metrics": dict(metrics or {}),
        "epoch": epoch,
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
        "state_dict": state,
    }


def save_checkpoint(path: str | Path, model: nn.Module, **fields: Any) -> Path:
    """Write a checkpoint atomically (see :func:`checkpoint_dict` for the fields)."""
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint_dict(model, **fields), buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


_SPEC_FIELDS = tuple(ModelSpec.__dataclass_fields__)


def load_model(
    name_or_path: str | Path, *, map_location: str | torch.device = "cpu", deferred: bool = False
) -> LoadedModel:
    """Rebuild a model from a pneumotriage checkpoint, or from a registry weight (name or file) holding a plain
    state dict, such as TorchXRayVision's ResNet50, or an ensemble file (:mod:`pneumotriage.models.ensemble`).
    Loading is ``weights_only``: a file cannot run code.

    ``deferred``: the network is built (and the weights checked against it) when it is first used, not now: a
    scan whose backend runs the graph exported from these same bytes before never builds it."""
    from pneumotriage.models.ensemble import is_ensemble_file, load_ensemble
    from pneumotriage.weights import resolve_verified

    candidate = Path(name_or_path)
    if candidate.suffix.lower() == ".json" and candidate.is_file() and is_ensemble_file(candidate):
        return load_ensemble(candidate, lambda member: load_model(member, map_location=map_location, deferred=deferred))
    if candidate.suffix.lower() == ".onnx" and candidate.is_file():  # written by export or quantize
        from pneumotriage.models.exported import load_onnx

        return load_onnx(candidate)
    path, registry_spec, verified = resolve_verified(name_or_path)
    data = load_state_dict(path, mapped=deferred)
    if data.get("format") == CHECKPOINT_FORMAT:
        version = data.get("format_version", 0)
        damaged = "a damaged checkpoint"
        if not isinstance(version, int) or isinstance(version, bool):
            raise WeightError(f"{damaged}: its format_version {version!r} is not a whole number", path=path)
        if version > CHECKPOINT_VERSION:
            raise WeightError(
                f"checkpoint format {version} is newer than this pneumotriage reads ({CHECKPOINT_VERSION})",
                path=path,
                hint="upgrade pneumotriage",
            )
        if not isinstance(data.get("state_dict"), dict):
            raise WeightError(f"{damaged}: it holds no state dict (no weights)", path=path)
        if not isinstance(data.get("thresholds", {}), dict):
            raise WeightError(f"{damaged}: its thresholds are not a table of names and values", path=path)
        try:
            spec = ModelSpec(**{k: data[k] for k in _SPEC_FIELDS if k in data})
        except (UsageError, TypeError, ValueError) as exc:
            raise WeightError(f"{damaged}: {exc}", path=path) from None
        state = data["state_dict"]
        thresholds = {**DEFAULT_THRESHOLDS[spec.kind], **data.get("thresholds", {})}
        meta = {k: v for k, v in data.items() if k != "state_dict"}
    elif registry_spec is not None and registry_spec.kind in ("classifier", "segmenter"):
        spec = ModelSpec(
            kind=registry_spec.kind,
            arch=registry_spec.arch,
            encoder=registry_spec.encoder,
            input_size=registry_spec.input_size,
            normalisation=registry_spec.normalisation,
            outputs=registry_spec.outputs or 1,
            output_index=registry_spec.output_index or 0,
            pipeline=registry_spec.pipeline,
        )
        state = data
        thresholds = {**DEFAULT_THRESHOLDS[spec.kind], **registry_spec.thresholds}
        meta = {"registry": registry_spec.name, "licence": registry_spec.licence, "clinical": registry_spec.clinical}
    else:
        raise WeightError(
            "not a pneumotriage checkpoint (no 'format' field) and not a registry model",
            path=path,
            hint="pass a best.pt/last.pt written by `pneumotriage train`, or a registry name",
        )
    if registry_spec is not None:
        # What the registry says of a weight (its name, licence, whether it may touch patients) holds whatever
        # the file's own format: the demo weights are pneumotriage checkpoints marked clinical = false there.
        # A file that says it is not clinical (trained on synthetic images) stays so whatever the registry says.
        clinical = registry_spec.clinical and bool(meta.get("clinical", True))
        meta.update(registry=registry_spec.name, licence=registry_spec.licence, clinical=clinical)

    def build() -> nn.Module:
        model = build_model(spec)
        target = model.get_submodule("backbone") if spec.kind == "classifier" and "format" not in data else model
        try:
            target.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise WeightError(f"weights do not fit a {spec.title}: {first}", path=path) from None
        describe_module(model, thresholds=thresholds, meta=meta)
        return model.to(map_location).eval()

    name = registry_spec.name if registry_spec is not None else None
    network = Deferred(build) if deferred else build()
    # A registry weight's sha256 is the one its cache check found (a stamp the file still matches): not hashed
    # again (~0.07 s for ResNet50's 94 MB).
    return LoadedModel(network, spec, thresholds, meta, path, verified or sha256_file(path), name)


def load_models(names: str | list[str] | None, kind: str, *, deferred: bool = False) -> LoadedModel | None:
    """The model ``names`` names (registry names, checkpoints or ensemble files) as one :class:`LoadedModel`:
    several make an ensemble of them (:func:`~pneumotriage.models.ensemble.ensemble_of`), none gives None. Each
    must be a ``kind`` ("classifier" or "segmenter"). ``deferred``: as :func:`load_model`'s."""
    from pneumotriage.models.ensemble import ensemble_of

    if not names:
        return None
    loaded = []
    for name in [names] if isinstance(names, str) else names:
        model = load_model(name, deferred=deferred)
        if model.spec.kind != kind:
            raise UsageError(f"--{kind} {name}: that is a {model.spec.kind}, not a {kind}")
        loaded.append(model)
    return ensemble_of(loaded)

"""Models brought from elsewhere: a public checkpoint file turned into a self-describing pneumotriage checkpoint
(``pneumotriage convert``), which scan, submit, evaluate and tune then take like their own.

What a converted checkpoint records, beside the weights: the source format and its publisher, the original file's
name and sha256, the output used (index and label among the model's findings), the input pipeline its publisher's
code feeds it (:mod:`pneumotriage.pipelines`; the scan makes exactly that input), the licence note that can be
known, and that it was trained by a third party on real images and has not been validated by pneumotriage. Whether
to use it on patients stays the user's decision: every output says so.

Formats (:data:`FORMATS`; told apart from the file itself, ``format=`` where it cannot be):

- ``xrv-densenet121``: TorchXRayVision ``densenet121-res224-all``, a whole ``nn.Module`` pickled with
  ``torch.save(model)``.
- ``xrv-resnet50``: TorchXRayVision ``resnet50-res512-all``, a torchvision ResNet50 state dict, one input channel.
- ``chexnet``: arnoweng/CheXNet and zoogzog/chexnet ``.pth.tar``: ``{"state_dict": ...}`` saved through
  ``nn.DataParallel`` (``module.densenet121.`` keys, torchvision's old ``norm.1`` layer names, no
  ``num_batches_tracked``), classifier ``Sequential(Linear(1024, 14), Sigmoid())``; TenCrop 224 from 256.
- ``chexnet-jrzech``: jrzech/reproduce-chexnet ``checkpoint``, a pickled dict holding a whole torchvision DenseNet
  under ``model``; centre crop 224.
- ``chexnet-keras``: brucechou1983/CheXNet-Keras (the original case study's classifier base), Keras 2 HDF5
  weights (``layer_names`` on the root, or under ``model_weights`` in a whole-model file): Keras 2.1.4's
  DenseNet121 (no ReLU after its last batch norm) and a ``Dense(14, sigmoid)`` named ``predictions``; read with
  h5py (the ``keras`` extra), kernels HWIO to OIHW, Keras's batch-norm epsilon folded into the variances.
- ``smp-unet``, ``smp-unet-2019``, ``smp-unetplusplus``, ``smp-pretrained``: a segmentation_models_pytorch
  ``Unet`` or ``UnetPlusPlus`` (encoders resnet34, resnet50, vgg19, vgg19_bn, densenet121, told from the tensors)
  as a state dict (``encoder.*``, ``decoder.blocks.N.conv1.0.weight`` or ``decoder.blocks.x_D_L...``,
  ``segmentation_head.0.*``; bare or under ``state_dict``), a Unet in smp <= 0.0.3's layout
  (``decoder.layer1.block.0.block.0.weight``, ``decoder.final_conv``), or a ``save_pretrained`` folder
  (``config.json`` + ``model.safetensors``, read here as plain data).

A whole-module pickle never runs code from the file: it is read by torch's weights-only unpickler with each class
these formats contain mapped onto an inert stand-in that only keeps its attributes (:class:`StandIn`); any other
global (``os.system``, ``builtins.eval``, a class of another package) is refused before anything is built.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumotriage.errors import UsageError
from pneumotriage.io import sha256_file
from pneumotriage.models import CHECKPOINT_FORMAT, DEFAULT_THRESHOLDS, ModelSpec, build_model, save_checkpoint
from pneumotriage.pipelines import PIPELINES
from pneumotriage.weights import READ_ERRORS, UnsafeWeightsError, WeightError, error_line

#: TorchXRayVision's ``datasets.default_pathologies``: its models' 18 outputs, in order.
XRV_LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
#: ChestX-ray14's 14 findings in CheXNet's output order.
CHESTXRAY14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class SourceFormat:
    """One public checkpoint format: what it is, whose it is, and how its publisher's code runs it."""

    name: str
    title: str
    publisher: str
    licence: str
    arch: str
    labels: tuple[str, ...]
    input_size: int
    pipeline: str
    normalisation: str
    crops: str = "none"
    crop_size: int = 0
    #: The publisher's operating point for the Pneumothorax output, where one is published.
    operating_point: float | None = None
    evaluation: str = ""
    kind: str = "classifier"

    @property
    def output_index(self) -> int:
        return self.labels.index("Pneumothorax")


FORMATS: dict[str, SourceFormat] = {
    f.name: f
    for f in (
        SourceFormat(
            "xrv-densenet121",
            "TorchXRayVision densenet121-res224-all (a pickled whole model)",
            "https://github.com/mlmed/torchxrayvision",
            "Apache-2.0 (TorchXRayVision, Cohen et al., MIDL 2022)",
            "densenet121",
            XRV_LABELS,
            224,
            "xrv",
            "unit",
            operating_point=0.0098118475,
            evaluation="one 224 px view; op_threshs[3] = 0.0098118475",
        ),
        SourceFormat(
            "xrv-resnet50",
            "TorchXRayVision resnet50-res512-all (a state dict)",
            "https://github.com/mlmed/torchxrayvision",
            "Apache-2.0 (TorchXRayVision, Cohen et al., MIDL 2022)",
            "resnet50",
            XRV_LABELS,
            512,
            "xrv",
            "unit",
            operating_point=0.50723547,
            evaluation="one 512 px view; op_threshs[3] = 0.50723547",
        ),
        SourceFormat(
            "chexnet",
            "CheXNet in PyTorch, arnoweng/CheXNet or zoogzog/chexnet (.pth.tar)",
            "https://github.com/arnoweng/CheXNet",
            "none stated (arnoweng/CheXNet has no licence file): ask the publisher before any use",
            "densenet121",
            CHESTXRAY14_LABELS,
            256,
            "png8",
            "imagenet-rgb",
            crops="ten",
            crop_size=224,
            evaluation="Resize(256), TenCrop(224), the ten probabilities averaged",
        ),
        SourceFormat(
            "chexnet-jrzech",
            "CheXNet reproduced, jrzech/reproduce-chexnet (a pickled dict holding the model)",
            "https://github.com/jrzech/reproduce-chexnet",
            "BSD-3-Clause (jrzech/reproduce-chexnet)",
            "densenet121",
            CHESTXRAY14_LABELS,
            224,
            "png8",
            "imagenet-rgb",
            evaluation="Resize(224), CenterCrop(224)",
        ),
        SourceFormat(
            "chexnet-keras",
            "CheXNet-Keras, brucechou1983/CheXNet-Keras (Keras 2 HDF5 weights)",
            "https://github.com/brucechou1983/CheXNet-Keras",
            "MIT (brucechou1983/CheXNet-Keras)",
            "densenet121_keras",
            CHESTXRAY14_LABELS,
            224,
            "png8-skimage",
            "imagenet-rgb",
            evaluation="one 224 px view of the whole image (its generator: RGB /255, skimage resize, ImageNet "
            "mean/std)",
        ),
        *(
            SourceFormat(
                name,
                title,
                "https://github.com/qubvel-org/segmentation_models_pytorch (the network trained by whoever saved it)",
                "that of whoever trained it (segmentation_models_pytorch itself is MIT): ask them",
                arch,
                ("Pneumothorax",),
                512,
                "png8-square",
                "imagenet-rgb",
                evaluation="one view, the whole image resized to the model's square",
                kind="segmenter",
            )
            for name, arch, title in (
                ("smp-unet", "smp_unet", "segmentation_models_pytorch Unet (a state dict)"),
                (
                    "smp-unet-2019",
                    "smp_unet",
                    "segmentation_models_pytorch <= 0.0.3 Unet (a state dict of the 2019 layout)",
                ),
                ("smp-unetplusplus", "smp_unetplusplus", "segmentation_models_pytorch UnetPlusPlus (a state dict)"),
                (
                    "smp-pretrained",
                    "smp_unet",
                    "segmentation_models_pytorch Unet or UnetPlusPlus (a save_pretrained folder)",
                ),
            )
        ),
    )
}

#: The classes a whole-module pickle of these formats holds, by the path it names them with.
_PICKLED_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torchvision.models.densenet.DenseNet",
    "torchvision.models.densenet._DenseBlock",
    "torchvision.models.densenet._DenseLayer",
    "torchvision.models.densenet._Transition",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.flatten.Flatten",
)


class StandIn:
    """An inert object in place of a pickled module: it keeps the attributes the pickle gives it and nothing
    else (no ``forward``, no hooks, no code of the file's classes)."""

    pickled_as = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from copyreg
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors, named as ``nn.Module.state_dict`` names them (non-persistent buffers left out)."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.__dict__.get("_non_persistent_buffers_set") or ())
        for group in ("_parameters", "_buffers"):
            for name, value in (self.__dict__.get(group) or {}).items():
                if isinstance(value, torch.Tensor) and name not in skip:
                    out[prefix + name] = value.detach()
        for name, child in (self.__dict__.get("_modules") or {}).items():
            if isinstance(child, StandIn):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out


def _stand_ins() -> list[tuple[type, str]]:
    made = []
    for path in _PICKLED_CLASSES:
        cls = type(path.rsplit(".", 1)[1], (StandIn,), {"pickled_as": path})
        made.append((cls, path))
    return made


#: Callables a legacy whole-module pickle may name besides its classes: torch's tensor and parameter rebuilders
#: and the containers of a module's state (storages are resolved by torch before this list is asked).
_LEGACY_CALLABLES = {
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "collections.OrderedDict",
    "builtins.set",
    "torch.Size",
}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that admits the known formats' classes as stand-ins and a few torch rebuilders, and
    refuses every other global before it is looked up (so nothing of it is imported, let alone called)."""

    _classes = {path: cls for cls, path in _stand_ins()}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 writes Python 2's name for the builtins module
        path = f"{'builtins' if module == '__builtin__' else module}.{name}"
        if path in self._classes:
            return self._classes[path]
        if path in _LEGACY_CALLABLES:
            return super().find_class(*path.rsplit(".", 1))
        raise _Refused(f"GLOBAL {path}")


class _RestrictedPickle:
    """What ``torch.load(pickle_module=...)`` uses: this module's unpickler for the legacy format's records."""

    __name__ = "pneumotriage.imports.restricted"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _pickle_problem(exc: Exception) -> str:
    """The line of torch's weights-only error that says what was wrong (it wraps it in paragraphs of advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    found = next((ln for ln in lines if "error:" in ln.lower() or "load key" in ln), lines[0] if lines else "")
    return found.split("error:", 1)[-1].strip() or type(exc).__name__


def _refused(path: Path, message: str) -> UnsafeWeightsError:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    what = f"names {found.group(1)}" if found else "holds objects"
    return UnsafeWeightsError(
        f"refused: its pickle {what}, which no checkpoint of the known formats contains; nothing from it ran",
        path=path,
        hint="convert only files from their publishers; --format lists the known ones",
    )


def load_restricted(path: Path) -> Any:
    """A checkpoint file read without running code from it: torch's weights-only unpickler, with the known
    formats' module classes as :class:`StandIn` objects; a whole model pickled in torch's legacy format (its
    classes recorded as sources, which the weights-only reader does not take) by :class:`_RestrictedUnpickler`.
    A file naming any other global is refused with :class:`~pneumotriage.weights.UnsafeWeightsError`."""
    try:
        try:
            with torch.serialization.safe_globals(_stand_ins()):  # type: ignore[arg-type]
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "GLOBAL" in str(exc):
                raise _refused(path, str(exc)) from None
            if "persistent_load" not in str(exc):
                raise WeightError(f"not a readable PyTorch checkpoint ({_pickle_problem(exc)})", path=path) from None
        with warnings.catch_warnings():
            # torch warns when a pickled class's recorded source differs from the class it loads (a stand-in)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except _Refused as exc:
        raise _refused(path, str(exc)) from None
    except FileNotFoundError:
        raise WeightError("no such file", path=path) from None
    except IsADirectoryError:
        raise WeightError("is a folder, not a checkpoint file", path=path) from None
    except (pickle.UnpicklingError, *READ_ERRORS) as exc:
        raise WeightError(f"not a readable PyTorch checkpoint ({error_line(exc)})", path=path) from None


#: The signature of an HDF5 file (Keras 2's ``.h5``), at offset 0 or after a user block of 512 bytes times 2**k.
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Keras's batch-norm epsilon in its DenseNet (torch's is 1e-5).
KERAS_BN_EPSILON = 1.001e-5


@dataclass(frozen=True)
class KerasWeights:
    """What a Keras 2 HDF5 file holds: each layer's arrays in its ``weight_names`` order (not matched by exact
    name: TensorFlow 1 could add suffixes), by layer name."""

    layers: dict[str, list[np.ndarray]]
    keras_version: str
    whole_model: bool


def is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            for offset in (0, 512, 1024, 2048, 4096):
                fh.seek(offset)
                if fh.read(8) == HDF5_MAGIC:
                    return True
    except OSError:
        return False
    return False


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_keras(path: Path) -> KerasWeights:
    """A Keras 2 HDF5 weights or whole-model file, read as the plain arrays it holds (nothing in it runs)."""
    try:
        import h5py
    except ImportError:
        raise UsageError(
            "a Keras HDF5 file: reading it needs h5py, which is not installed",
            path=path,
            hint="pip install 'pneumotriage[keras]'",
        ) from None
    try:
        with h5py.File(path, "r") as f:
            whole = "layer_names" not in f.attrs and "model_weights" in f
            root = f["model_weights"] if whole else f
            if "layer_names" not in root.attrs:
                raise WeightError("an HDF5 file without Keras's layer_names: not Keras weights", path=path)
            layers: dict[str, list[np.ndarray]] = {}
            for raw in root.attrs["layer_names"]:
                group = root[_text(raw)]
                names = [_text(w) for w in group.attrs.get("weight_names", [])]
                layers[_text(raw)] = [np.asarray(group[w], dtype=np.float32) for w in names]
            version = _text(root.attrs.get("keras_version", f.attrs.get("keras_version", "unknown")))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise WeightError(f"not a readable Keras HDF5 file ({error_line(exc)})", path=path) from None
    return KerasWeights(layers, version, whole)


_KERAS_DENSE = re.compile(r"^conv(\d)_block(\d+)_([012])_(bn|conv)$")
_KERAS_POOL = re.compile(r"^pool(\d)_(bn|conv)$")
_KERAS_STEPS = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2", ("2", "conv"): "conv2"}


def _keras_module(layer: str) -> str | None:
    """The torchvision DenseNet module a Keras DenseNet121 layer is (by Keras's layer names), or None."""
    fixed = {"conv1/conv": "features.conv0", "conv1/bn": "features.norm0", "bn": "features.norm5"}
    if layer in fixed:
        return fixed[layer]
    if layer == "predictions":
        return "classifier"
    match = _KERAS_DENSE.match(layer)
    if match:
        block, index, step, kind = match.groups()
        part = _KERAS_STEPS.get((step, kind))
        return f"features.denseblock{int(block) - 1}.denselayer{index}.{part}" if part else None
    match = _KERAS_POOL.match(layer)
    if match:
        return f"features.transition{int(match.group(1)) - 1}.{'norm' if match.group(2) == 'bn' else 'conv'}"
    return None


def _keras_densenet_state(weights: KerasWeights, path: Path) -> dict[str, torch.Tensor]:
    """A Keras DenseNet121's weights under torchvision's names: convolution kernels HWIO to OIHW, the dense kernel
    transposed, batch norm's gamma/beta/moving mean/moving variance with Keras's epsilon folded into the variance
    (torch adds 1e-5, Keras 1.001e-5: the same division)."""
    if "predictions" not in weights.layers:
        raise UsageError(
            "this Keras file has no 'predictions' layer (CheXNet-Keras's Dense(14) head); an early CheXNet-Keras "
            "with one head per finding is not read here",
            path=path,
        )
    out: dict[str, torch.Tensor] = {}
    for layer, arrays in weights.layers.items():
        if not arrays:
            continue  # inputs, activations, padding, pooling, concatenations
        module = _keras_module(layer)
        if module is None:
            out[f"{layer} (a Keras layer)"] = torch.from_numpy(arrays[0])
            continue
        shapes = [a.shape for a in arrays]
        if module == "classifier":
            if len(arrays) != 2 or arrays[0].ndim != 2:
                raise WeightError(f"Keras layer {layer!r} holds {shapes}, not a dense kernel and bias", path=path)
            out["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(arrays[0].T))
            out["classifier.bias"] = torch.from_numpy(arrays[1])
        elif layer.endswith("conv"):
            if len(arrays) != 1 or arrays[0].ndim != 4:
                raise WeightError(f"Keras layer {layer!r} holds {shapes}, not one bias-free kernel", path=path)
            out[f"{module}.weight"] = torch.from_numpy(np.ascontiguousarray(arrays[0].transpose(3, 2, 0, 1)))
        else:
            if len(arrays) != 4:
                raise WeightError(f"Keras layer {layer!r} holds {shapes}, not gamma, beta, mean, variance", path=path)
            gamma, beta, mean, var = arrays
            out[f"{module}.weight"] = torch.from_numpy(gamma)
            out[f"{module}.bias"] = torch.from_numpy(beta)
            out[f"{module}.running_mean"] = torch.from_numpy(mean)
            out[f"{module}.running_var"] = torch.from_numpy(var + np.float32(KERAS_BN_EPSILON - 1e-5))
            out[f"{module}.num_batches_tracked"] = torch.tensor(0)
    return out


def _tensors(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    return None


def detect(obj: Any) -> str | None:
    """The format of a loaded file (:data:`FORMATS`), or None where it cannot be told."""
    if isinstance(obj, StandIn) and obj.pickled_as == "torchxrayvision.models.DenseNet":
        return "xrv-densenet121"
    if isinstance(obj, KerasWeights):
        return "chexnet-keras" if "conv1/conv" in obj.layers else None
    if isinstance(obj, Mapping):
        model = obj.get("model")
        if isinstance(model, StandIn) and model.pickled_as == "torchvision.models.densenet.DenseNet":
            return "chexnet-jrzech"
        state = _tensors(obj.get("state_dict"))
        if state is not None and any(".densenet121.features." in k or k.startswith("densenet121.") for k in state):
            return "chexnet"
        if isinstance(obj.get(SMP_CONFIG), dict):
            return "smp-pretrained"
        state = _tensors(obj)
        if state is not None:
            conv, fc = state.get("conv1.weight"), state.get("fc.weight")
            if conv is not None and fc is not None and conv.shape[1] == 1 and tuple(fc.shape) == (18, 2048):
                return "xrv-resnet50"
        state = _smp_tensors(obj)
        if state is not None:
            if "decoder.final_conv.weight" in state:
                return "smp-unet-2019"
            if "decoder.blocks.x_0_0.conv1.0.weight" in state:
                return "smp-unetplusplus"
            if "segmentation_head.0.weight" in state:
                return "smp-unet"
    return None


#: The key under which :func:`read_source` puts a save_pretrained folder's config.json.
SMP_CONFIG = "__smp_config__"


def _smp_tensors(obj: Any) -> dict[str, torch.Tensor] | None:
    """An smp state dict, bare or as training scripts wrap it (``state_dict``/``model_state_dict``/``model``
    holding tensors; ``module.`` from DataParallel), or None."""
    for candidate in (
        obj,
        *(obj.get(k) for k in ("state_dict", "model_state_dict", "model") if isinstance(obj, Mapping)),
    ):
        state = _tensors(candidate)
        if state is not None and any(k.removeprefix("module.").startswith("encoder.") for k in state):
            return {k.removeprefix("module."): v for k, v in state.items()}
    return None


_OLD_SMP = re.compile(r"^decoder\.layer(\d)\.block\.(\d)\.block\.(\d)\.(.+)$")


def _smp_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """smp's 2019 layout under today's names: ``decoder.layerN.block.J.block.K`` is ``decoder.blocks.N-1.convJ+1.K``,
    and the 1x1 ``decoder.final_conv`` becomes the 3x3 head it equals (its kernel at the centre, zeros around)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _OLD_SMP.match(key)
        if match:
            block, conv, part, rest = match.groups()
            key = f"decoder.blocks.{int(block) - 1}.conv{int(conv) + 1}.{part}.{rest}"
        elif key == "decoder.final_conv.weight":
            kernel = torch.zeros(*value.shape[:2], 3, 3, dtype=value.dtype)
            kernel[:, :, 1, 1] = value[:, :, 0, 0]
            key, value = "segmentation_head.0.weight", kernel
        elif key == "decoder.final_conv.bias":
            key = "segmentation_head.0.bias"
        out[key] = value
    return out


_OLD_DENSE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _densenet_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision DenseNet names from any of the layouts: ``module.`` and ``densenet121.`` prefixes gone,
    old ``norm.1`` layer names joined (the rule torchvision's own loader uses), ``classifier.0`` (a
    ``Sequential(Linear, Sigmoid)``) as ``classifier``; missing ``num_batches_tracked`` counters added."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("densenet121.")
        match = _OLD_DENSE.match(key)
        if match:
            key = match.group(1) + match.group(2)
        key = re.sub(r"^classifier\.0\.", "classifier.", key)
        out[key] = value
    for key in [k for k in out if k.endswith(".running_var")]:
        out.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return out


def source_state(obj: Any, fmt: SourceFormat, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a loaded file of format ``fmt``, named as the project's network for it names them."""
    if fmt.name == "chexnet-keras":
        if not isinstance(obj, KerasWeights):
            raise UsageError("a chexnet-keras file is Keras 2 HDF5 weights; this one is not HDF5")
        return _keras_densenet_state(obj, path)
    if isinstance(obj, KerasWeights):
        raise UsageError(f"a {fmt.name} file is a PyTorch checkpoint; this one is Keras HDF5")
    if fmt.name == "xrv-densenet121":
        if not isinstance(obj, StandIn):
            raise UsageError("an xrv-densenet121 file is a pickled whole model; this one is not")
        return _densenet_keys(obj.state_dict())
    if fmt.name == "chexnet-jrzech":
        model = obj.get("model") if isinstance(obj, Mapping) else None
        if not isinstance(model, StandIn):
            raise UsageError("a chexnet-jrzech file is a dict holding a pickled model under 'model'; this one is not")
        return _densenet_keys(model.state_dict())
    if fmt.name == "chexnet":
        state = _tensors(obj.get("state_dict")) if isinstance(obj, Mapping) else None
        if state is None:
            raise UsageError("a chexnet file is a dict with a 'state_dict' of tensors; this one is not")
        return _densenet_keys(state)
    if fmt.kind == "segmenter":
        state = _tensors(obj.get("state")) if isinstance(obj, Mapping) and SMP_CONFIG in obj else _smp_tensors(obj)
        if state is None:
            raise UsageError(f"a {fmt.name} file is a state dict of an smp model (encoder.* keys); this one is not")
        return _smp_keys(state)
    state = _tensors(obj)
    if state is None:
        raise UsageError(f"a {fmt.name} file is a state dict of tensors; this one is not")
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors, read as the format defines it (an 8-byte header length, a JSON header
    of names, dtypes, shapes and byte ranges, then the bytes): plain data, nothing to unpickle."""
    import json
    import struct

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    dtypes |= {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
    dtypes |= {"BOOL": torch.bool}
    raw = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        base = 8 + length
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            data = bytearray(raw[base + begin : base + end])
            tensor = torch.frombuffer(data, dtype=dtypes[info["dtype"]]) if data else torch.empty(0)
            out[name] = tensor.reshape(info["shape"]).clone()
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise WeightError(f"not a readable safetensors file ({error_line(exc)})", path=path) from None
    return out


def read_source(path: Path) -> Any:
    """What a source path holds: a Keras HDF5 file (:func:`read_keras`), a checkpoint file read by
    :func:`load_restricted`, or an smp ``save_pretrained``
    folder as ``{SMP_CONFIG: its config.json, "state": its tensors}``."""
    import json

    if not path.is_dir():
        return read_keras(path) if is_hdf5(path) else load_restricted(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightError("a folder without config.json: not an smp save_pretrained folder", path=path)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightError(f"config.json is not readable JSON ({error_line(exc)})", path=config_file) from None
    if (path / "model.safetensors").is_file():
        state: Any = read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = load_restricted(path / "pytorch_model.bin")
    else:
        raise WeightError("holds neither model.safetensors nor pytorch_model.bin", path=path)
    return {SMP_CONFIG: config, "state": state}


#: smp's class names in a save_pretrained config -> the network rebuilt here.
SMP_CLASSES = {"Unet": "smp_unet", "UnetPlusPlus": "smp_unetplusplus"}


def _check_smp_config(config: Mapping[str, Any], path: Path) -> tuple[str, str]:
    """The network and encoder of a save_pretrained config this project reproduces, or a one-line refusal."""
    from pneumotriage.models.smp_unet import DECODER_CHANNELS, SMP_ENCODERS

    model_class = config.get("_model_class")
    if model_class not in SMP_CLASSES:
        raise UsageError(
            f"config.json has _model_class = {model_class!r}; only {' or '.join(SMP_CLASSES)} is read here", path=path
        )
    wanted = {
        "classes": 1,
        "in_channels": 3,
        "encoder_depth": 5,
        "decoder_channels": list(DECODER_CHANNELS),
        "decoder_attention_type": None,
        "decoder_interpolation": "nearest",
        "aux_params": None,
    }
    for key, value in wanted.items():
        got = config.get(key, value)  # absent: smp's default
        if (list(got) if isinstance(got, list | tuple) else got) != value:
            raise UsageError(f"config.json has {key} = {got!r}; only {value!r} is read here", path=path)
    if config.get("decoder_use_norm", config.get("decoder_use_batchnorm", True)) not in (True, "batchnorm"):
        raise UsageError("config.json: only a decoder with batch norm is read here", path=path)
    encoder = str(config.get("encoder_name"))
    if encoder not in SMP_ENCODERS:
        raise UsageError(f"config.json: encoder {encoder!r}; encoders read here: {', '.join(SMP_ENCODERS)}", path=path)
    return SMP_CLASSES[model_class], encoder


def fit_problem(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` from loading into a network whose state is ``expected``, in one line (counts and the
    first name of each kind), or None where it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not of this network (first {unexpected[0]})")
    if shaped:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} of another shape (first {k}: {tuple(given[k].shape)}, not {tuple(expected[k].shape)})"
        )
    return "; ".join(parts) or None


@dataclass(frozen=True)
class Converted:
    """What ``convert`` wrote: the checkpoint, its spec, and what it records of its source."""

    path: Path
    spec: ModelSpec
    imported: dict[str, Any]
    #: A classifier's probability gate; None for a segmenter.
    gate: float | None


def convert(
    source: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    crops: str | None = None,
    gate: float | None = None,
    input_size: int | None = None,
    normalisation: str | None = None,
    pipeline: str | None = None,
    kind: str | None = None,
    output_index: int | None = None,
    activation: str | None = None,
    label: str | None = None,
) -> Converted:
    """Turn a public checkpoint (a file, or an smp ``save_pretrained`` folder) into a pneumotriage checkpoint at
    ``out`` (atomically).

    A classifier's pipeline is its publisher's; ``crops`` chooses other test-time crops (``"centre"``, CheXNet's
    single-crop option) and ``gate`` the probability gate (default the publisher's operating point where one is
    published, else 0.5). A segmenter was trained by whoever saved it: ``input_size`` (default 512),
    ``normalisation`` (default ImageNet's, as smp's encoders are trained) and ``pipeline`` (default ``png8-square``)
    say how; its thresholds are the tool's defaults until ``pneumotriage tune`` chooses them on validation data.
    A TorchScript program or an ONNX graph goes through the generic door (:func:`convert_program`), where ``kind``,
    ``output_index``, ``activation`` and ``label`` complete the contract."""
    path = Path(source)
    if format is not None and format not in FORMATS and format not in GENERIC_FORMATS:
        raise UsageError(f"unknown format {format!r}; valid: {', '.join([*FORMATS, *GENERIC_FORMATS])}")
    runtime = format if format in GENERIC_FORMATS else program_format(path) if format is None else None
    if runtime is not None:
        return convert_program(
            path,
            out,
            runtime=runtime,
            kind=kind,
            input_size=input_size,
            pipeline=pipeline,
            normalisation=normalisation,
            output_index=output_index if output_index is not None else 0,
            activation=activation or "logit",
            label=label or "Pneumothorax",
            gate=gate,
        )
    if any(v is not None for v in (kind, output_index, activation, label)):
        raise UsageError("--kind, --output-index, --outputs and --label are for the generic door (torchscript, onnx)")
    obj = read_source(path)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        raise UsageError("already a pneumotriage checkpoint: scan takes it as it is", path=path)
    name = format or detect(obj)
    if name is None:
        raise UsageError(
            "cannot tell this file's format from its contents",
            path=path,
            hint=f"pass --format, one of {', '.join(FORMATS)}",
        )
    fmt = FORMATS[name]
    state = source_state(obj, fmt, path)
    if fmt.kind == "classifier":
        if input_size is not None or normalisation is not None or pipeline is not None:
            raise UsageError(
                f"{fmt.title}: its input is its publisher's pipeline ({fmt.pipeline} at {fmt.input_size} px); "
                "--input-size, --normalisation and --pipeline are for segmenters trained by others"
            )
        spec = ModelSpec(
            kind="classifier",
            arch=fmt.arch,
            input_size=fmt.input_size,
            normalisation=fmt.normalisation,
            outputs=len(fmt.labels),
            output_index=fmt.output_index,
            pipeline=fmt.pipeline,
            crops=crops or fmt.crops,
            crop_size=fmt.crop_size or (224 if crops and crops != "none" else 0),
        )
        target = build_model(spec)
        loads_into = target.get_submodule("backbone")
    else:
        if crops is not None or gate is not None:
            raise UsageError("--crops and --gate are for classifiers; tune a segmenter's thresholds with `tune`")
        if SMP_CONFIG in obj:
            arch, encoder = _check_smp_config(obj[SMP_CONFIG], path)
        else:
            arch, encoder = fmt.arch, _smp_encoder(state, fmt.arch, path)
        spec = ModelSpec(
            kind="segmenter",
            arch=arch,
            encoder=encoder,
            input_size=input_size or fmt.input_size,
            normalisation=normalisation or fmt.normalisation,
            pipeline=pipeline or fmt.pipeline,
        )
        target = build_model(spec)
        loads_into = target
    problem = fit_problem(loads_into.state_dict(), state)
    if problem:
        raise WeightError(
            f"its weights do not fit {fmt.title}: {problem}",
            path=path,
            hint=f"check --format (read as {name}; known: {', '.join(FORMATS)})",
        )
    loads_into.load_state_dict(state)
    thresholds = dict(DEFAULT_THRESHOLDS[fmt.kind])
    chosen = float(gate) if gate is not None else fmt.operating_point if fmt.operating_point is not None else 0.5
    if fmt.kind == "classifier":
        thresholds = {"gate": chosen}
    evaluation = fmt.evaluation
    if spec.crops != fmt.crops:
        evaluation += f"; here: {'one centre crop' if spec.crops == 'centre' else spec.crops} instead"
    imported = {
        "format": fmt.name,
        "title": fmt.title,
        "publisher": fmt.publisher,
        "licence": fmt.licence,
        "file": path.name,
        "sha256": _source_sha256(path),
        "output_index": fmt.output_index,
        "output_label": fmt.labels[fmt.output_index],
        "outputs": list(fmt.labels),
        "pipeline": spec.pipeline,
        "pipeline_steps": PIPELINES[spec.pipeline],
        "input_size": spec.input_size,
        "normalisation": spec.normalisation,
        "evaluation": evaluation,
        "gate_from": "given" if gate is not None else "publisher" if fmt.operating_point is not None else "default",
        "trained_by": "a third party, on real chest radiographs" if fmt.kind == "classifier" else "a third party",
        "validated_here": False,
    }
    note = (
        f"imported from {fmt.title}; trained by a third party, not validated by pneumotriage: "
        "clinical use is your decision"
    )
    written = save_checkpoint(
        out, target, thresholds=thresholds, extra={"imported": imported, "note": note, "licence": fmt.licence}
    )
    return Converted(written, spec, imported, chosen if fmt.kind == "classifier" else None)


#: The generic door's formats: a program whose input contract the user gives (:mod:`pneumotriage.models.foreign`).
GENERIC_FORMATS = {
    "torchscript": "a TorchScript program (torch.jit.save)",
    "onnx": "an ONNX graph",
}


def program_format(path: Path) -> str | None:
    """``torchscript`` for a TorchScript archive (a zip holding ``code/``), ``onnx`` for a ``.onnx`` file, else
    None (an ONNX file of another name cannot be told from a protobuf of anything else: ``--format onnx``)."""
    import zipfile

    if path.is_dir():
        return None
    if path.suffix.lower() == ".onnx":
        return "onnx"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return "torchscript" if any("/code/" in n or n.startswith("code/") for n in names) else None


def convert_program(
    source: str | Path,
    out: str | Path,
    *,
    runtime: str,
    kind: str | None,
    input_size: int | None,
    pipeline: str | None,
    normalisation: str | None,
    output_index: int = 0,
    activation: str = "logit",
    label: str = "Pneumothorax",
    gate: float | None = None,
) -> Converted:
    """The generic door: a TorchScript program or an ONNX graph, with its input contract given (``kind``,
    ``input_size``, ``pipeline``, ``normalisation``: none can be told from the file), run once on the declared
    input to check its output fits, and kept with its bytes in a pneumotriage checkpoint at ``out``."""
    from pneumotriage.models.foreign import (
        ACTIVATIONS,
        ForeignProgram,
        check_contract,
        outputs_of,
        run_once,
        runtime_version,
    )

    path = Path(source)
    title = GENERIC_FORMATS[runtime]
    missing = [
        flag
        for flag, value in (
            ("--kind", kind),
            ("--input-size", input_size),
            ("--pipeline", pipeline),
            ("--normalisation", normalisation),
        )
        if value is None
    ]
    if missing:
        raise UsageError(
            f"{title} does not say how its input is made: give {', '.join(missing)}",
            path=path,
            hint="e.g. --kind classifier --input-size 224 --pipeline png8 --normalisation imagenet-rgb",
        )
    assert kind is not None and input_size is not None and pipeline is not None and normalisation is not None
    if kind not in ("classifier", "segmenter"):
        raise UsageError(f"--kind {kind!r}: choose classifier or segmenter")
    if activation not in ACTIVATIONS:
        raise UsageError(f"--outputs {activation!r}: choose {' or '.join(ACTIVATIONS)}")
    if gate is not None and kind != "classifier":
        raise UsageError("--gate is for classifiers; tune a segmenter's thresholds with `tune`")
    if gate is not None and not (math.isfinite(gate) and 0.0 <= gate <= 1.0):
        raise UsageError(f"--gate {gate!r}: give a probability from 0 to 1")
    try:
        program = path.read_bytes()
    except FileNotFoundError:
        raise WeightError("no such file", path=path) from None
    except OSError as exc:
        raise WeightError(f"cannot be read ({error_line(exc)})", path=path) from None
    spec_fields = {"kind": kind, "arch": runtime, "input_size": input_size, "normalisation": normalisation}
    spec_fields |= {"pipeline": pipeline, "output_index": output_index, "activation": activation}
    try:
        model = ForeignProgram(
            runtime,
            kind,
            normalisation=normalisation,
            output_index=output_index,
            activation=activation,
            program=program,
        )
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    try:
        raw, given = run_once(model, input_size)
    except ValueError as exc:
        raise UsageError(
            f"{title} {exc}".replace(" it does not run", " does not run", 1),
            path=path,
            hint="check --input-size and --normalisation (one channel or three)",
        ) from None
    spec = ModelSpec(outputs=outputs_of(model, raw), **spec_fields)  # type: ignore[arg-type]
    try:
        checked = check_contract(model, raw, input_size, given)
    except ValueError as exc:
        raise UsageError(f"{title} does not keep the contract given: {exc}", path=path) from None
    model.spec = spec  # type: ignore[assignment]
    labels = [label if i == output_index else f"output {i}" for i in range(spec.outputs)]
    chosen = float(gate) if gate is not None else 0.5
    thresholds = {"gate": chosen} if kind == "classifier" else dict(DEFAULT_THRESHOLDS["segmenter"])
    imported = {
        "format": runtime,
        "title": f"{title}, its input contract given at convert",
        "publisher": "unknown to pneumotriage (given by whoever brought the file)",
        "licence": "unknown: that of whoever made the file; ask them",
        "file": path.name,
        "sha256": sha256_file(path),
        "output_index": output_index,
        "output_label": label,
        "outputs": labels,
        "output_activation": activation,
        "pipeline": pipeline,
        "pipeline_steps": PIPELINES[pipeline],
        "input_size": input_size,
        "normalisation": normalisation,
        "evaluation": f"one {input_size} px view, as given; checked at convert: {checked}",
        "runtime": runtime_version(runtime),
        "gate_from": "given" if gate is not None else "default",
        "trained_by": "a third party (unknown to pneumotriage)",
        "validated_here": False,
    }
    note = (
        f"imported as {title} with a contract given at convert; trained by a third party, not validated by "
        "pneumotriage: clinical use is your decision"
    )
    written = save_checkpoint(out, model, thresholds=thresholds, extra={"imported": imported, "note": note})
    return Converted(written, spec, imported, chosen if kind == "classifier" else None)


def _smp_encoder(state: Mapping[str, torch.Tensor], arch: str, path: Path) -> str:
    """The encoder of an smp state dict, told from its tensors: the one whose network (built without memory, on
    the meta device) has exactly these names and shapes under ``encoder.``."""
    from pneumotriage.models.smp_unet import SMP_ARCHS, SMP_ENCODERS

    given = {k: v for k, v in state.items() if k.startswith("encoder.")}
    for name in SMP_ENCODERS:
        with torch.device("meta"):
            expected = SMP_ARCHS[arch](name).state_dict()
        if fit_problem({k: v for k, v in expected.items() if k.startswith("encoder.")}, given) is None:
            return name
    raise UsageError(
        f"an smp network over an encoder not read here; encoders read here: {', '.join(SMP_ENCODERS)}", path=path
    )


def _source_sha256(path: Path) -> str:
    """The file's sha256; a save_pretrained folder's is that of its weights file."""
    if path.is_dir():
        weights = path / "model.safetensors"
        return sha256_file(weights if weights.is_file() else path / "pytorch_model.bin")
    return sha256_file(path)


__all__ = [
    "CHESTXRAY14_LABELS",
    "FORMATS",
    "GENERIC_FORMATS",
    "KerasWeights",
    "XRV_LABELS",
    "Converted",
    "StandIn",
    "convert",
    "convert_program",
    "detect",
    "load_restricted",
]

"""CheXNet-Keras's HDF5 weights read with h5py as the plain arrays they are (no Keras or TensorFlow), and
mapped onto torchvision's DenseNet121.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumotriage.errors import UsageError
from pneumotriage.weights import WeightError, error_line

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


def keras_densenet_state(weights: KerasWeights, path: Path) -> dict[str, torch.Tensor]:
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

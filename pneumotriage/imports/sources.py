"""A source file's tensors: its format told from its contents, its state dict in this tool's layout, and
why a state dict does not fit a network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pneumotriage.errors import UsageError
from pneumotriage.imports.formats import SourceFormat
from pneumotriage.imports.keras import KerasWeights, is_hdf5, keras_densenet_state, read_keras
from pneumotriage.imports.unpickle import StandIn, load_restricted
from pneumotriage.io import sha256_file
from pneumotriage.weights import WeightError, error_line


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
        return keras_densenet_state(obj, path)
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


def check_smp_config(config: Mapping[str, Any], path: Path) -> tuple[str, str]:
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


def smp_encoder(state: Mapping[str, torch.Tensor], arch: str, path: Path) -> str:
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


def source_sha256(path: Path) -> str:
    """The file's sha256; a save_pretrained folder's is that of its weights file."""
    if path.is_dir():
        weights = path / "model.safetensors"
        return sha256_file(weights if weights.is_file() else path / "pytorch_model.bin")
    return sha256_file(path)

"""Files shaped exactly like the public checkpoints (../shared/REAL-MODELS.md: key names, nesting, pickled classes,
serialisation format) with random weights, and the reference networks they hold, for the import tests. None of the
real files can be downloaded here; these reproduce their structure, not their weights."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
import torchvision.models.densenet as tvd
from torch import nn


def _densenet121(outputs: int, channels: int, *, sigmoid_head: bool, seed: int) -> tvm.DenseNet:
    torch.manual_seed(seed)
    net = tvm.densenet121(weights=None, num_classes=outputs)
    if channels == 1:
        net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    spread_batch_norm(net)
    if sigmoid_head:
        net.classifier = nn.Sequential(net.classifier, nn.Sigmoid())
    return net.eval()


def spread_batch_norm(net: nn.Module) -> None:
    """Batch-norm statistics that are not the identity, so that a wrong epsilon or a swapped tensor shows."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _pickled_as(module_name: str, classes: dict[type, str]) -> tuple[types.ModuleType, dict[type, type]]:
    """A module named ``module_name`` holding a subclass of each class under the given name (so that pickle
    records ``module_name.Name`` for it, as the publisher's own classes are recorded)."""
    module = types.ModuleType(module_name)
    made = {}
    for base, name in classes.items():
        cls = type(name, (base,), {"__module__": module_name, "__qualname__": name})
        setattr(module, name, cls)
        made[base] = cls
    return module, made


def xrv_densenet121_file(path: Path, seed: int = 0, *, extra: dict[str, Any] | None = None) -> nn.Module:
    """TorchXRayVision densenet121-res224-all: ``torch.save(model)`` of a whole ``torchxrayvision.models.DenseNet``
    (legacy serialisation, 1 channel, 18 outputs, modern layer names, an ``op_threshs`` buffer of None; ``extra``
    attributes on the model). Returns the reference network (torchvision's DenseNet121 with the same weights)."""
    ref = _densenet121(18, 1, sigmoid_head=False, seed=seed)
    copy = _densenet121(18, 1, sigmoid_head=False, seed=seed)
    bases = {tvd.DenseNet: "DenseNet", tvd._DenseBlock: "_DenseBlock", tvd._DenseLayer: "_DenseLayer"}
    bases[tvd._Transition] = "_Transition"
    package = types.ModuleType("torchxrayvision")
    module, made = _pickled_as("torchxrayvision.models", bases)
    package.models = module  # type: ignore[attr-defined]
    for m in copy.modules():
        if type(m) in made:
            m.__class__ = made[type(m)]
    copy.register_buffer("op_threshs", None)
    copy.__dict__.update(extra or {})
    saved = {k: sys.modules.get(k) for k in ("torchxrayvision", "torchxrayvision.models")}
    sys.modules.update({"torchxrayvision": package, "torchxrayvision.models": module})
    try:
        with _quiet():
            torch.save(copy, path, _use_new_zipfile_serialization=False)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return ref


def xrv_resnet50_file(path: Path, seed: int = 0, logit_spread: Any = None) -> nn.Module:
    """TorchXRayVision resnet50-res512-all: a plain torchvision ResNet50 state dict, ``conv1`` of one channel,
    ``fc`` of 18 outputs (zip serialisation). ``logit_spread(net)`` may rescale the Pneumothorax output."""
    torch.manual_seed(seed)
    net = tvm.resnet50(weights=None, num_classes=18)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    spread_batch_norm(net)
    net.eval()
    if logit_spread is not None:
        logit_spread(net)
    torch.save(net.state_dict(), path)
    return net


_NEW_DENSE = re.compile(r"^(.*denselayer\d+\.)(norm|relu|conv)([12])\.(weight|bias|running_mean|running_var)$")


def chexnet_file(path: Path, seed: int = 0, *, zoogzog: bool = False) -> nn.Module:
    """arnoweng/CheXNet ``model.pth.tar`` (or zoogzog's, with epoch, best_loss and optimizer beside it): a legacy
    pickle of a dict whose ``state_dict`` was saved through ``nn.DataParallel`` around a module holding
    ``densenet121``: ``module.densenet121.`` keys, old ``norm.1`` names, no ``num_batches_tracked``, classifier
    ``Sequential(Linear(1024, 14), Sigmoid())``. Returns the reference network (its output is a probability)."""
    ref = _densenet121(14, 3, sigmoid_head=True, seed=seed)
    state = OrderedDict()
    for key, value in ref.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _NEW_DENSE.match(key)
        if m:
            key = f"{m.group(1)}{m.group(2)}.{m.group(3)}.{m.group(4)}"
        state[f"module.densenet121.{key}"] = value.clone()
    data: dict[str, Any] = {"state_dict": state}
    if zoogzog:
        data.update(epoch=3, best_loss=torch.tensor(0.1523), optimizer={"state": {}, "param_groups": [{"lr": 1e-4}]})
    else:
        data.update(epoch=10, arch="densenet121", best_loss=0.15)
    torch.save(data, path, _use_new_zipfile_serialization=False)
    return ref


def jrzech_file(path: Path, seed: int = 0) -> nn.Module:
    """jrzech/reproduce-chexnet ``checkpoint``: a pickled dict ``{'model': <torchvision DenseNet>, 'best_loss',
    'epoch', 'rng_state', 'LR'}``, the model of torchvision 0.2's day (layers named ``norm.1``, ``conv.2``),
    classifier ``Sequential(Linear(1024, 14), Sigmoid())``."""
    ref = _densenet121(14, 3, sigmoid_head=True, seed=seed)
    copy = _densenet121(14, 3, sigmoid_head=True, seed=seed)
    for m in copy.modules():
        if isinstance(m, nn.BatchNorm2d):
            m._buffers.pop("num_batches_tracked")  # torch 0.4.0's batch norm kept no such counter
        if isinstance(m, tvd._DenseLayer):
            m._modules = OrderedDict(
                (re.sub(r"^(norm|relu|conv)([12])$", r"\1.\2", k), v) for k, v in m._modules.items()
            )
    data = {"model": copy, "best_loss": 0.1491, "epoch": 8, "rng_state": torch.get_rng_state(), "LR": 1e-5}
    with _quiet():
        torch.save(data, path, _use_new_zipfile_serialization=False)
    return ref


class _Payload:
    """Unpickling this calls ``os.system``: the shape of a malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def payload_files(folder: Path, marker: Path) -> list[Path]:
    """Checkpoints that would create ``marker`` if anything in them ran: a whole-module pickle of the
    TorchXRayVision layout with the payload among its attributes (legacy format), a CheXNet-style dict carrying it
    (zip format), and a bare payload."""
    command = f"touch {marker}"
    module_file = folder / "xrv-with-payload.pt"
    xrv_densenet121_file(module_file, extra={"notes": _Payload(command)})
    dict_file = folder / "chexnet-with-payload.pth.tar"
    torch.save(
        {"state_dict": {"module.densenet121.features.conv0.weight": torch.zeros(1)}, "x": _Payload(command)}, dict_file
    )
    bare = folder / "bare-payload.pt"
    torch.save(_Payload(command), bare)
    return [module_file, dict_file, bare]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.save warns that it cannot read the source of classes made at run time; that is expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def smp_unet_2019_state(modern: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A modern smp Unet state dict in smp <= 0.0.3's layout: ``decoder.blocks.N.convJ.K`` as
    ``decoder.layerN+1.block.J-1.block.K``, the 3x3 head as the 1x1 ``decoder.final_conv`` (its kernel's centre:
    the caller zeroes the rest, so that both describe the same network)."""
    out = {}
    for key, value in modern.items():
        m = re.match(r"^decoder\.blocks\.(\d)\.conv(\d)\.(\d)\.(.+)$", key)
        if m:
            block, conv, part, rest = m.groups()
            key = f"decoder.layer{int(block) + 1}.block.{int(conv) - 1}.block.{part}.{rest}"
        elif key == "segmentation_head.0.weight":
            key, value = "decoder.final_conv.weight", value[:, :, 1:2, 1:2].clone()
        elif key == "segmentation_head.0.bias":
            key = "decoder.final_conv.bias"
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# CheXNet-Keras: Keras 2.1.4 HDF5 weights of DenseNet121(include_top=False, pooling="avg") + Dense(14, sigmoid)

KERAS_BLOCKS = (6, 12, 24, 16)


def keras_densenet121_layers() -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """Every layer of CheXNet-Keras's model in Keras's order, with its weights' names and shapes (Keras 2.1.4,
    TensorFlow backend: ``<layer>/kernel:0``, batch norm's gamma, beta, moving_mean, moving_variance; layers
    without weights listed as Keras lists them)."""

    def conv(name: str, k: int, cin: int, cout: int) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
        return name, [(f"{name}/kernel:0", (k, k, cin, cout))]

    def bn(name: str, c: int) -> tuple[str, list[tuple[str, tuple[int, ...]]]]:
        return name, [(f"{name}/{w}:0", (c,)) for w in ("gamma", "beta", "moving_mean", "moving_variance")]

    layers = [("input_1", []), ("zero_padding2d_1", []), conv("conv1/conv", 7, 3, 64), bn("conv1/bn", 64)]
    layers += [("conv1/relu", []), ("zero_padding2d_2", []), ("pool1", [])]
    c = 64
    for b, n in enumerate(KERAS_BLOCKS, start=2):
        for i in range(1, n + 1):
            p = f"conv{b}_block{i}"
            layers += [bn(f"{p}_0_bn", c), (f"{p}_0_relu", []), conv(f"{p}_1_conv", 1, c, 128)]
            layers += [bn(f"{p}_1_bn", 128), (f"{p}_1_relu", []), conv(f"{p}_2_conv", 3, 128, 32), (f"{p}_concat", [])]
            c += 32
        if b < 5:
            layers += [bn(f"pool{b}_bn", c), (f"pool{b}_relu", []), conv(f"pool{b}_conv", 1, c, c // 2)]
            layers += [(f"pool{b}_pool", [])]
            c //= 2
    layers += [
        bn("bn", c),
        ("avg_pool", []),
        ("predictions", [("predictions/kernel:0", (c, 14)), ("predictions/bias:0", (14,))]),
    ]
    return layers


def keras_chexnet_file(path: Path, seed: int = 0, *, whole_model: bool = False, head: Any = None) -> None:
    """A CheXNet-Keras weights file (``model.save_weights``; ``whole_model``: ``model.save``, the same under a
    ``model_weights`` group): random He-scaled kernels, batch-norm statistics that are not the identity, and
    ``head`` = (kernel (1024, 14), bias (14,)) where given."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        if whole_model:
            f.attrs["model_config"] = b'{"class_name": "Model", "config": {"name": "model_1"}}'
            f.attrs["keras_version"], f.attrs["backend"] = b"2.1.4", b"tensorflow"
            root = f.create_group("model_weights")
        else:
            root = f
        layers = keras_densenet121_layers()
        root.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
        root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.1.4"
        for name, weights in layers:
            group = root.require_group(name)
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights], dtype="S")
            for wname, shape in weights:
                kind = wname.rsplit("/", 1)[1]
                if kind == "kernel:0" and len(shape) == 4:
                    value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
                elif kind == "kernel:0":
                    value = head[0] if head is not None else rng.normal(0, 0.05, shape)
                elif kind == "bias:0":
                    value = head[1] if head is not None else rng.normal(0, 0.1, shape)
                elif kind in ("gamma:0", "moving_variance:0"):
                    value = rng.uniform(0.5, 1.5, shape)
                else:
                    value = rng.normal(0, 0.1, shape)
                group.create_dataset(wname, data=np.asarray(value, dtype=np.float32))


def keras_reference_features(path: Path, x: Any) -> Any:
    """CheXNet-Keras's forward pass written in numpy from Keras's layer semantics (channels last, HWIO kernels read
    from the HDF5 file as Keras stores them), up to the 1024 pooled features: ZeroPadding2D(3), Conv 7x7/2,
    BN(eps 1.001e-5), ReLU, ZeroPadding2D(1), MaxPool 3/2; dense blocks of BN-ReLU-Conv1x1(128)-BN-ReLU-
    Conv3x3(32, same)-concat; transitions BN-ReLU-Conv1x1(half)-AvgPool 2/2; the last BN with no ReLU (Keras
    2.1.4); global average pool. ``x``: (N, 224, 224, 3) already normalised; float64 throughout."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        w = {
            name.decode(): [
                np.asarray(root[name.decode()][wn], dtype=np.float64)
                for wn in root[name.decode()].attrs["weight_names"]
            ]
            for name in root.attrs["layer_names"]
        }

    def conv(x: Any, k: Any, stride: int = 1, pad: int = 0) -> Any:
        if pad:
            x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        kh, kw = k.shape[:2]
        if kh == kw == 1 and stride == 1:
            return x @ k[0, 0]
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
        return np.tensordot(windows, k, axes=([3, 4, 5], [2, 0, 1]))  # windows: (N, H, W, C, kh, kw)

    def bn(x: Any, name: str) -> Any:
        gamma, beta, mean, var = w[name]
        return (x - mean) / np.sqrt(var + 1.001e-5) * gamma + beta

    def relu(x: Any) -> Any:
        return np.maximum(x, 0.0)

    x = relu(bn(conv(np.asarray(x, dtype=np.float64), w["conv1/conv"][0], 2, 3), "conv1/bn"))
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(4, 5))
    for b, n in enumerate(KERAS_BLOCKS, start=2):
        for i in range(1, n + 1):
            p = f"conv{b}_block{i}"
            y = conv(relu(bn(x, f"{p}_0_bn")), w[f"{p}_1_conv"][0])
            y = conv(relu(bn(y, f"{p}_1_bn")), w[f"{p}_2_conv"][0], 1, 1)
            x = np.concatenate([x, y], axis=3)
        if b < 5:
            x = conv(relu(bn(x, f"pool{b}_bn")), w[f"pool{b}_conv"][0])
            n_, h, w_, c = x.shape
            x = x.reshape(n_, h // 2, 2, w_ // 2, 2, c).mean(axis=(2, 4))
    return bn(x, "bn").mean(axis=(1, 2))

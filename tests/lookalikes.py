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

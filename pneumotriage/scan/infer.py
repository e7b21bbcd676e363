"""Stages 4 and 6, classify and segment: set the models up for inference on the device, and run them on a batch
(the classifier's probabilities; the segmenter's maps, with horizontal-flip TTA optional).

Set-up is where the CPU speed is won or lost: inference mode (no autograd bookkeeping), batch norm folded into
the convolutions, channels_last, one torch thread per core. On CUDA: channels_last and bf16 autocast.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pneumotriage.models import LoadedModel
from pneumotriage.models.backends import BackendChoice, choose
from pneumotriage.runtime import autocast_for, one_thread


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm2d that directly follows a Conv2d folded into it: in an
    ``nn.Sequential`` (conv-BN-ReLU blocks, VGG, EfficientNet) and in torchvision's ResNet stem and residual blocks
    (``convN`` then ``bnN``). Outputs agree to float rounding; on a CPU the separate normalisation pass over
    every feature map is saved (ResNet50 at 512 px: ~15 % of its time)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    folded = copy.deepcopy(module).eval()

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())

    for parent in list(folded.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names, names[1:], strict=False):
                fold(parent, first, second)
        elif isinstance(parent, BasicBlock | Bottleneck | ResNet):
            for i in (1, 2, 3):
                if hasattr(parent, f"conv{i}") and hasattr(parent, f"bn{i}"):
                    fold(parent, f"conv{i}", f"bn{i}")
    return folded


class FixedBatch(nn.Module):
    """A model compiled (``torch.compile``) for one batch shape: a smaller batch is padded with zeros and the
    outputs cut back, so compilation happens once, at the first batch, whatever the folder holds."""

    def __init__(self, net: nn.Module, batch: int) -> None:
        super().__init__()
        self.net = torch.compile(net, dynamic=False)
        self.batch = batch

    def forward(self, x: torch.Tensor) -> object:
        n = x.shape[0]
        if n < self.batch:
            pad = x.new_zeros(self.batch - n, *x.shape[1:])
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if n == self.batch:
            return out
        if isinstance(out, dict):
            return {k: v[:n] for k, v in out.items()}
        return out[:n]


def prepare_models(
    device: torch.device, *models: LoadedModel | None, compile_batch: int | None = None
) -> list[LoadedModel | None]:
    """The models ready for inference on ``device``, as copies (the caller's stay as they are): eval mode,
    batch norm folded into the convolutions, channels_last memory format (oneDNN's fast path on a CPU,
    tensor cores' on CUDA); with ``compile_batch``, compiled for batches of that many images (:class:`FixedBatch`)."""
    prepared: list[LoadedModel | None] = []
    for m in models:
        if m is None:
            prepared.append(None)
            continue
        # The same model prepared again for the same device (a node scanning study after study) is the copy made
        # before, while none of its weights has changed since (an in-place update bumps a tensor's version).
        key = _weights_key(device, m.model)
        kept = _PREPARED.get(m.model) if compile_batch is None and key is not None else None
        if kept is not None and kept[0] == key:
            prepared.append(replace(m, model=kept[1]))
            continue
        net = fold_batch_norm(m.model.eval()).to(device).to(memory_format=torch.channels_last)
        if compile_batch is not None:
            net = FixedBatch(net, compile_batch)
        elif key is not None:
            _PREPARED[m.model] = (key, net)
        prepared.append(replace(m, model=net))
    return prepared


def choose_backends(
    device: torch.device,
    *pairs: tuple[LoadedModel | None, LoadedModel | None],
    backend: str = "auto",
    batch: int = 1,
    threads: int = 1,
) -> tuple[list[LoadedModel | None], list[BackendChoice | None]]:
    """For each (model as loaded, as :func:`prepare_models` made it), the model to run and what runs it
    (:func:`pneumotriage.models.backends.choose`; exported graphs cached under the weights cache's home)."""
    from pneumotriage.weights import default_home

    home = default_home()
    ready: list[LoadedModel | None] = []
    choices: list[BackendChoice | None] = []
    for loaded, prepared in pairs:
        if loaded is None or prepared is None:
            ready.append(None)
            choices.append(None)
            continue
        net, chosen = choose(loaded, prepared.model, backend, device, batch=batch, threads=threads, home=home)
        ready.append(replace(prepared, model=net))
        choices.append(chosen)
    return ready, choices


def _weights_key(device: torch.device, model: nn.Module) -> tuple[object, ...] | None:
    """The device and the version of every weight of ``model``; None where a weight made under inference mode
    keeps no version (such a model is prepared afresh each time)."""
    tensors = (*model.parameters(), *model.buffers())
    if any(t.is_inference() for t in tensors):
        return None
    return (str(device), tuple(t._version for t in tensors))


#: Models prepared for inference, by the caller's model (forgotten with it): (device and weight versions, copy).
_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], nn.Module]] = weakref.WeakKeyDictionary()


def _input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def classify(model: LoadedModel, images: torch.Tensor, device: torch.device, *, bf16: bool | None = None) -> np.ndarray:
    """Pneumothorax probabilities (B,) of a (B, 1, S, S) batch."""
    with autocast_for(device, bf16):
        logits = model.model(_input(images, device))
    return torch.sigmoid(logits.float()).cpu().numpy()


def model_info(m: LoadedModel | None, role: str) -> dict[str, Any] | None:
    """What a scan records of a model (its signature, worklist.json, the report): name, architecture, sha256,
    pipeline, provenance."""
    if m is None:
        return None
    return {
        "role": role,
        "name": m.name or (m.path.name if m.path else None),
        "model": m.spec.title,
        "input_size": m.spec.input_size,
        "sha256": m.sha256,
        "clinical": bool(m.meta.get("clinical", True)),
        "note": m.meta.get("note"),
        "pipeline": m.spec.pipeline,
        **({"members": m.meta["members"]} if m.meta.get("members") else {}),
        **({"imported": m.meta["imported"]} if isinstance(m.meta.get("imported"), dict) else {}),
        **({"onnx": _onnx_info(m.meta["onnx"])} if isinstance(m.meta.get("onnx"), dict) else {}),
    }


def _onnx_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a model read from an ONNX file says of where it came from and, for an int8 one, its accuracy."""
    return {k: info[k] for k in ("source", "exported", "quantization") if k in info}


@torch.inference_mode()
def segment(
    model: LoadedModel, images: torch.Tensor, device: torch.device, tta: bool, *, bf16: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability maps (B, S, S) on the device and image-level scores (B,): the segmenter's own head where it
    has one, else the map's maximum."""
    x = _input(images, device)
    with autocast_for(device, bf16):
        out = model.model(x)
        flipped = model.model(torch.flip(x, dims=[3])) if tta else None
    with one_thread(device):
        probs = torch.sigmoid(out["mask"].float())[:, 0]
        if flipped is not None:
            probs = (probs + torch.flip(torch.sigmoid(flipped["mask"].float())[:, 0], dims=[2])) / 2
        present = torch.sigmoid(out["present"].float()) if "present" in out else probs.flatten(1).amax(1)
        return probs, present.float()

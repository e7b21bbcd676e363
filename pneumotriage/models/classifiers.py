"""Image-level classifiers: is there a pneumothorax? torchvision backbones with one input channel.

``forward(x)`` takes ``(B, 1, H, W)`` grey images (any size of at least 32; in [0, 1] from the tool's own pipeline)
and returns the pneumothorax logit ``(B,)``. A multi-label network (TorchXRayVision's 18 findings, CheXNet's 14)
keeps all its outputs and reports the one at ``output_index``. An imported three-channel network (an RGB
normalisation) keeps its RGB first convolution and sees the grey image on each channel; test-time crops
(CheXNet's TenCrop) average the crops' probabilities, as the publisher's evaluation does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from pneumotriage.models.encoders import densenet, grey_conv, torchvision_models
from pneumotriage.models.normalise import Normalise
from pneumotriage.normalisations import channels_of

Builder = Callable[[dict[str, Any] | None, int, bool], nn.Module]
"""(ImageNet state dict or None, number of outputs, one grey input channel or three) -> the network."""


def _densenet(name: str) -> Builder:
    def build(state: dict[str, Any] | None, outputs: int, grey: bool) -> nn.Module:
        return cast(nn.Module, densenet(name, state, outputs, grey=grey))

    return build


@functools.cache
def keras_densenet() -> type[nn.Module]:
    """The class of DenseNet121 as Keras 2.1.4 built it (made at first use: it subclasses torchvision's, whose
    import is left until a network is built)."""

    class KerasDenseNet(torchvision_models().DenseNet):  # type: ignore[misc]
        """DenseNet121 as Keras 2.1.4 built it (``keras.applications.DenseNet121``, CheXNet-Keras's base):
        torchvision's network with no ReLU between the last batch norm and the global average pool
        (keras-applications added one in 1.0.6, August 2018). Its weights are named as torchvision's; Keras's
        batch-norm epsilon (1.001e-5) is folded into the running variances when a file is converted."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = F.adaptive_avg_pool2d(self.features(x), (1, 1))
            out: torch.Tensor = self.classifier(torch.flatten(pooled, 1))
            return out

    return KerasDenseNet


def _keras_densenet121(state: dict[str, Any] | None, outputs: int, grey: bool) -> nn.Module:
    if state is not None or grey:
        raise ValueError("Keras's DenseNet121 is only ever imported, three-channel (pneumotriage convert)")
    return keras_densenet()(32, (6, 12, 24, 16), 64, num_classes=outputs)


def _resnet(depth: int) -> Builder:
    def build(state: dict[str, Any] | None, outputs: int, grey: bool) -> nn.Module:
        tvm = torchvision_models()
        net = {34: tvm.resnet34, 50: tvm.resnet50}[depth](weights=None)
        if state is not None:
            net.load_state_dict(state)
        if grey:
            net.conv1 = grey_conv(net.conv1)
        net.fc = nn.Linear(net.fc.in_features, outputs)
        return cast(nn.Module, net)

    return build


def _efficientnet_b0(state: dict[str, Any] | None, outputs: int, grey: bool) -> nn.Module:
    net = torchvision_models().efficientnet_b0(weights=None)
    if state is not None:
        net.load_state_dict(state)
    if grey:
        net.features[0][0] = grey_conv(net.features[0][0])
    head: nn.Sequential = net.classifier
    last = head[1]
    assert isinstance(last, nn.Linear)
    head[1] = nn.Linear(last.in_features, outputs)
    return cast(nn.Module, net)


#: arch -> builder.
CLASSIFIERS: dict[str, Builder] = {
    "densenet121": _densenet("densenet121"),
    "resnet50": _resnet(50),
    "resnet34": _resnet(34),
    "efficientnet_b0": _efficientnet_b0,
    "densenet_mini": _densenet("densenet_mini"),
}
#: arch -> builder, for the classifiers only ever converted from other projects' files (never trained here).
IMPORTED_CLASSIFIER_BUILDERS: dict[str, Builder] = {"densenet121_keras": _keras_densenet121}


def five_crops(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """torchvision's ``five_crop`` of a (B, C, H, W) batch: top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [
        x[..., :size, :size],
        x[..., :size, w - size :],
        x[..., h - size :, :size],
        x[..., h - size :, w - size :],
        x[..., top : top + size, left : left + size],
    ]


class Classifier(nn.Module):
    def __init__(
        self,
        arch: str = "densenet121",
        state: dict[str, Any] | None = None,
        *,
        outputs: int = 1,
        output_index: int = 0,
        normalisation: str = "imagenet",
        crops: str = "none",
        crop_size: int = 0,
    ) -> None:
        super().__init__()
        builders = {**CLASSIFIERS, **IMPORTED_CLASSIFIER_BUILDERS}
        if arch not in builders:
            raise KeyError(f"unknown classifier {arch!r}; valid: {', '.join(builders)}")
        if not 0 <= output_index < outputs:
            raise ValueError(f"output_index {output_index} is not among {outputs} outputs")
        self.normalise = Normalise(normalisation)
        self.backbone = builders[arch](state, outputs, channels_of(normalisation) == 1)
        self.output_index = output_index
        self.crops = crops
        self.crop_size = crop_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalise(x)
        if self.crops == "none":
            logits: torch.Tensor = self.backbone(x)
            return logits[:, self.output_index]
        if self.crops == "centre":
            crops = five_crops(x, self.crop_size)[4:]
        else:
            crops = five_crops(x, self.crop_size) + five_crops(torch.flip(x, dims=[-1]), self.crop_size)
        logits = self.backbone(torch.cat(crops))[:, self.output_index].float()
        # the publisher averages the crops' probabilities; the logit of that average goes on as any other logit
        p = torch.sigmoid(logits).view(len(crops), x.shape[0]).mean(0)
        return torch.logit(p.clamp(1e-7, 1 - 1e-7))

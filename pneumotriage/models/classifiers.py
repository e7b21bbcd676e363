"""Image-level classifiers: is there a pneumothorax? torchvision backbones with one input channel.

``forward(x)`` takes ``(B, 1, H, W)`` grey images in [0, 1] (any size of at least 32) and returns the
pneumothorax logit ``(B,)``. A multi-label network (TorchXRayVision's 18 findings) keeps all its outputs and
reports the one at ``output_index``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torchvision.models as tvm
from torch import nn

from pneumotriage.models.encoders import densenet, grey_conv
from pneumotriage.models.normalise import Normalise


def _densenet(name: str) -> Callable[[dict[str, Any] | None, int], nn.Module]:
    def build(state: dict[str, Any] | None, outputs: int) -> nn.Module:
        return cast(nn.Module, densenet(name, state, outputs))

    return build


def _resnet(depth: int) -> Callable[[dict[str, Any] | None, int], nn.Module]:
    def build(state: dict[str, Any] | None, outputs: int) -> nn.Module:
        net = {34: tvm.resnet34, 50: tvm.resnet50}[depth](weights=None)
        if state is not None:
            net.load_state_dict(state)
        net.conv1 = grey_conv(net.conv1)
        net.fc = nn.Linear(net.fc.in_features, outputs)
        return cast(nn.Module, net)

    return build


def _efficientnet_b0(state: dict[str, Any] | None, outputs: int) -> nn.Module:
    net = tvm.efficientnet_b0(weights=None)
    if state is not None:
        net.load_state_dict(state)
    net.features[0][0] = grey_conv(net.features[0][0])
    head: nn.Sequential = net.classifier
    last = head[1]
    assert isinstance(last, nn.Linear)
    head[1] = nn.Linear(last.in_features, outputs)
    return cast(nn.Module, net)


#: arch -> builder(ImageNet state dict or None, number of outputs).
CLASSIFIERS: dict[str, Callable[[dict[str, Any] | None, int], nn.Module]] = {
    "densenet121": _densenet("densenet121"),
    "resnet50": _resnet(50),
    "resnet34": _resnet(34),
    "efficientnet_b0": _efficientnet_b0,
    "densenet_mini": _densenet("densenet_mini"),
}


class Classifier(nn.Module):
    def __init__(
        self,
        arch: str = "densenet121",
        state: dict[str, Any] | None = None,
        *,
        outputs: int = 1,
        output_index: int = 0,
        normalisation: str = "imagenet",
    ) -> None:
        super().__init__()
        if arch not in CLASSIFIERS:
            raise KeyError(f"unknown classifier {arch!r}; valid: {', '.join(CLASSIFIERS)}")
        if not 0 <= output_index < outputs:
            raise ValueError(f"output_index {output_index} is not among {outputs} outputs")
        self.normalise = Normalise(normalisation)
        self.backbone = CLASSIFIERS[arch](state, outputs)
        self.output_index = output_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.backbone(self.normalise(x))
        return logits[:, self.output_index]

"""Segmentation encoders built from torchvision backbones, single-channel input.

The encoder contract: ``forward(x)`` takes ``(B, 1, H, W)`` with H and W divisible by 32 and returns five feature
maps, at strides 2, 4, 8, 16 and 32, whose channel counts are ``encoder.out_channels``. Decoders rely on exactly
that and on nothing else about the backbone.

ImageNet weights, when given, are loaded into the three-channel torchvision network first; the first convolution
is then reduced to one channel by summing its RGB weights, so a grey image normalised with the grey mean/std
gives that convolution the response it gave to the grey RGB image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    import torchvision.models as tvm


def torchvision_models() -> Any:
    """``torchvision.models``, imported when a network is first built. Importing torchvision imports
    ``torch._dynamo`` (through ``torchvision.ops``): ~1.3 s of a scan's start on a 2-core CPU, which a scan run
    by an exported graph never needs."""
    import torchvision.models

    return torchvision.models


def grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` that takes one channel, with the RGB weights summed."""
    new = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def load_backbone_state(net: nn.Module, state: dict[str, Any] | None) -> None:
    """Load an ImageNet state dict into a three-channel torchvision network (before it is made grey)."""
    if state is not None:
        net.load_state_dict(state)


class Encoder(nn.Module):
    out_channels: tuple[int, int, int, int, int]
    stages: nn.ModuleList
    #: The UNet decoder's widths, deepest first, that suit this encoder.
    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ResNetEncoder(Encoder):
    def __init__(self, depth: int = 34, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        tvm = torchvision_models()
        net = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50}[depth](weights=None)
        load_backbone_state(net, state)
        net.conv1 = grey_conv(net.conv1)
        expansion = 4 if depth >= 50 else 1
        self.out_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(net.conv1, net.bn1, net.relu),
                nn.Sequential(net.maxpool, net.layer1),
                net.layer2,
                net.layer3,
                net.layer4,
            ]
        )


class VGGEncoder(Encoder):
    """VGG19 with batch norm. Its full-resolution first block is folded into the stride-2 stage: the decoder's
    last, skip-less block restores full resolution, as for the other encoders."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        net = torchvision_models().vgg19_bn(weights=None)
        load_backbone_state(net, state)
        layers = list(net.features)
        layers[0] = grey_conv(layers[0])
        pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        # blocks: [0, p0) conv64 | p0 pool, conv128 | ... ; stage k ends just before pool k+1
        bounds = [0, *pools[1:], pools[-1] + 1]
        stages = [nn.Sequential(*layers[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
        self.out_channels = (128, 256, 512, 512, 512)
        self.stages = nn.ModuleList(stages)


class EfficientNetEncoder(Encoder):
    def __init__(self, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        net = torchvision_models().efficientnet_b0(weights=None)
        load_backbone_state(net, state)
        f = net.features
        f[0][0] = grey_conv(f[0][0])
        self.out_channels = (16, 24, 40, 112, 320)
        self.stages = nn.ModuleList(
            [nn.Sequential(f[0], f[1]), f[2], f[3], nn.Sequential(f[4], f[5]), nn.Sequential(f[6], f[7])]
        )


#: DenseNet-BC shapes (growth rate, layers per block, initial features). ``densenet_mini`` is a narrow, shallow
#: DenseNet (0.6 M parameters against DenseNet121's 7 M) for the synthetic demo: it trains about 4x faster on a
#: CPU and its half-precision weights are small enough to ship in the package. It has no ImageNet weights.
DENSENETS: dict[str, tuple[int, tuple[int, int, int, int], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet_mini": (16, (3, 6, 12, 8), 32),
}


def densenet(name: str, state: dict[str, Any] | None = None, outputs: int = 1000, *, grey: bool = True) -> tvm.DenseNet:
    """A torchvision DenseNet of shape ``name`` with one grey input channel, or three (``grey=False``, an imported
    RGB network); an ImageNet ``state`` is loaded first."""
    growth, blocks, initial = DENSENETS[name]
    net = torchvision_models().DenseNet(growth, blocks, initial, num_classes=1000)
    load_backbone_state(net, state)
    if grey:
        net.features.conv0 = grey_conv(net.features.conv0)
    if outputs != 1000:
        net.classifier = nn.Linear(net.classifier.in_features, outputs)
    return net


class DenseNetEncoder(Encoder):
    def __init__(self, state: dict[str, Any] | None = None, name: str = "densenet121") -> None:
        super().__init__()
        f = densenet(name, state).features
        growth, blocks, initial = DENSENETS[name]
        widths, width = [], initial
        for i, layers in enumerate(blocks):
            width += layers * growth
            widths.append(width)
            if i < len(blocks) - 1:
                width //= 2  # each transition halves the channels
        self.out_channels = (initial, widths[0], widths[1], widths[2], widths[3])
        if name == "densenet_mini":
            self.decoder_channels = (128, 64, 32, 16, 16)  # the default decoder would hold 80 % of the weights
        self.stages = nn.ModuleList(
            [
                nn.Sequential(f.conv0, f.norm0, f.relu0),
                nn.Sequential(f.pool0, f.denseblock1),
                nn.Sequential(f.transition1, f.denseblock2),
                nn.Sequential(f.transition2, f.denseblock3),
                nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True)),
            ]
        )


class EncoderEntry(NamedTuple):
    #: Builds the encoder from an ImageNet state dict (or None: random weights).
    build: Callable[[dict[str, Any] | None], Encoder]
    #: The torchvision backbone whose ImageNet weights (``weights.toml``, kind backbone) it starts from.
    backbone: str


#: Encoder name -> how to build it and the backbone its ImageNet weights come from.
ENCODERS: dict[str, EncoderEntry] = {
    "vgg19_bn": EncoderEntry(lambda s: VGGEncoder(s), "vgg19_bn"),
    "resnet34": EncoderEntry(lambda s: ResNetEncoder(34, s), "resnet34"),
    "efficientnet_b0": EncoderEntry(lambda s: EfficientNetEncoder(s), "efficientnet_b0"),
    "densenet121": EncoderEntry(lambda s: DenseNetEncoder(s), "densenet121"),
    "densenet_mini": EncoderEntry(lambda s: DenseNetEncoder(s, "densenet_mini"), "densenet_mini"),
}


def get_encoder(name: str, state: dict[str, Any] | None = None) -> Encoder:
    try:
        build = ENCODERS[name].build
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; valid: {', '.join(ENCODERS)}") from None
    return build(state)

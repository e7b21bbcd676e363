"""U-Nets whose modules are named and wired as segmentation_models_pytorch's ``Unet`` and ``UnetPlusPlus`` are, so
that a state dict saved by that package (what most SIIM-ACR notebooks and research code write) loads into them one
to one.

Written here from smp's documented structure (no code of the package). The encoder is a torchvision network with
its classifier removed (``encoder.*`` keys as torchvision names them), giving six feature maps from the largest on:

- ResNet34 / ResNet50: the input itself, then the stem (stride 2) and the four layers (strides 4 to 32);
- VGG19 / VGG19-BN: the map before each of the five max-pools (strides 1 to 16) and after the last (stride 32);
- DenseNet121: the input, the stem, then each dense block through its transition's batch norm and ReLU (the
  transition's convolution and pooling open the next stage), the last block through ``norm5`` (no ReLU);
- EfficientNet-B0 (smp's ``efficientnet-b0``: EfficientNet-PyTorch's network and names, TensorFlow's SAME padding,
  batch-norm epsilon 1e-3): the input, the stem, and the blocks 2, 4, 8 and 15 (the first block of the 112-channel
  stage at stride 16, as smp takes it).

The decoder never takes the first map as a skip. ``Unet`` (``decoder.blocks.N``) upsamples by nearest neighbour to
the next feature map's size, concatenates it, and runs two conv-batch-norm-ReLU layers (``conv1``/``conv2``, each a
``Sequential(conv, bn, relu)``; no attention), the last block without a skip; for the VGG encoders smp adds a
centre block of two such layers on the deepest map. ``UnetPlusPlus`` (``decoder.blocks.x_D_L``) nests such blocks:
node (D, L) upsamples node (D, L-1) twofold and concatenates every node (D+1..L, L) and the encoder's map at depth
L+1 (Zhou et al., 2018); its centre block for VGG encoders is built but, as in smp, never run. The head
(``segmentation_head.0``) is a 3x3 convolution to one channel (a 1x1 ``final_conv`` in smp <= 0.0.3, whose file
layout :mod:`pneumotriage.imports` renames).

Like every segmenter of the project they take ``(B, 1, H, W)`` grey images (any size: padded to a multiple of 32
and cropped back) and return ``{"mask": logits (B, 1, H, W)}``; the normalisation repeats the grey image on the
three channels the encoder was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from pneumotriage.models.blocks import pad_to_multiple
from pneumotriage.models.encoders import torchvision_models
from pneumotriage.models.normalise import Normalise

Features = Callable[[Any, torch.Tensor], list[torch.Tensor]]


def _resnet_features(e: Any, x: torch.Tensor) -> list[torch.Tensor]:
    features = [x]
    x = e.relu(e.bn1(e.conv1(x)))
    features.append(x)
    x = e.layer1(e.maxpool(x))
    features.append(x)
    for layer in (e.layer2, e.layer3, e.layer4):
        x = layer(x)
        features.append(x)
    return features


def _vgg_features(e: Any, x: torch.Tensor) -> list[torch.Tensor]:
    layers = list(e.features)
    taken = {i - 1 for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)} | {len(layers) - 1}
    features = []
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in taken:
            features.append(x)
    return features


def _densenet_features(e: Any, x: torch.Tensor) -> list[torch.Tensor]:
    f = e.features
    features = [x]
    x = f.relu0(f.norm0(f.conv0(x)))
    features.append(x)
    x = f.pool0(x)
    for i in (1, 2, 3):
        transition = getattr(f, f"transition{i}")
        x = transition.relu(transition.norm(getattr(f, f"denseblock{i}")(x)))
        features.append(x)
        x = transition.pool(transition.conv(x))
    features.append(f.norm5(f.denseblock4(x)))
    return features


class _SameConv(nn.Conv2d):
    """A convolution padded as TensorFlow's SAME is, with the fixed padding EfficientNet-PyTorch (the package
    smp's ``efficientnet-b*`` encoders are) computes once for its nominal image size: (k-1)/2 each side at stride
    1; at stride 2, one pixel less before than after (k-2 in all, the nominal sizes being even). For inputs whose
    sides are multiples of 32 that is what SAME pads."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=bias)
        total = k - 1 if stride == 1 else k - 2
        self.same = (total // 2, total - total // 2) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, 0, 1, self.groups)
        return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)  # EfficientNet's epsilon


class _MBConv(nn.Module):
    """EfficientNet's mobile inverted bottleneck (MBConv) with squeeze-and-excitation, named as EfficientNet-PyTorch
    names it: expand 1x1 (absent at ratio 1), depthwise kxk, SE reduce/expand (a quarter of the block's input
    channels), project 1x1; Swish; the input added back where the shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self._expand_conv: nn.Module = _SameConv(cin, mid, 1) if expand != 1 else nn.Identity()
        self._bn0: nn.Module = _bn(mid) if expand != 1 else nn.Identity()
        self._depthwise_conv = _SameConv(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        squeezed = max(1, int(cin * 0.25))
        self._se_reduce = _SameConv(mid, squeezed, 1, bias=True)
        self._se_expand = _SameConv(squeezed, mid, 1, bias=True)
        self._project_conv = _SameConv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self._swish = nn.SiLU()
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs
        if isinstance(self._bn0, nn.BatchNorm2d):
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        excite = self._se_expand(self._swish(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = self._bn2(self._project_conv(torch.sigmoid(excite) * x))
        return x + inputs if self.residual else x


#: EfficientNet-B0's stages: repeats, kernel, stride of the first block, expansion, input and output channels.
B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: The blocks after which smp's efficientnet-b0 encoder takes its feature maps (strides 4, 8, 16, 32).
B0_TAKEN = (2, 4, 8, 15)


class _EfficientNetB0(nn.Module):
    """EfficientNet-B0 as EfficientNet-PyTorch names it (``_conv_stem``, ``_bn0``, ``_blocks.N``, ``_conv_head``,
    ``_bn1``; no ``_fc``), which is what smp's ``efficientnet-b0`` encoder holds."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in B0_STAGES:
            blocks += [
                _MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand) for i in range(repeats)
            ]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1)  # in the state dict; the encoder stops before it
        self._bn1 = _bn(1280)
        self._swish = nn.SiLU()


def _efficientnet_features(e: Any, x: torch.Tensor) -> list[torch.Tensor]:
    features = [x]
    x = e._swish(e._bn0(e._conv_stem(x)))
    features.append(x)
    for i, block in enumerate(e._blocks):
        x = block(x)
        if i in B0_TAKEN:
            features.append(x)
        if i == B0_TAKEN[-1]:
            break
    return features


class _VGG(nn.Module):
    """torchvision's VGG19 convolutions alone (``features.N``): its 100-million-weight classifier, which smp
    deletes, is never built."""

    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        vgg = torchvision_models().vgg
        self.features = vgg.make_layers(vgg.cfgs["E"], batch_norm=batch_norm)


def _torchvision(builder: str, *drop: str) -> Callable[[], nn.Module]:
    """torchvision's network ``builder`` (its function's name) without the attributes ``drop``."""

    def build() -> nn.Module:
        net: nn.Module = getattr(torchvision_models(), builder)(weights=None)
        for name in drop:
            delattr(net, name)
        return net

    return build


@dataclass(frozen=True)
class SmpEncoder:
    """One of smp's encoders: how to build it (torchvision's network, classifier removed), the channels of its six
    feature maps, and how it makes them."""

    build: Callable[[], nn.Module]
    channels: tuple[int, ...]
    features: Features
    #: smp gives the VGG encoders a centre block (two conv-batch-norm-ReLU layers on the deepest map).
    center: bool = False


#: Encoders whose smp state dicts load here, by smp's name.
SMP_ENCODERS: dict[str, SmpEncoder] = {
    "resnet34": SmpEncoder(_torchvision("resnet34", "fc", "avgpool"), (3, 64, 64, 128, 256, 512), _resnet_features),
    "resnet50": SmpEncoder(_torchvision("resnet50", "fc", "avgpool"), (3, 64, 256, 512, 1024, 2048), _resnet_features),
    "vgg19": SmpEncoder(lambda: _VGG(batch_norm=False), (64, 128, 256, 512, 512, 512), _vgg_features, True),
    "vgg19_bn": SmpEncoder(lambda: _VGG(batch_norm=True), (64, 128, 256, 512, 512, 512), _vgg_features, True),
    "densenet121": SmpEncoder(
        _torchvision("densenet121", "classifier"), (3, 64, 256, 512, 1024, 1024), _densenet_features
    ),
    "efficientnet-b0": SmpEncoder(_EfficientNetB0, (3, 32, 24, 40, 112, 320), _efficientnet_features),
}
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Block(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.attention1 = nn.Identity()
        self.conv2 = _conv_bn_relu(cout, cout)
        self.attention2 = nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        out: torch.Tensor = self.attention2(self.conv2(self.conv1(x)))
        return out


def _skips_deepest_first(encoder_channels: tuple[int, ...]) -> list[int]:
    return list(encoder_channels[1:][::-1])  # the first map is never a skip


def _center(channels: int, present: bool) -> nn.Module:
    if not present:
        return nn.Identity()
    return nn.Sequential(_conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels))


class _Decoder(nn.Module):
    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...], center: bool) -> None:
        super().__init__()
        deep = _skips_deepest_first(encoder_channels)
        ins = [deep[0], *decoder_channels[:-1]]
        skips = [*deep[1:], 0]
        self.center = _center(deep[0], center)
        self.blocks = nn.ModuleList(_Block(i, s, o) for i, s, o in zip(ins, skips, decoder_channels, strict=True))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        sizes = [tuple(f.shape[2:]) for f in features][::-1]
        deep = features[1:][::-1]
        x = self.center(deep[0])
        for i, block in enumerate(self.blocks):
            skip = deep[i + 1] if i + 1 < len(deep) else None
            x = block(x, sizes[i + 1], skip)
        out: torch.Tensor = x
        return out


class _NestedDecoder(nn.Module):
    """UNet++'s decoder as smp names it: node ``x_D_L`` (D <= L) sits at the resolution of the encoder's map L+1
    (deepest first); column D = 0 is the plain U-Net path."""

    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...], center: bool) -> None:
        super().__init__()
        deep = _skips_deepest_first(encoder_channels)
        ins = [deep[0], *decoder_channels[:-1]]
        skips = [*deep[1:], 0]
        self.depth = len(decoder_channels) - 1
        blocks: dict[str, nn.Module] = {}
        for level in range(self.depth):
            for d in range(level + 1):
                # node (d, level) concatenates the nodes (d+1..level, level) and the encoder's map: level+1-d of
                # skip's width; off the main path (d > 0) it is as wide as that map and takes the node above's
                if d == 0:
                    blocks[f"x_0_{level}"] = _Block(ins[level], skips[level] * (level + 1), decoder_channels[level])
                else:
                    blocks[f"x_{d}_{level}"] = _Block(skips[level - 1], skips[level] * (level + 1 - d), skips[level])
        blocks[f"x_0_{self.depth}"] = _Block(ins[-1], 0, decoder_channels[-1])
        self.center = _center(deep[0], center)
        self.blocks = nn.ModuleDict(blocks)

    def _up(self, name: str, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = (x.shape[2] * 2, x.shape[3] * 2)
        out: torch.Tensor = self.blocks[name](x, size, skip)
        return out

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # smp builds UNet++'s centre block for the VGG encoders but its forward never runs it: its weights load
        # here, unused, as there
        deep = features[1:][::-1]
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        for d in range(self.depth):  # the first column: each encoder map upsampled onto the next
            nodes[d, d] = self._up(f"x_{d}_{d}", deep[d], deep[d + 1])
        for step in range(1, self.depth):
            for d in range(self.depth - step):
                level = d + step
                dense = [nodes[i, level] for i in range(d + 1, level + 1)]
                skip = torch.cat([*dense, deep[level + 1]], dim=1)
                nodes[d, level] = self._up(f"x_{d}_{level}", nodes[d, level - 1], skip)
        return self._up(f"x_0_{self.depth}", nodes[0, self.depth - 1], None)


class SmpUNet(nn.Module):
    """segmentation_models_pytorch's ``Unet(encoder_name, classes=1)`` (``nested``: ``UnetPlusPlus``), module for
    module."""

    nested = False

    def __init__(
        self,
        encoder: str = "resnet34",
        state: dict[str, Any] | None = None,
        *,
        empty_head: bool = False,
        normalisation: str = "imagenet-rgb",
    ) -> None:
        super().__init__()
        if encoder not in SMP_ENCODERS:
            raise KeyError(f"no smp encoder {encoder!r} here; valid: {', '.join(SMP_ENCODERS)}")
        if empty_head:
            raise ValueError("an smp Unet has no image-level head")
        if state is not None:
            raise ValueError("an smp network is only ever imported (pneumotriage convert), never built from ImageNet")
        self._encoder = SMP_ENCODERS[encoder]
        self.normalise = Normalise(normalisation)
        self.encoder = self._encoder.build()
        decoder = _NestedDecoder if self.nested else _Decoder
        self.decoder = decoder(self._encoder.channels, DECODER_CHANNELS, self._encoder.center)
        self.segmentation_head = nn.Sequential(nn.Conv2d(DECODER_CHANNELS[-1], 1, 3, padding=1), nn.Identity())

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        x, (h, w) = pad_to_multiple(self.normalise(x), 32)
        mask = self.segmentation_head(self.decoder(self._encoder.features(self.encoder, x)))
        return {"mask": mask[..., :h, :w]}


class SmpUNetPlusPlus(SmpUNet):
    """segmentation_models_pytorch's ``UnetPlusPlus(encoder_name, classes=1)``, module for module."""

    nested = True


#: arch -> network, for the segmenters only ever imported.
SMP_ARCHS: dict[str, type[SmpUNet]] = {"smp_unet": SmpUNet, "smp_unetplusplus": SmpUNetPlusPlus}

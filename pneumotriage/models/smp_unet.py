"""A U-Net whose modules are named and wired as segmentation_models_pytorch's ``Unet`` is, so that a state dict
saved by that package (what most SIIM-ACR notebooks and research code write) loads into it one to one.

Written here from smp's documented structure (no code of the package): the encoder is torchvision's ResNet
without ``fc`` and ``avgpool``, giving the input itself and five feature maps (strides 2 to 32); the decoder
(``decoder.blocks.N``) upsamples by nearest neighbour to the next feature map's size, concatenates it, and runs
two conv-batch-norm-ReLU layers (``conv1``/``conv2``, each a ``Sequential(conv, bn, relu)``; no centre block, no
attention), the last block without a skip; the head (``segmentation_head.0``) is a 3x3 convolution to one channel
(a 1x1 ``final_conv`` in smp <= 0.0.3, whose file layout :mod:`pneumotriage.imports` renames).

Like every segmenter of the project it takes ``(B, 1, H, W)`` grey images (any size: padded to a multiple of 32
and cropped back) and returns ``{"mask": logits (B, 1, H, W)}``; its normalisation repeats the grey image on the
three channels the encoder was trained on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
import torchvision.models as tvm
from torch import nn

from pneumotriage.models.blocks import pad_to_multiple
from pneumotriage.models.normalise import Normalise

#: Encoders whose smp state dicts load here: name -> (torchvision builder, feature channels from the input on).
SMP_ENCODERS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "resnet34": (tvm.resnet34, (3, 64, 64, 128, 256, 512)),
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


class _Decoder(nn.Module):
    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        deep = encoder_channels[1:][::-1]  # the input's own "feature" is never a skip
        ins = [deep[0], *decoder_channels[:-1]]
        skips = [*deep[1:], 0]
        self.center = nn.Identity()
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


class SmpUNet(nn.Module):
    """segmentation_models_pytorch's ``Unet(encoder_name, classes=1)``, module for module."""

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
        build, channels = SMP_ENCODERS[encoder]
        net = build(weights=None)
        if state is not None:
            net.load_state_dict(state)
        del net.fc, net.avgpool
        self.normalise = Normalise(normalisation)
        self.encoder = net
        self.decoder = _Decoder(channels, DECODER_CHANNELS)
        self.segmentation_head = nn.Sequential(nn.Conv2d(DECODER_CHANNELS[-1], 1, 3, padding=1), nn.Identity())

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = self.encoder
        features = [x]
        x = e.relu(e.bn1(e.conv1(x)))
        features.append(x)
        x = e.layer1(e.maxpool(x))
        features.append(x)
        for layer in (e.layer2, e.layer3, e.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        x, (h, w) = pad_to_multiple(self.normalise(x), 32)
        mask = self.segmentation_head(self.decoder(self._features(x)))
        return {"mask": mask[..., :h, :w]}

"""UNet-family segmenters over the encoders of :mod:`pneumotriage.models.encoders`.

Every segmenter takes ``(B, 1, H, W)`` images in [0, 1] of any size (padded to a multiple of 32 inside and cropped
back) and returns a dict: ``mask`` the pneumothorax logits ``(B, 1, H, W)``; ``present`` the image-level logit
``(B,)`` that the image holds any pneumothorax, when built with ``empty_head=True``; ``aux`` a list of extra mask
logits for deep supervision (Double UNet's first network).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pneumotriage.models.blocks import ASPP, ConvBNReLU, DecoderBlock, SqueezeExcite, pad_to_multiple
from pneumotriage.models.encoders import Encoder, get_encoder
from pneumotriage.models.normalise import Normalise

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class Segmenter(nn.Module):
    """Shared input handling: normalisation, padding to a multiple of 32, cropping outputs, the empty head."""

    def __init__(self, encoder: str, state: dict[str, Any] | None, *, empty_head: bool, normalisation: str) -> None:
        super().__init__()
        self.normalise = Normalise(normalisation)
        self.encoder = get_encoder(encoder, state)
        deepest = self.encoder.out_channels[-1]
        self.present: nn.Module | None = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(deepest, 1))
            if empty_head
            else None
        )

    def _forward(self, x: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        x, (h, w) = pad_to_multiple(self.normalise(x), 32)
        out = self._forward(x)
        out["mask"] = out["mask"][..., :h, :w]
        if "aux" in out:
            out["aux"] = [a[..., :h, :w] for a in out["aux"]]
        return out

    def _present(self, deepest: torch.Tensor, out: dict[str, Any]) -> dict[str, Any]:
        if self.present is not None:
            out["present"] = self.present(deepest).squeeze(1)
        return out


class UNet(Segmenter):
    """U-Net (Ronneberger et al. 2015) with a pretrained encoder, as in the SIIM-ACR winners' solutions."""

    def __init__(
        self,
        encoder: str = "resnet34",
        state: dict[str, Any] | None = None,
        *,
        empty_head: bool = False,
        normalisation: str = "imagenet",
    ) -> None:
        super().__init__(encoder, state, empty_head=empty_head, normalisation=normalisation)
        ec = self.encoder.out_channels
        skips = (ec[3], ec[2], ec[1], ec[0], 0)
        blocks, cin = [], ec[4]
        for skip, cout in zip(skips, self.encoder.decoder_channels, strict=True):
            blocks.append(DecoderBlock(cin, skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, 1, 3, padding=1)

    def _forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.encoder(x)
        y = feats[4]
        for i, block in enumerate(self.decoder):
            y = block(y, [feats[3 - i]] if i < 4 else None)
        return self._present(feats[4], {"mask": self.head(y)})


class UNetPlusPlus(Segmenter):
    """Nested U-Net (UNet++, Zhou et al. 2018): node X[i][j] at level i fuses all earlier nodes of its level with
    the upsampled node X[i+1][j-1], so the skips pass through dense convolution paths."""

    LEVEL_CHANNELS = (32, 64, 128, 256)

    def __init__(
        self,
        encoder: str = "resnet34",
        state: dict[str, Any] | None = None,
        *,
        empty_head: bool = False,
        normalisation: str = "imagenet",
    ) -> None:
        super().__init__(encoder, state, empty_head=empty_head, normalisation=normalisation)
        ec = self.encoder.out_channels
        dc = self.LEVEL_CHANNELS
        nodes: dict[str, nn.Module] = {}
        for j in range(1, 5):
            for i in range(0, 5 - j):
                below = ec[i + 1] if j == 1 else dc[i + 1]
                nodes[f"x{i}_{j}"] = DecoderBlock(below, ec[i] + (j - 1) * dc[i], dc[i])
        self.nodes = nn.ModuleDict(nodes)
        self.final = DecoderBlock(dc[0], 0, DECODER_CHANNELS[-1])
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], 1, 3, padding=1)

    def _forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.encoder(x)
        grid: dict[tuple[int, int], torch.Tensor] = {(i, 0): f for i, f in enumerate(feats)}
        for j in range(1, 5):
            for i in range(0, 5 - j):
                skips = [grid[(i, k)] for k in range(j)]
                grid[(i, j)] = self.nodes[f"x{i}_{j}"](grid[(i + 1, j - 1)], skips)
        return self._present(feats[4], {"mask": self.head(self.final(grid[(0, 4)]))})


class _ConvEncoder(Encoder):
    """Double UNet's second encoder: five stages of (stride-2 downsampling, two conv-BN-ReLU, squeeze-excite)."""

    CHANNELS = (32, 64, 128, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        stages, cin = [], 1
        for cout in self.CHANNELS:
            stages.append(
                nn.Sequential(nn.MaxPool2d(2), ConvBNReLU(cin, cout), ConvBNReLU(cout, cout), SqueezeExcite(cout))
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = self.CHANNELS


class DoubleUNet(Segmenter):
    """Double U-Net (Jha et al. 2020), as in the case study: network 1 (pretrained encoder, ASPP, decoder with
    squeeze-excite) predicts a mask; the input multiplied by that mask feeds network 2 (its own encoder, ASPP,
    decoder with skips from both encoders). ``mask`` is network 2's output; network 1's is in ``aux``."""

    ASPP_CHANNELS = 64

    def __init__(
        self,
        encoder: str = "vgg19_bn",
        state: dict[str, Any] | None = None,
        *,
        empty_head: bool = False,
        normalisation: str = "imagenet",
    ) -> None:
        super().__init__(encoder, state, empty_head=empty_head, normalisation=normalisation)
        e1 = self.encoder.out_channels
        self.aspp1 = ASPP(e1[4], self.ASPP_CHANNELS)
        self.decoder1 = self._decoder((e1[3], e1[2], e1[1], e1[0], 0))
        self.head1 = nn.Conv2d(DECODER_CHANNELS[-1], 1, 1)
        self.encoder2 = _ConvEncoder()
        e2 = self.encoder2.out_channels
        self.aspp2 = ASPP(e2[4], self.ASPP_CHANNELS)
        self.decoder2 = self._decoder((e1[3] + e2[3], e1[2] + e2[2], e1[1] + e2[1], e1[0] + e2[0], 0))
        self.head2 = nn.Conv2d(DECODER_CHANNELS[-1], 1, 1)

    def _decoder(self, skips: tuple[int, ...]) -> nn.ModuleList:
        blocks, cin = [], self.ASPP_CHANNELS
        for skip, cout in zip(skips, DECODER_CHANNELS, strict=True):
            blocks.append(DecoderBlock(cin, skip, cout, se=True))
            cin = cout
        return nn.ModuleList(blocks)

    def _forward(self, x: torch.Tensor) -> dict[str, Any]:
        f1 = self.encoder(x)
        y = self.aspp1(f1[4])
        for i, block in enumerate(self.decoder1):
            y = block(y, [f1[3 - i]] if i < 4 else None)
        logits1 = self.head1(y)
        f2 = self.encoder2(x * torch.sigmoid(logits1))
        y = self.aspp2(f2[4])
        for i, block in enumerate(self.decoder2):
            y = block(y, [f1[3 - i], f2[3 - i]] if i < 4 else None)
        return self._present(f1[4], {"mask": self.head2(y), "aux": [logits1]})


SEGMENTERS: dict[str, type[Segmenter]] = {"unet": UNet, "unetpp": UNetPlusPlus, "double_unet": DoubleUNet}

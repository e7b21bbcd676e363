"""Building blocks shared by the decoders: conv-BN-ReLU, squeeze-and-excitation, ASPP, padding to a multiple."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): rescale each channel by a gate computed from its global mean."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x * self.gate(x)
        return out


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip features, two 3x3 conv-BN-ReLU; optional squeeze-excite."""

    def __init__(self, cin: int, cskip: int, cout: int, *, se: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(cin + cskip, cout), ConvBNReLU(cout, cout))
        self.se = SqueezeExcite(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skips:
            x = torch.cat([x, *skips], dim=1)
        out: torch.Tensor = self.se(self.conv(x))
        return out


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): parallel dilated convs and image pooling, fused by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(cin, cout, kernel=1 if r == 1 else 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = ConvBNReLU(cout * (len(rates) + 1), cout, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        out: torch.Tensor = self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))
        return out


def pad_to_multiple(x: torch.Tensor, multiple: int = 32) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom and right edges (reflect) so H and W divide by ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)

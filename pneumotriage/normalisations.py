"""How pixels in [0, 1] are scaled before a network, by name: one table for the registry (which checks the names
``weights.toml`` uses) and the models (which apply it)."""

from __future__ import annotations

#: name -> (offset, scale): the network sees (x - offset) / scale.
NORMALISATIONS: dict[str, tuple[float, float]] = {
    # ImageNet's channel means and standard deviations averaged over RGB: the grey image seen by a first
    # convolution whose RGB weights were summed.
    "imagenet": (0.449, 0.226),
    # TorchXRayVision's convention: 8-bit pixels mapped to [-1024, 1024].
    "xrv": (0.5, 1.0 / 2048.0),
    "unit": (0.0, 1.0),
}

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

#: name -> (per-channel means, per-channel standard deviations) of a three-channel network: the grey image is
#: repeated on each channel (what Pillow's ``convert("RGB")`` of a grey PNG gives), then scaled channel by channel.
RGB_NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # torchvision's transforms.Normalize with ImageNet's statistics (CheXNet, Keras DenseNet on /255 input).
    "imagenet-rgb": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # three channels in [0, 1] as they are (the SIIM-ACR winners' AlbuNet and SE-ResNeXt50 UNets)
    "unit-rgb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def channels_of(normalisation: str) -> int:
    """How many input channels the network behind a normalisation takes."""
    return 3 if normalisation in RGB_NORMALISATIONS else 1


def known(normalisation: str) -> bool:
    return normalisation in NORMALISATIONS or normalisation in RGB_NORMALISATIONS


def names() -> list[str]:
    return [*NORMALISATIONS, *RGB_NORMALISATIONS]

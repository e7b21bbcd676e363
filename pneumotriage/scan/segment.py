"""Stage 6, segment: probability maps for the images the gate let through (horizontal-flip TTA optional)."""

from __future__ import annotations

import torch

from pneumotriage.models import LoadedModel
from pneumotriage.runtime import autocast_for, one_thread
from pneumotriage.scan.classify import _input


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

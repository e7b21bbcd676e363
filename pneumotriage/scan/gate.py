"""Stage 5, gate: which images of a batch go on to the segmenter."""

from __future__ import annotations

import numpy as np


def to_segment(probabilities: np.ndarray | None, n: int, gate: float, *, segment_all: bool) -> list[int]:
    """Positions in a batch of ``n`` images that the segmenter outlines: those whose classifier probability
    reaches ``gate``; all of them with ``segment_all`` or without a classifier."""
    if segment_all or probabilities is None:
        return list(range(n))
    return [i for i in range(n) if probabilities[i] >= gate]

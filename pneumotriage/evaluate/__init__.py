"""Scoring predictions against SIIM-ACR labels: the competition Dice, image-level operating points, plots.

Two sources of predictions, one scoring path:

- a Kaggle-format submission CSV (no model, no images: sizes come from the DICOMs when given, else 1024 x 1024);
  its image-level "score" is whether the mask is non-empty;
- a scan (:func:`pneumotriage.scan.run`) of labelled DICOMs; the image-level score is the classifier's
  probability (the segmenter's when there is no classifier) and the operating point the scan's gate.

Masks are compared image by image from their run-length strings (never all in memory), as pixel counts:
intersection, predicted area, labelled area. Every figure derives from those counts and the scores.

The modules: :mod:`~pneumotriage.evaluate.figures` (every figure from the counts and the scores) and
:mod:`~pneumotriage.evaluate.sources` (the two sources of predictions, and the files written).
"""

from pneumotriage.evaluate.figures import PER_IMAGE_FIELDS, ImageScores, clinical_metrics, count_overlaps
from pneumotriage.evaluate.sources import (
    evaluate_models,
    evaluate_results,
    evaluate_submission,
    headers_of,
    write_evaluation,
)

__all__ = [
    "ImageScores",
    "PER_IMAGE_FIELDS",
    "clinical_metrics",
    "count_overlaps",
    "evaluate_models",
    "evaluate_results",
    "evaluate_submission",
    "headers_of",
    "write_evaluation",
]

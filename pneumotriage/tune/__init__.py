"""Choosing the operating thresholds on validation data.

The cascade's decisions after the models are five numbers: the classifier gate, the triplet rule's
``top_score`` / ``min_area`` / ``bottom_score`` and the smallest mask component kept. :func:`tune` picks them to
maximise the competition score (mean Dice, 1 for a correct empty mask) on labelled images, or fixes the gate for a
target sensitivity first.

1. The models run once over the images (probability maps at the segmenter's input size and the classifier's
   probability); the result is cached on disk under a key of the models' and images' identities.
2. Per image, counts are taken exactly as the scan would post-process it (:func:`pneumotriage.postprocess.outline`:
   probabilities resized to the image's own size, thresholded, small components dropped): for each grid value of
   ``bottom_score`` and ``min_component`` the predicted area and its overlap with the label, and for each
   ``top_score`` the number of confident pixels at the model's size.
3. The search is then arithmetic on those counts: an image's Dice is ``d_kept`` when the gate and the triplet let
   its mask through and ``d_empty`` otherwise, so the mean over images for every combination is one matrix
   product, ``mean(d_empty) + kept^T (d_kept - d_empty) / N``.

The figures reported are the scan's own on these images: scanning them with the tuned checkpoint gives the same
competition score (to float rounding where the scan ran on a GPU).

The modules: :mod:`~pneumotriage.tune.records` (the data the steps share), :mod:`~pneumotriage.tune.predictions`
(step 1), :mod:`~pneumotriage.tune.search` (steps 2 and 3), :mod:`~pneumotriage.tune.review` (the review threshold),
:mod:`~pneumotriage.tune.oof` (out-of-fold groups) and :mod:`~pneumotriage.tune.job` (:func:`tune`, the whole job).
"""

from pneumotriage.tune.job import tune
from pneumotriage.tune.oof import oof_groups
from pneumotriage.tune.predictions import predict_once
from pneumotriage.tune.records import Counts, Grid, Predictions, TuneResult
from pneumotriage.tune.review import review_figures, review_threshold
from pneumotriage.tune.search import count, scores

__all__ = [
    "Counts",
    "Grid",
    "Predictions",
    "TuneResult",
    "count",
    "oof_groups",
    "predict_once",
    "review_figures",
    "review_threshold",
    "scores",
    "tune",
]

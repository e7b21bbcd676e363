"""The review threshold: chosen after the gate and the triplet, for a specificity or a review share, the lowest
that meets it, and a number that reads the same wherever it is shown."""

from __future__ import annotations

import numpy as np
import pytest

from pneumotriage.tune import review_figures, review_threshold

# Ten images: four positives (two outlined), six negatives (one outlined).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
OUTLINED = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
P = np.array([0.99, 0.9, 0.62, 0.31, 0.95, 0.05, 0.12, 0.2, 0.44, 0.7])


def test_for_a_specificity_the_lowest_threshold_that_keeps_that_share_of_negatives_routine() -> None:
    # 6 negatives; 0.5 needs 3 routine: those at 0.05, 0.12, 0.2 -> the threshold just above 0.2
    r, note = review_threshold(Y, OUTLINED, P, specificity=0.5)
    assert note is None and 0.2 < r <= 0.31 and r == 0.3  # the fewest decimals in (0.2, 0.31]
    f = review_figures(Y, OUTLINED, P, r)
    assert f["specificity"] == 0.5 and f["sensitivity"] == 1.0  # the positive at 0.31 still reaches a person
    assert f["negatives_in_review"] == 2 and f["in_review"] == 4 and f["urgent"] == 3
    # 0.9 needs 6 of 6 routine, but one negative is outlined: unreachable, said so, all others routine
    r, note = review_threshold(Y, OUTLINED, P, specificity=0.9)
    assert note is not None and "outlines 1 of the 6 negatives" in note
    assert review_figures(Y, OUTLINED, P, r)["negatives_in_review"] == 0
    # 0.66 needs 4 routine -> above 0.44 (the next value up among the images left alone is 0.62)
    r, _ = review_threshold(Y, OUTLINED, P, specificity=0.66)
    assert 0.44 < r <= 0.62 and r == 0.5
    f = review_figures(Y, OUTLINED, P, r)
    assert f["specificity"] == pytest.approx(4 / 6) and f["positives_routine"] == 1


def test_for_a_review_share_at_most_that_share_of_the_images_goes_to_review() -> None:
    r, note = review_threshold(Y, OUTLINED, P, share=0.2)  # 2 of 10 in review: 0.7 and 0.62
    assert note is None and review_figures(Y, OUTLINED, P, r)["in_review"] == 2 and r == 0.5
    assert review_threshold(Y, OUTLINED, P, share=1.0)[0] == 0.0
    r, _ = review_threshold(Y, OUTLINED, P, share=0.0)
    assert review_figures(Y, OUTLINED, P, r)["in_review"] == 0


def test_close_probabilities_get_as_many_decimals_as_they_need() -> None:
    y = np.array([0, 0, 1], dtype=bool)
    p = np.array([0.019583, 0.0195841, 0.5])
    r, _ = review_threshold(y, np.zeros(3, bool), p, specificity=0.5)
    assert 0.019583 < r <= 0.0195841 and f"{r:g}" == "0.019584"

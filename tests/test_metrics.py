"""Metrics, losses and post-processing against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumotriage.errors import UsageError
from pneumotriage.losses import ComboLoss, focal_loss, parse_loss, soft_dice_loss
from pneumotriage.metrics import binary_metrics, competition_dice, dice_per_image, roc_auc, youden_threshold
from pneumotriage.postprocess import remove_small_components, scaled_area, triplet


def _mask(*cells: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_dice_hand_computed_cases() -> None:
    empty = _mask()
    a = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 4 px
    b = _mask((0, 0), (0, 1))  # 2 px, inside a
    pred = np.stack([empty, a, empty, a, b])
    true = np.stack([empty, empty, a, a, a])
    # both empty -> 1; predicted but truly empty -> 0; missed -> 0; exact -> 1; 2*2/(2+4) = 2/3
    np.testing.assert_allclose(dice_per_image(pred, true), [1.0, 0.0, 0.0, 1.0, 2 / 3])
    assert competition_dice(pred, true) == pytest.approx((1 + 0 + 0 + 1 + 2 / 3) / 5)


def test_roc_auc_hand_computed() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # pairs (pos, neg): (0.5 vs 0.5 tie = 0.5), (0.5 vs 0.1 = 1), (0.9 vs both = 2) -> 3.5 / 4
    assert roc_auc([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1]) == pytest.approx(0.875)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_binary_metrics_and_youden() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1, 0.05])
    m = binary_metrics(y, s, 0.35)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4) and m["npv"] == pytest.approx(3 / 4)
    # thresholds: 0.8 -> sens 2/3, spec 1 (J=0.667); 0.3 -> sens 1, spec 3/4 (J=0.75): 0.3 wins
    assert youden_threshold(y, s) == pytest.approx(0.3)


def test_triplet_rule() -> None:
    probs = np.zeros((3, 32, 32), dtype=np.float32)
    probs[0, :4, :4] = 0.9  # 16 confident pixels
    probs[0, 4:8, :4] = 0.5  # above bottom only
    probs[1, :2, :2] = 0.9  # 4 confident pixels: too few
    probs[1, 2:10, :] = 0.5
    probs[2, 10:20, 10:20] = 0.6  # nothing above top
    masks = triplet(probs, top_score=0.75, min_area=10, bottom_score=0.3, scale_area=False)
    assert masks[0].sum() == 32 and masks[1].sum() == 0 and masks[2].sum() == 0
    # min_area is stated at 1024 x 1024: at 32 x 32 an area of 10240 means 10 pixels
    assert scaled_area(10240, (32, 32)) == pytest.approx(10)
    np.testing.assert_array_equal(triplet(probs, top_score=0.75, min_area=10240, bottom_score=0.3), masks)


def test_remove_small_components() -> None:
    m = np.zeros((10, 10), dtype=bool)
    m[0:3, 0:3] = True  # 9 px
    m[8, 8] = m[9, 9] = True  # 2 px, 8-connected
    kept = remove_small_components(m, 3)
    assert kept.sum() == 9 and not kept[8, 8]
    assert remove_small_components(m, 0).sum() == 11


def test_parse_loss() -> None:
    assert parse_loss("bce:3,dice:1,focal:4") == {"bce": 3.0, "dice": 1.0, "focal": 4.0}
    assert parse_loss(" BCE , dice:0.5") == {"bce": 1.0, "dice": 0.5}
    for bad in ("lovasz:1", "bce:x", "bce:0", "bce:-1"):
        with pytest.raises(UsageError):
            parse_loss(bad)


def test_losses_behave() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, :4] = 1
    good = (target * 2 - 1) * 10  # confident and right
    bad = -good
    for fn in (soft_dice_loss, focal_loss):
        assert float(fn(good, target)) < 0.05 < float(fn(bad, target))
    combo = ComboLoss({"bce": 3, "dice": 1, "focal": 4})
    assert float(combo(good, target)) < float(combo(torch.zeros_like(good), target)) < float(combo(bad, target))
    # empty target, empty prediction: soft Dice costs ~0 (the competition's "both empty = 1")
    assert float(soft_dice_loss(torch.full((1, 1, 8, 8), -20.0), torch.zeros(1, 1, 8, 8))) < 1e-6
    # pos_weight scales the positive term of BCE
    y = torch.ones(4)
    logits = torch.zeros(4)
    assert float(ComboLoss({"bce": 1}, pos_weight=3.0)(logits, y)) == pytest.approx(3 * math.log(2), rel=1e-5)

"""tune: its counts against the scan's post-processing, the vectorised search against brute force, and
train -> tune -> evaluate end to end on a synthetic study."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blobs, evaluate_cli, labels_of, sha, tune_cli

from pneumotriage.labels import read_rle_csv
from pneumotriage.postprocess import remove_small_components, resize_full, scaled_area
from pneumotriage.rle import rle_encode
from pneumotriage.synth import StudySummary
from pneumotriage.tune import Counts, Grid, Predictions, count, scores


def test_counts_match_the_scans_post_processing() -> None:
    """For every grid value, the counts equal thresholding the resized map and dropping small components one
    image at a time, as the scan's finish stage does, including a source size different from the model's."""
    rng = np.random.default_rng(0)
    maps = blobs(rng, 4, 32)
    shapes = np.array([[32, 32], [48, 40], [32, 32], [64, 64]])
    labels = labels_of({})
    truths = {}
    for i, (h, w) in enumerate(shapes):
        truth = np.zeros((h, w), bool)
        truth[h // 4 : h // 2, w // 3 : w // 2] = i != 2
        truths[f"i{i}"] = truth
        labels[f"i{i}"] = [rle_encode(truth)] if truth.any() else []
    grid = Grid(top_score=(0.3, 0.6), min_area=(0.0, 20000.0), bottom_score=(0.1, 0.25), min_component=(0.0, 9000.0))
    pred = Predictions([f"i{i}" for i in range(4)], shapes, maps, None)
    counts = count(pred, labels, grid)
    for i, (h, w) in enumerate(shapes):
        p = torch.from_numpy(maps[i])
        full = resize_full(maps[i], (int(h), int(w)))
        for ti, top in enumerate(grid.top_score):
            assert counts.confident[i, ti] == int((p > top).sum())
        for bi, bottom in enumerate(grid.bottom_score):
            for mi, smallest in enumerate(grid.min_component):
                mask = remove_small_components(full > bottom, scaled_area(smallest, (int(h), int(w))))
                assert counts.area[i, bi, mi] == mask.sum()
                assert counts.inter[i, bi, mi] == (mask & truths[f"i{i}"]).sum()


def test_search_equals_brute_force() -> None:
    rng = np.random.default_rng(5)
    n = 30
    grid = Grid(
        top_score=(0.5, 0.8), min_area=(0.0, 500.0, 4000.0), bottom_score=(0.2, 0.4), min_component=(0.0, 100.0)
    )
    gates = [0.1, 0.5, 0.9]
    true_area = rng.integers(0, 3, n) * rng.integers(1, 300, n)
    area = rng.integers(0, 400, (n, 2, 2)) * (rng.random((n, 1, 1)) < 0.7)
    inter = np.minimum(area, true_area[:, None, None]) * rng.random((n, 2, 2)) // 1
    confident = rng.integers(0, 80, (n, 2))
    counts = Counts(true_area, confident, area.astype(np.int64), inter.astype(np.int64), (64, 64))
    cls = rng.random(n).astype(np.float32)
    table = scores(counts, grid, cls, gates)
    for t, a, g, b, m in itertools.product(range(2), range(3), range(3), range(2), range(2)):
        total = 0.0
        for i in range(n):
            need = max(grid.min_area[a] * 64 * 64 / 1024**2, 1.0)
            kept = cls[i] >= np.float32(gates[g]) and confident[i, t] >= need
            pa, pi = (area[i, b, m], inter[i, b, m]) if kept else (0, 0)
            total += 1.0 if pa + true_area[i] == 0 else 2 * pi / (pa + true_area[i])
        assert table[t, a, g, b, m] == pytest.approx(total / n)


def test_tune_then_evaluate(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    study, cls, seg = tiny
    before = sha(seg)
    tuned = tmp_path / "tuned.pt"
    result = tune_cli(study, cls, seg, tuned)
    assert result.exit_code == 0, result.output
    assert sha(seg) == before  # the input checkpoint is untouched

    from pneumotriage.models import load_model

    loaded = load_model(tuned)
    tuning = loaded.meta["tuning"]
    assert set(loaded.thresholds) >= {"gate", "top_score", "min_area", "bottom_score", "min_component"}
    assert tuning["figures"]["competition_dice"] >= tuning["default_competition_dice"]
    assert tuning["classifier_sha256"] == sha(cls)
    # the review threshold: chosen last, for the default specificity, and shown with its figures
    assert tuning["review"]["target"] == {"specificity": 0.9}
    assert loaded.thresholds["review"] == tuning["review"]["figures"]["review"] == tuning["chosen"]["review"]
    assert "review threshold (specificity target 0.9)" in result.output

    default = evaluate_cli(study, cls, seg, tmp_path / "ev-default")
    after = evaluate_cli(study, cls, tuned, tmp_path / "ev-tuned")
    # the scan with the tuned checkpoint uses its gate (tuned with this classifier) and its triplet
    assert after["source"]["thresholds"]["gate"] == pytest.approx(loaded.thresholds["gate"])
    assert after["source"]["thresholds"]["review"] == loaded.thresholds["review"]
    # tune's figures are the scan's own on these images (same post-processing, CPU, model size = image size)
    assert after["competition_dice"] == pytest.approx(tuning["figures"]["competition_dice"], abs=1e-9)
    assert default["competition_dice"] == pytest.approx(tuning["default_competition_dice"], abs=1e-9)
    assert after["competition_dice"] >= default["competition_dice"]

    # a second run reads the cached predictions; writing over an input is refused
    again = tune_cli(study, cls, seg, tmp_path / "t2.pt")
    assert again.exit_code == 0, again.output
    assert "predictions read from the cache" in again.output
    refused = tune_cli(study, cls, seg, seg)
    assert refused.exit_code == 2 and "tune writes a new file" in refused.output


def test_tune_for_a_sensitivity(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    """--sensitivity 1.0: the gate lets every labelled-positive image through to the segmenter."""
    study, cls, seg = tiny
    out = tmp_path / "sens.pt"
    result = tune_cli(study, cls, seg, out, "--sensitivity", "1.0")
    assert result.exit_code == 0, result.output
    from pneumotriage.models import load_model

    gate = load_model(out).thresholds["gate"]
    ev = evaluate_cli(study, cls, out, tmp_path / "ev")
    assert ev["image_level"]["operating_point"]["threshold"] == pytest.approx(gate)
    assert ev["image_level"]["operating_point"]["recall"] == 1.0
    labels = read_rle_csv(study.labels_csv)
    assert ev["n_positive"] == sum(bool(v) for v in labels.values())


def test_tune_refuses_a_setting_that_outlines_nothing(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    """A min_area no outline reaches: the best setting outlines no positive image, so nothing is written unless
    --force; the table always shows the row chosen."""
    study, cls, seg = tiny
    # the checkpoint's own min_area and the whole grid's: no outline reaches it
    data = torch.load(seg, weights_only=True)
    data["thresholds"] = {**data.get("thresholds", {}), "min_area": 1e8}
    blind = tmp_path / "blind.pt"
    torch.save(data, blind)
    out = tmp_path / "none.pt"
    refused = tune_cli(study, cls, blind, out, "--min-areas", "100000000")
    lines = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert "outlines none of the" in " ".join(refused.output.split()) and "--force" in refused.output
    assert not out.exists()
    forced = tune_cli(study, cls, blind, out, "--min-areas", "100000000", "--force")
    assert forced.exit_code == 0 and out.exists(), forced.output
    assert "chosen" in forced.output

    kept = tune_cli(study, cls, seg, tmp_path / "kept.pt")
    assert kept.exit_code == 0 and "chosen" in kept.output, kept.output

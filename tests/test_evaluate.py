"""evaluate and tune: hand-computed metric cases, the vectorised search against brute force, the stage-1 sample
submission against the real labels, and train -> tune -> evaluate end to end on a synthetic study."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_SIZE, labels_of, sha
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.evaluate import PER_IMAGE_FIELDS, count_overlaps, evaluate_submission, write_evaluation
from pneumotriage.metrics import (
    bootstrap_ci,
    dice_from_counts,
    iou_from_counts,
    pr_auc,
    roc_points,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
)
from pneumotriage.rle import rle_encode
from pneumotriage.synth import StudySummary

runner = CliRunner()


def test_dice_and_iou_hand_cases() -> None:
    # both empty -> 1 (the competition rule); one side empty -> 0; partial: |P|=4, |T|=6, |P&T|=3
    np.testing.assert_allclose(dice_from_counts([0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 7, 6]), [1.0, 0.0, 0.0, 0.6])
    np.testing.assert_allclose(iou_from_counts([0, 0, 3], [0, 5, 4], [0, 0, 6]), [1.0, 0.0, 3 / 7])


def test_count_overlaps_multi_row_labels_are_ored() -> None:
    """Two label rows overlapping on 2 pixels: the label is their union (6 px), never their sum (8)."""
    h, w = 4, 5
    a, b, pred = (np.zeros((h, w), bool) for _ in range(3))
    a[0, 0:4] = True  # 4 px
    b[0, 2:5] = True  # 3 px, overlapping a at columns 2 and 3
    b[1, 4] = True  # + 1 px -> 4 px, union with a = 6 px
    pred[0, 3:5] = True  # 2 px, both inside the union
    pred[3, 0] = True  # 1 px outside
    labels = labels_of({"x": [rle_encode(a), rle_encode(b)], "e": [], "f": []})
    predictions = labels_of({"x": [rle_encode(pred)], "e": [], "f": [rle_encode(pred)]})
    true_area, pred_area, inter = count_overlaps(["x", "e", "f"], predictions, labels, dict.fromkeys("xef", (h, w)))
    assert true_area.tolist() == [6, 0, 0]
    assert pred_area.tolist() == [3, 0, 3]
    assert inter.tolist() == [2, 0, 0]
    # Dice: x = 2*2/(3+6); e both empty = 1; f predicted on an empty label = 0
    np.testing.assert_allclose(dice_from_counts(inter, pred_area, true_area), [4 / 9, 1.0, 0.0])


def test_roc_points_and_average_precision_match_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score, roc_curve

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 50))
        y = rng.random(n) < 0.4
        y[:2] = (True, False)
        s = np.round(rng.random(n), 1)  # many ties
        for ours, theirs in zip(roc_points(y, s), roc_curve(y, s, drop_intermediate=False), strict=True):
            np.testing.assert_allclose(ours, theirs)
        assert pr_auc(y, s) == pytest.approx(average_precision_score(y, s))


def test_fixed_points_by_hand() -> None:
    y = np.array([1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.9, 0.4, 0.5, 0.2, 0.1])
    # specificity >= 0.9 allows no false positive: threshold 0.9 catches one positive of two
    assert sensitivity_at_specificity(y, s, 0.9) == (0.5, 0.9)
    # sensitivity >= 0.95 needs both positives: threshold 0.4 also flags 0.5 -> specificity 2/3
    spec, thr = specificity_at_sensitivity(y, s, 0.95)
    assert (spec, thr) == (pytest.approx(2 / 3), 0.4)
    assert threshold_for_sensitivity(y, s, 0.5) == 0.9
    assert threshold_for_sensitivity(y, s, 0.95) == 0.4
    # one class only: undefined, not a made-up number
    assert np.isnan(sensitivity_at_specificity(np.ones(3, bool), s[:3], 0.9)[0])


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    values = np.random.default_rng(1).random(400)

    def mean(idx: np.ndarray) -> float:
        return float(values[idx].mean())

    lo, hi = bootstrap_ci(mean, len(values), resamples=300, seed=3)
    assert lo < values.mean() < hi
    assert hi - lo < 0.1
    assert bootstrap_ci(mean, len(values), resamples=300, seed=3) == (lo, hi)
    vlo, vhi = bootstrap_ci(lambda idx: np.array([mean(idx), np.nan]), len(values), resamples=300, seed=3)
    assert vlo[0] == lo and np.isnan(vhi[1])  # the same draws for every entry; undefined stays undefined


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "ImageId,EncodedPixels") -> Path:
    path.write_text(header + "\n" + "\n".join(f"{i},{r}" for i, r in rows) + "\n")
    return path


def test_evaluate_submission_files(tmp_path: Path) -> None:
    """Images at 1024² (no DICOMs given): competition score by hand, every output written and parseable."""
    m1 = np.zeros((1024, 1024), bool)
    m1[100:110, 200:210] = True  # 100 px
    m2 = np.zeros_like(m1)
    m2[105:115, 200:210] = True  # 100 px, 50 px shared with m1
    labels = _write_csv(
        tmp_path / "labels.csv", [("a", rle_encode(m1)), ("b", "-1"), ("c", "-1"), ("d", rle_encode(m1))]
    )
    sub = _write_csv(tmp_path / "sub.csv", [("a", rle_encode(m2)), ("b", "-1"), ("c", rle_encode(m2)), ("d", "-1")])
    ev = evaluate_submission(sub, labels, bootstrap=50)
    expected = [2 * 50 / 200, 1.0, 0.0, 0.0]
    assert ev.metrics["competition_dice"] == pytest.approx(np.mean(expected))
    assert ev.metrics["dice_positive_mean"] == pytest.approx(0.25)
    assert ev.metrics["image_level"]["operating_point"]["tp"] == 1
    assert ev.metrics["image_level"]["operating_point"]["fp"] == 1
    write_evaluation(ev, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert doc["competition_dice"] == pytest.approx(np.mean(expected))
    assert doc["plots"] == ["confusion.png", "dice_hist.png", "pr.png", "roc.png"]  # 0/1 scores: no calibration
    for name in doc["plots"]:
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    with open(tmp_path / "out" / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == PER_IMAGE_FIELDS
    assert [float(r["dice"]) for r in rows] == pytest.approx(expected)


def test_submission_ids_without_labels_are_reported_not_scored(tmp_path: Path) -> None:
    labels = _write_csv(tmp_path / "labels.csv", [("a", "-1")])
    sub = _write_csv(tmp_path / "sub.csv", [("a", "-1"), ("zz", "-1")])
    ev = evaluate_submission(sub, labels, bootstrap=0)
    assert ev.metrics["n_images"] == 1 and ev.metrics["source"]["unlabelled_ids"] == 1
    assert any("zz" in note for note in ev.notes)
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--labels",
            str(labels),
            "--predictions",
            str(_write_csv(tmp_path / "none.csv", [("q", "-1")])),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert "none of the submission's 1 ImageIds has a label" in result.output


def _negative_share_by_hand(labels_gz: Path, submission: Path) -> float:
    """Independent of the package: the share of the submission's unique ImageIds whose label rows are all -1."""
    positive: dict[str, bool] = {}
    with gzip.open(labels_gz, "rt", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for image_id, rle in reader:
            positive[image_id.strip()] = positive.get(image_id.strip(), False) or rle.strip() != "-1"
    with open(submission, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        ids = list(dict.fromkeys(row[0].strip() for row in reader if row))
    return sum(not positive[i] for i in ids) / len(ids)


def test_stage1_sample_submission_scores_the_negative_share(real_data: Path, tmp_path: Path) -> None:
    labels = real_data / "siim-labels" / "siim-pneumothorax-train-rle.csv.gz"
    sample = real_data / "siim-submissions" / "new_sample_submission.csv"
    if not labels.exists() or not sample.exists():
        pytest.skip(f"{labels.name} or {sample.name} not in {real_data}")
    expected = _negative_share_by_hand(labels, sample)
    result = runner.invoke(
        app, ["evaluate", "--labels", str(labels), "--predictions", str(sample), "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["n_images"] == 1372  # 1,484 rows, duplicates collapsed
    assert doc["competition_dice"] == expected  # exactly: every image scores 1 or 0
    assert expected == 1082 / 1372
    assert doc["image_level"]["operating_point"]["tp"] == 0


def test_evaluate_and_tune_take_registry_names(
    tiny: tuple[StudySummary, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--classifier/--segmenter as registry names: missing -> exit 3 with the fetch command; once imported into
    the cache (hash checked), the same names evaluate and tune."""
    study, cls, seg = tiny
    registry = tmp_path / "weights.toml"
    registry.write_text(
        "".join(
            f'[tiny-{kind}]\nkind = "{kind}"\narch = "{arch}"\n{encoder}input_size = {TINY_SIZE}\n'
            f'normalisation = "imagenet"\nurl = "https://weights.invalid/tiny-{kind}.pt"\n'
            f'file = "tiny-{kind}.pt"\nsha256 = "{sha(path)}"\n\n'
            for kind, arch, encoder, path in (
                ("classifier", "densenet_mini", "", cls),
                ("segmenter", "unet", 'encoder = "densenet_mini"\n', seg),
            )
        )
    )
    monkeypatch.setenv("PNEUMOTRIAGE_REGISTRY", str(registry))
    names = ["--classifier", "tiny-classifier", "--segmenter", "tiny-segmenter"]
    common = ["--labels", str(study.labels_csv), "--workers", "0", "--device", "cpu"]
    missing = runner.invoke(app, ["evaluate", str(study.out), *names, *common, "--out", str(tmp_path / "e0")])
    assert missing.exit_code == 3
    assert "pneumotriage weights fetch tiny-classifier" in missing.output
    for kind, path in (("classifier", cls), ("segmenter", seg)):
        imported = runner.invoke(app, ["weights", "import", f"tiny-{kind}", str(path)])
        assert imported.exit_code == 0, imported.output
    ev = runner.invoke(
        app, ["evaluate", str(study.out), *names, *common, "--bootstrap", "0", "--out", str(tmp_path / "e1")]
    )
    assert ev.exit_code == 0, ev.output
    models = json.loads((tmp_path / "e1" / "metrics.json").read_text())["source"]["models"]
    assert [m["name"] for m in models] == ["tiny-classifier", "tiny-segmenter"]
    tuned = runner.invoke(
        app, ["tune", str(study.out), *names, *common, "--no-progress", "--out", str(tmp_path / "t.pt")]
    )
    assert tuned.exit_code == 0, tuned.output


def test_evaluate_names_unreadable_labelled_images(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    """A labelled DICOM that cannot be read is left out of the scores, named in a note, and gives exit code 4;
    the files beside the study (labels CSV, manifest) are not counted as failures."""
    import shutil

    study, cls, seg = tiny
    copy = tmp_path / "study"
    shutil.copytree(study.out, copy)
    damaged = copy / study.images[0].path
    damaged.write_bytes(damaged.read_bytes()[:-300])  # the header reads; the JPEG pixel data is cut short
    out = tmp_path / "ev"
    result = runner.invoke(
        app,
        ["evaluate", str(copy), "--labels", str(copy / "train-rle.csv"), "--classifier", str(cls), "--segmenter",
         str(seg), "--out", str(out), "--workers", "0", "--device", "cpu", "--bootstrap", "0"],
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    assert "1 labelled images could not be read" in result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n_images"] == len(study.images) - 1
    assert doc["source"]["unreadable"] == 1
    assert "3 other files were not scored" in " ".join(doc["notes"])  # labels, manifest, sample submission
    # tune leaves the unreadable image out as well (its predictions are compacted away), cached or not
    from pneumotriage.models import load_model

    for attempt in ("first", "cached"):
        tuned = runner.invoke(
            app,
            ["tune", str(copy), "--labels", str(copy / "train-rle.csv"), "--segmenter", str(seg), "--classifier",
             str(cls), "--out", str(tmp_path / f"{attempt}.pt"), "--workers", "0", "--device", "cpu", "--no-progress"],
        )  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        tuning = load_model(tmp_path / f"{attempt}.pt").meta["tuning"]
        assert (tuning["images"], tuning["unreadable"]) == (len(study.images) - 1, 1)
        assert tuning["figures"]["n_images"] == len(study.images) - 1
    assert "predictions read from the cache" in tuned.output
    first, cached = (load_model(tmp_path / f"{a}.pt").meta["tuning"] for a in ("first", "cached"))
    assert first["figures"] == cached["figures"] and first["chosen"] == cached["chosen"]
    # evaluate with the tuned thresholds reports the triage tune chose them for: the same sensitivity and
    # specificity at the scan's own decision (urgent or review), now with exact intervals.
    again = runner.invoke(
        app,
        ["evaluate", str(copy), "--labels", str(copy / "train-rle.csv"), "--classifier", str(cls), "--segmenter",
         str(tmp_path / "first.pt"), "--out", str(tmp_path / "ev2"), "--workers", "0", "--device", "cpu",
         "--bootstrap", "0"],
    )  # fmt: skip
    assert again.exit_code == 4, again.output
    clinical = json.loads((tmp_path / "ev2" / "metrics.json").read_text())["clinical"]
    review = first["review"]["figures"]
    assert clinical["flagged"]["sensitivity"]["value"] == pytest.approx(review["sensitivity"])
    assert clinical["flagged"]["specificity"]["value"] == pytest.approx(review["specificity"])
    assert (
        clinical["urgent"]["sensitivity"]["k"]
        + clinical["urgent"]["specificity"]["n"]
        - clinical["urgent"]["specificity"]["k"]
        == review["urgent"]
    )


def test_exact_intervals_and_the_calibration_error_by_hand() -> None:
    from pneumotriage.metrics import calibration_bins, exact_ci

    low, high = exact_ci(8, 10)  # Clopper-Pearson, as tabulated: 0.444 to 0.975
    assert (round(low, 3), round(high, 3)) == (0.444, 0.975)
    assert exact_ci(0, 5)[0] == 0.0 and exact_ci(5, 5)[1] == 1.0 and exact_ci(0, 0) is None
    y = np.array([0, 0, 1, 1, 1, 0], dtype=bool)
    s = np.array([0.05, 0.15, 0.15, 0.95, 1.0, 0.92])
    cal = calibration_bins(y, s, bins=10)
    # bins: [0.05] share 0; [0.15, 0.15] share 0.5; [0.92, 0.95, 1.0] share 2/3 (1.0 falls in the last bin)
    assert cal["count"][0] == 1 and cal["count"][1] == 2 and cal["count"][9] == 3
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 3 * abs(2 / 3 - (0.92 + 0.95 + 1.0) / 3)) / 6
    assert cal["ece"] == pytest.approx(expected)


def test_clinical_figures_by_decision_size_and_view() -> None:
    """Sensitivity and specificity at the scan's decision (urgent or review; urgent alone), by labelled area in
    cm² where the spacing is known, and by view position."""
    from pneumotriage.evaluate import ImageScores, clinical_metrics

    true_area = np.array([3000, 500, 800, 0, 0, 0, 2000])
    tiers = ["urgent", "review", "routine", "routine", "review", "routine", "urgent"]
    images = ImageScores(
        [f"i{k}" for k in range(7)],
        true_area,
        true_area.copy(),
        true_area.copy(),
        np.linspace(0.9, 0.1, 7),
        flagged=np.array([t != "routine" for t in tiers]),
        urgent=np.array([t == "urgent" for t in tiers]),
        views=["PA", "AP", "PA", "PA", None, "AP", "PA"],
        cm2_per_px=np.array([0.01, 0.01, 0.01, 0.01, 0.01, 0.01, np.nan]),  # 30, 5 and 8 cm²; the last unknown
    )
    doc = clinical_metrics(images, large_cm2=20)
    assert doc["flagged"]["sensitivity"]["k"] == 3 and doc["flagged"]["sensitivity"]["n"] == 4
    assert doc["flagged"]["specificity"]["k"] == 2 and doc["flagged"]["specificity"]["n"] == 3
    assert doc["urgent"]["sensitivity"]["k"] == 2
    sizes = doc["by_size"]
    assert sizes["large (>= 20 cm²)"]["n_positive"] == 1 and sizes["large (>= 20 cm²)"]["sensitivity"]["k"] == 1
    assert sizes["small (< 20 cm²)"]["sensitivity"]["k"] == 1 and sizes["small (< 20 cm²)"]["sensitivity"]["n"] == 2
    assert sizes["size unknown (no pixel spacing)"]["n_positive"] == 1
    assert set(doc["by_view"]) == {"AP", "PA", "unknown"}
    assert doc["by_view"]["PA"]["sensitivity"]["k"] == 2 and doc["by_view"]["PA"]["sensitivity"]["n"] == 3
    assert doc["by_view"]["unknown"]["specificity"]["k"] == 0


def test_confusion_plot_shows_the_scan_decision_and_every_label_fits() -> None:
    """confusion.png is the scan's decision (an outline drawn), and no tick label is cut at the figure's edge
    (a one-line "label negative" lost its first letter)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pneumotriage.plots import confusion_figure

    fig = confusion_figure({"tp": 3, "fp": 1, "fn": 2, "tn": 10})
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    assert "outline" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == ["1", "10", "2", "3"]
    for label in ax.get_yticklabels() + ax.get_xticklabels() + [ax.title]:
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, label

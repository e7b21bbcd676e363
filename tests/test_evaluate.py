"""evaluate and tune: hand-computed metric cases, the vectorised search against brute force, the stage-1 sample
submission against the real labels, and train -> tune -> evaluate end to end on a synthetic study."""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.evaluate import PER_IMAGE_FIELDS, count_overlaps, evaluate_submission, write_evaluation
from pneumotriage.labels import RleLabels, read_rle_csv
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
from pneumotriage.postprocess import remove_small_components, resize_full, scaled_area
from pneumotriage.rle import rle_encode
from pneumotriage.synth import StudySummary, write_study
from pneumotriage.tune import Counts, Grid, Predictions, count, scores

runner = CliRunner()


# --------------------------------------------------------------------------------------------------------------
# metrics, by hand


def test_dice_and_iou_hand_cases() -> None:
    # both empty -> 1 (the competition rule); one side empty -> 0; partial: |P|=4, |T|=6, |P&T|=3
    np.testing.assert_allclose(dice_from_counts([0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 7, 6]), [1.0, 0.0, 0.0, 0.6])
    np.testing.assert_allclose(iou_from_counts([0, 0, 3], [0, 5, 4], [0, 0, 6]), [1.0, 0.0, 3 / 7])


def _labels(rows: dict[str, list[str]]) -> RleLabels:
    labels = RleLabels(None)
    labels.update(rows)
    return labels


def test_count_overlaps_multi_row_labels_are_ored() -> None:
    """Two label rows overlapping on 2 pixels: the label is their union (6 px), never their sum (8)."""
    h, w = 4, 5
    a, b, pred = (np.zeros((h, w), bool) for _ in range(3))
    a[0, 0:4] = True  # 4 px
    b[0, 2:5] = True  # 3 px, overlapping a at columns 2 and 3
    b[1, 4] = True  # + 1 px -> 4 px, union with a = 6 px
    pred[0, 3:5] = True  # 2 px, both inside the union
    pred[3, 0] = True  # 1 px outside
    labels = _labels({"x": [rle_encode(a), rle_encode(b)], "e": [], "f": []})
    predictions = _labels({"x": [rle_encode(pred)], "e": [], "f": [rle_encode(pred)]})
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


# --------------------------------------------------------------------------------------------------------------
# scoring a submission


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


# --------------------------------------------------------------------------------------------------------------
# tune: counting as the scan does, and the vectorised search against brute force


def _blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random probability maps with blobs of several sizes."""
    noise = torch.from_numpy(rng.random((n, 1, size // 8, size // 8)).astype(np.float32))
    maps = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
    return (maps**3).numpy()


def test_counts_match_the_scans_post_processing() -> None:
    """For every grid value, the counts equal thresholding the resized map and dropping small components one
    image at a time, as the scan's finish stage does, including a source size different from the model's."""
    rng = np.random.default_rng(0)
    maps = _blobs(rng, 4, 32)
    shapes = np.array([[32, 32], [48, 40], [32, 32], [64, 64]])
    labels = _labels({})
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


# --------------------------------------------------------------------------------------------------------------
# end to end: train tiny models, tune, evaluate

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySummary, Path, Path]:
    """A 48-image 64-px study and a ResNet34 classifier and UNet/ResNet34 segmenter trained on it briefly."""
    from pneumotriage.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    study = write_study(root / "study", 48, positive_rate=0.5, size=(SIZE, SIZE), seed=5, ptx_scale=2.0)
    common = {
        "data": str(study.out),
        "labels": str(study.labels_csv),
        "image_size": SIZE,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 0,
        "device": "cpu",
        "workers": 0,
        "val_fraction": 1 / 3,
        "pretrained": False,
        "augment": "none",
    }
    torch.manual_seed(0)
    cls = train(TrainConfig(kind="classifier", out=str(root / "cls"), arch="resnet34", epochs=6, **common))
    seg = train(
        TrainConfig(kind="segmenter", out=str(root / "seg"), arch="unet", encoder="resnet34", epochs=10, **common)
    )
    # the last epoch: at 64 px the segmenter's best validation epoch can be one that outlines nothing yet
    return study, cls.run_dir / "best.pt", seg.run_dir / "last.pt"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evaluate(study: StudySummary, cls: Path, seg: Path, out: Path) -> dict:
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(study.out),
            "--labels",
            str(study.labels_csv),
            "--classifier",
            str(cls),
            "--segmenter",
            str(seg),
            "--out",
            str(out),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--bootstrap",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["plots"] == ["calibration.png", "confusion.png", "dice_hist.png", "pr.png", "roc.png"]
    # the table shows the scan's decision first, then the classifier's operating points, labelled
    text = " ".join(result.output.split())
    md = doc["mask_decision"]
    assert "scan decision: TP FP FN TN" in text and f"{md['tp']} {md['fp']} {md['fn']} {md['tn']}" in text
    assert text.index("scan decision") < text.index("classifier probability: ROC AUC")
    for name in doc["plots"]:
        with Image.open(out / name) as image:
            image.verify()
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == doc["n_images"] == len(study.images)
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(doc["competition_dice"], abs=1e-6)
    return doc


def _tune(study: StudySummary, cls: Path, seg: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        ["tune", str(study.out), "--labels", str(study.labels_csv), "--segmenter", str(seg), "--classifier", str(cls),
         "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress", *extra],
    )  # fmt: skip


def test_tune_then_evaluate(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    study, cls, seg = tiny
    before = _sha(seg)
    tuned = tmp_path / "tuned.pt"
    result = _tune(study, cls, seg, tuned)
    assert result.exit_code == 0, result.output
    assert _sha(seg) == before  # the input checkpoint is untouched

    from pneumotriage.models import load_model

    loaded = load_model(tuned)
    tuning = loaded.meta["tuning"]
    assert set(loaded.thresholds) >= {"gate", "top_score", "min_area", "bottom_score", "min_component"}
    assert tuning["figures"]["competition_dice"] >= tuning["default_competition_dice"]
    assert tuning["classifier_sha256"] == _sha(cls)

    default = _evaluate(study, cls, seg, tmp_path / "ev-default")
    after = _evaluate(study, cls, tuned, tmp_path / "ev-tuned")
    # the scan with the tuned checkpoint uses its gate (tuned with this classifier) and its triplet
    assert after["source"]["thresholds"]["gate"] == pytest.approx(loaded.thresholds["gate"])
    # tune's figures are the scan's own on these images (same post-processing, CPU, model size = image size)
    assert after["competition_dice"] == pytest.approx(tuning["figures"]["competition_dice"], abs=1e-9)
    assert default["competition_dice"] == pytest.approx(tuning["default_competition_dice"], abs=1e-9)
    assert after["competition_dice"] >= default["competition_dice"]

    # a second run reads the cached predictions; writing over an input is refused
    again = _tune(study, cls, seg, tmp_path / "t2.pt")
    assert again.exit_code == 0, again.output
    assert "predictions read from the cache" in again.output
    refused = _tune(study, cls, seg, seg)
    assert refused.exit_code == 2 and "tune writes a new file" in refused.output


def test_tune_for_a_sensitivity(tiny: tuple[StudySummary, Path, Path], tmp_path: Path) -> None:
    """--sensitivity 1.0: the gate lets every labelled-positive image through to the segmenter."""
    study, cls, seg = tiny
    out = tmp_path / "sens.pt"
    result = _tune(study, cls, seg, out, "--sensitivity", "1.0")
    assert result.exit_code == 0, result.output
    from pneumotriage.models import load_model

    gate = load_model(out).thresholds["gate"]
    ev = _evaluate(study, cls, out, tmp_path / "ev")
    assert ev["image_level"]["operating_point"]["threshold"] == pytest.approx(gate)
    assert ev["image_level"]["operating_point"]["recall"] == 1.0
    labels = read_rle_csv(study.labels_csv)
    assert ev["n_positive"] == sum(bool(v) for v in labels.values())


def test_evaluate_and_tune_take_registry_names(
    tiny: tuple[StudySummary, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--classifier/--segmenter as registry names: missing -> exit 3 with the fetch command; once imported into
    the cache (hash checked), the same names evaluate and tune."""
    study, cls, seg = tiny
    registry = tmp_path / "weights.toml"
    registry.write_text(
        "".join(
            f'[tiny-{kind}]\nkind = "{kind}"\narch = "{arch}"\n{encoder}input_size = {SIZE}\n'
            f'normalisation = "imagenet"\nurl = "https://weights.invalid/tiny-{kind}.pt"\n'
            f'file = "tiny-{kind}.pt"\nsha256 = "{_sha(path)}"\n\n'
            for kind, arch, encoder, path in (
                ("classifier", "resnet34", "", cls),
                ("segmenter", "unet", 'encoder = "resnet34"\n', seg),
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
    assert "2 other files were not scored" in " ".join(doc["notes"])
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
    refused = _tune(study, cls, blind, out, "--min-areas", "100000000")
    lines = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert "outlines none of the" in " ".join(refused.output.split()) and "--force" in refused.output
    assert not out.exists()
    forced = _tune(study, cls, blind, out, "--min-areas", "100000000", "--force")
    assert forced.exit_code == 0 and out.exists(), forced.output
    assert "chosen" in forced.output

    kept = _tune(study, cls, seg, tmp_path / "kept.pt")
    assert kept.exit_code == 0 and "chosen" in kept.output, kept.output


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

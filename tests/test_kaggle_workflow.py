"""The README's "From SIIM-ACR data to a Kaggle submission", end to end on a small synthetic study: fold runs of
both models with SWA, thresholds tuned on the out-of-fold predictions into an ensemble file, a submission against
a sample submission, and the ensemble against its members on a held-out test study."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.labels import read_rle_csv
from pneumotriage.models import load_model
from pneumotriage.models.ensemble import write_ensemble
from pneumotriage.synth import write_study

FOLDS = 2


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{' '.join(map(str, args))}\n{result.output}"
    return result.output


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The two torch threads this test's training was sized with, also when pytest-xdist gives each test process
    one: from scratch on 96 images, another thread count rounds differently, trains along another path, and
    at these few epochs may outline less (measured with one thread: a best fold Dice on positives of 0.06, and
    0.0 at 18 epochs, against > 0.1). Fast beside the other test process only with OpenMP's passive wait
    (conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_folds_swa_oof_tuning_ensemble_and_submission(tmp_path: Path) -> None:
    # Sizes where a network trained from scratch on a CPU learns the phantoms in seconds: the segmenter, a UNet
    # over the compact DenseNet encoder (UNet/ResNet34 took five times as long), at the images' own 128 px (at
    # 64 px and 32 training images it outlined nothing after 10 epochs; 10 epochs at lr 1e-3 outlined too little
    # here), the classifier, which is not what this test compares, small and brief.
    train = write_study(tmp_path / "train", 96, positive_rate=0.5, size=(128, 128), seed=21, ptx_scale=2.0)
    test = write_study(tmp_path / "test", 32, positive_rate=0.5, size=(128, 128), seed=22, ptx_scale=2.0)
    runs = tmp_path / "runs"
    common = ["--labels", train.labels_csv, "--folds", FOLDS, "--swa-epochs", 2, "--no-pretrained", "--device", "cpu"]
    common += ["--workers", 0, "--no-progress"]
    seg_options = ["--encoder", "densenet_mini", "--image-size", 128, "--epochs", 14, "--lr", "0.002"]
    seg_options += ["--positive-share", "0.8:0.4"]
    cls_options = ["--arch", "densenet_mini", "--image-size", 64, "--epochs", 3, "--lr", "0.001"]
    for k in range(FOLDS):
        _cli("train", "classifier", train.out, *common, *cls_options, "--fold", k, "--out", runs / f"cls{k}")
        _cli("train", "segmenter", train.out, *common, *seg_options, "--fold", k, "--out", runs / f"seg{k}")
        for kind in ("cls", "seg"):
            assert (runs / f"{kind}{k}" / "swa.pt").is_file() and (runs / f"{kind}{k}" / "oof.csv").is_file()
    segs = [runs / f"seg{k}" / "swa.pt" for k in range(FOLDS)]
    clss = [runs / f"cls{k}" / "swa.pt" for k in range(FOLDS)]

    # Each image's out-of-fold prediction comes from the one run that held it out: the oof.csv files cover the
    # training study once.
    oof_ids = [r["ImageId"] for k in range(FOLDS) for r in csv.DictReader(open(runs / f"seg{k}" / "oof.csv"))]
    assert sorted(oof_ids) == sorted(i.image_id for i in train.images)

    ensemble = runs / "ensemble.json"
    tune_args = ["tune", train.out, "--labels", train.labels_csv, "--oof", "--out", ensemble, "--no-progress"]
    tune_args += ["--workers", 0, "--no-cache", "--force"]
    for s, c in zip(segs, clss, strict=True):
        tune_args += ["--segmenter", s, "--classifier", c]
    _cli(*tune_args)
    doc = json.loads(ensemble.read_text())
    assert doc["tuning"]["out_of_fold"] and doc["tuning"]["images"] == 96 and len(doc["members"]) == FOLDS

    # The submission: exactly the sample's ImageIds, in its order, each row a mask of the scan's.
    sample = tmp_path / "sample_submission.csv"
    ids = [i.image_id for i in test.images][::-1]
    sample.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in ids))
    submission = tmp_path / "submission.csv"
    cls_args = [a for c in clss for a in ("--classifier", c)]
    _cli("submit", test.out, "--sample-submission", sample, "--segmenter", ensemble, *cls_args, "--out", submission)
    rows = list(csv.DictReader(open(submission, newline="")))
    assert [r["ImageId"] for r in rows] == ids
    assert set(read_rle_csv(submission)) == set(ids)
    worklist = json.loads((tmp_path / "submission.csv.scan" / "worklist.json").read_text())
    by_role = {m["role"]: m for m in worklist["models"]}
    assert len(by_role["segmenter"]["members"]) == len(by_role["classifier"]["members"]) == FOLDS

    # On the held-out test study, with every image segmented at the same (tuned) thresholds: the ensemble scores
    # at least as well as its worse member.
    tuned = load_model(ensemble).thresholds
    scores = {}
    for label, members in [("ensemble", segs)] + [(f"fold{k}", [s]) for k, s in enumerate(segs)]:
        model = write_ensemble(runs / f"eval-{label}.json", [load_model(m) for m in members], tuned)
        out = tmp_path / f"eval-{label}"
        _cli("evaluate", test.out, "--labels", test.labels_csv, "--segmenter", model, "--out", out,
             "--bootstrap", 0, "--workers", 0, "--no-progress", "--json")  # fmt: skip
        scores[label] = json.loads((out / "metrics.json").read_text())
    dice = {k: v["competition_dice"] for k, v in scores.items()}
    assert dice["ensemble"] >= min(dice["fold0"], dice["fold1"]) - 1e-9, dice
    # Not a comparison of empty outputs: the members outline pneumothoraces.
    assert max(v["dice_positive_mean"] for v in scores.values()) > 0.1, dice

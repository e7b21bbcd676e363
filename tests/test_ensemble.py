"""Ensembles: members' probabilities averaged at one size, ensemble files (members pinned by sha256), and the
names of every member in what a scan writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.folds import index_dataset
from pneumotriage.models import ModelSpec, build_model, load_model, save_checkpoint
from pneumotriage.models.ensemble import ensemble_of, write_ensemble
from pneumotriage.scan.infer import prepare_models
from pneumotriage.synth import StudySummary
from pneumotriage.train import TrainConfig, data_fingerprint, split_records
from pneumotriage.tune import oof_groups
from pneumotriage.weights import WeightError


def _checkpoint(folder: Path, spec: ModelSpec, seed: int, **extra: object) -> Path:
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    return save_checkpoint(folder / f"{spec.kind}-{seed}.pt", model, thresholds={"bottom_score": 0.3}, extra=extra)


@pytest.fixture
def members(tmp_path: Path) -> dict[str, list[Path]]:
    cls = [ModelSpec("classifier", "resnet34", input_size=64), ModelSpec("classifier", "resnet34", input_size=32)]
    seg = [ModelSpec("segmenter", "unet", "resnet34", input_size=64), ModelSpec("segmenter", "unet", "resnet34", 32)]
    return {
        "classifier": [_checkpoint(tmp_path, s, i) for i, s in enumerate(cls)],
        "segmenter": [_checkpoint(tmp_path, s, 10 + i) for i, s in enumerate(seg)],
    }


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


@torch.inference_mode()
def test_classifier_ensemble_averages_probabilities_at_each_members_size(members: dict[str, list[Path]]) -> None:
    loaded = [load_model(p) for p in members["classifier"]]
    ensemble = ensemble_of(loaded)
    assert ensemble.spec.input_size == 64 and ensemble.spec.kind == "classifier"
    x = torch.rand(3, 1, 64, 64)
    want = torch.stack([torch.sigmoid(m.model(_resized(x, m.spec.input_size))) for m in loaded]).mean(0)
    torch.testing.assert_close(torch.sigmoid(ensemble.model(x)), want, rtol=1e-5, atol=1e-6)
    # One member is that member, unchanged.
    assert ensemble_of(loaded[:1]) is loaded[0]


@torch.inference_mode()
def test_segmenter_ensemble_averages_maps_at_the_largest_size(members: dict[str, list[Path]]) -> None:
    loaded = [load_model(p) for p in members["segmenter"]]
    ensemble = ensemble_of(loaded)
    x = torch.rand(2, 1, 64, 64)
    maps = []
    for m in loaded:
        p = torch.sigmoid(m.model(_resized(x, m.spec.input_size))["mask"])
        maps.append(_resized(p, 64))
    out = ensemble.model(x)
    assert out["mask"].shape == (2, 1, 64, 64)
    torch.testing.assert_close(torch.sigmoid(out["mask"]), torch.stack(maps).mean(0), rtol=1e-4, atol=1e-5)
    # Set up as the scan runs it (batch norm folded inside every member, channels_last), it agrees.
    (prepared,) = prepare_models(torch.device("cpu"), ensemble)
    assert prepared is not None
    again = prepared.model(x.contiguous(memory_format=torch.channels_last))["mask"]
    torch.testing.assert_close(torch.sigmoid(again), torch.sigmoid(out["mask"]), rtol=1e-3, atol=1e-4)


def test_ensemble_identity_names_every_member_and_is_clinical_only_if_all_are(
    members: dict[str, list[Path]], tmp_path: Path
) -> None:
    spec = ModelSpec("segmenter", "unet", "resnet34", input_size=64)
    synthetic = _checkpoint(tmp_path, spec, 99, clinical=False, note="trained on synthetic images")
    loaded = [load_model(p) for p in members["segmenter"]]
    clinical = ensemble_of(loaded)
    mixed = ensemble_of([*loaded, load_model(synthetic)])
    assert [m["sha256"] for m in clinical.meta["members"]] == [m.sha256 for m in loaded]
    assert clinical.meta["clinical"] is True and clinical.sha256 not in {m.sha256 for m in loaded}
    assert mixed.meta["clinical"] is False and mixed.meta["note"] == "trained on synthetic images"
    with pytest.raises(Exception, match="mixes classifier and segmenter"):
        ensemble_of([load_model(members["classifier"][0]), loaded[0]])


def test_ensemble_file_round_trip_and_a_changed_member_is_refused(
    members: dict[str, list[Path]], tmp_path: Path
) -> None:
    loaded = [load_model(p) for p in members["segmenter"]]
    path = write_ensemble(tmp_path / "ens" / "segmenter.json", loaded, {"bottom_score": 0.42, "top_score": 0.7})
    doc = json.loads(path.read_text())
    assert doc["kind"] == "segmenter" and [m["sha256"] for m in doc["members"]] == [m.sha256 for m in loaded]
    assert doc["members"][0]["path"] == "../" + members["segmenter"][0].name  # relative to the file
    again = load_model(path)
    assert again.thresholds == {"bottom_score": 0.42, "top_score": 0.7}
    assert again.path == path
    assert [m["sha256"] for m in again.meta["members"]] == [m.sha256 for m in loaded]
    # A member rewritten since: its sha256 no longer matches the file's, and the load stops with one line.
    spec = ModelSpec("segmenter", "unet", "resnet34", input_size=64)
    torch.manual_seed(5)
    save_checkpoint(members["segmenter"][0], build_model(spec).eval())
    with pytest.raises(WeightError, match="member .* has sha256 .* the ensemble file expects"):
        load_model(path)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"format": "pneumotriage-ensemble", "format_version": 1, "members": []}))
    with pytest.raises(WeightError, match="lists no members"):
        load_model(damaged)


def _fold_run(folder: Path, study: StudySummary, kind: str, fold: int, folds: int, seed: int) -> Path:
    """A checkpoint as a fold run of ``pneumotriage train`` writes it (config and data fingerprint), untrained."""
    cfg = TrainConfig(kind, str(study.out), str(study.labels_csv), str(folder), image_size=64, fold=fold, folds=folds)
    train, val = split_records(cfg, list(index_dataset(study.out, study.labels_csv).records))
    torch.manual_seed(seed)
    model = build_model(cfg.spec()).eval()
    return save_checkpoint(
        folder / f"{kind}-fold{fold}" / "best.pt",
        model,
        config=cfg.to_dict(),
        data_fingerprint=data_fingerprint(train, val),
    )


def test_scan_with_an_ensemble_names_every_member(
    study: StudySummary, members: dict[str, list[Path]], tmp_path: Path
) -> None:
    """Repeating --segmenter and --classifier scans with ensembles; worklist.json, the CSV and the report name
    each member with its sha256."""
    out = tmp_path / "scan"
    args = ["scan", str(study.out), "--out", str(out), "--workers", "0", "--no-progress", "--segment-all"]
    for kind, paths in members.items():
        for p in paths:
            args += [f"--{kind}", str(p)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "worklist.json").read_text())
    by_role = {m["role"]: m for m in doc["models"]}
    for kind, paths in members.items():
        assert [m["sha256"] for m in by_role[kind]["members"]] == [load_model(p).sha256 for p in paths]
        assert by_role[kind]["input_size"] == 64
    rows = list(csv.DictReader(open(out / "worklist.csv", newline="")))
    assert len(rows) == 12 and rows[0]["segmenter"].startswith("ensemble of 2 (")
    assert members["segmenter"][1].name in rows[0]["segmenter"]
    report = (out / "report.html").read_text()
    assert report.count("member <b>") == 4


def test_tune_out_of_fold_writes_an_ensemble_file(study: StudySummary, tmp_path: Path) -> None:
    """tune --oof over a 2-fold ensemble: each image is predicted by the run that held it out, every image once;
    the result is an ensemble file of both members with the tuned thresholds, which scan then reads."""
    runs = tmp_path / "runs"
    segs = [_fold_run(runs, study, "segmenter", k, 2, 20 + k) for k in (0, 1)]
    clss = [_fold_run(runs, study, "classifier", k, 2, 30 + k) for k in (0, 1)]
    groups = oof_groups(
        list(index_dataset(study.out, study.labels_csv).records),
        ensemble_of([load_model(p) for p in segs]),
        ensemble_of([load_model(p) for p in clss]),
    )
    ids = [r.image_id for g in groups for r in g.records]
    assert len(ids) == len(set(ids)) == 12
    assert [g.classifier.path for g in groups if g.classifier] == clss
    out = tmp_path / "tuned.json"
    args = ["tune", str(study.out), "--labels", str(study.labels_csv), "--out", str(out), "--oof", "--force"]
    args += ["--workers", "0", "--no-progress", "--no-cache", "--top-scores", "0.5", "--min-areas", "0,500"]
    for s, c in zip(segs, clss, strict=True):
        args += ["--segmenter", str(s), "--classifier", str(c)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["tuning"]["out_of_fold"] is True and doc["tuning"]["images"] == 12
    assert [m["path"] for m in doc["members"]] == ["runs/segmenter-fold0/best.pt", "runs/segmenter-fold1/best.pt"]
    assert "gate" in doc["thresholds"]
    tuned = load_model(out)
    assert tuned.thresholds == doc["thresholds"] and len(tuned.members) == 2
    # A run of other data is refused with one line.
    other = _fold_run(tmp_path / "other", study, "segmenter", 0, 3, 1)
    result = CliRunner().invoke(
        app,
        [
            "tune",
            str(study.out),
            "--labels",
            str(study.labels_csv),
            "--oof",
            "--segmenter",
            str(other),
            "--segmenter",
            str(segs[1]),
            "--out",
            str(tmp_path / "x.json"),
            "--no-progress",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 2 and "overlaps another member's" in result.output

"""`pneumotriage demo`: the synthetic study scanned with the demo weights shipped in the package, and those weights
rebuilt from their recipe (both slow: the rebuild trains two models)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumotriage.cli import app


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _demo_tiers(out: Path) -> tuple[int, int, int, int]:
    """(pneumothoraces in the demo study, how many of them are urgent, how many other images are urgent, how many
    other images are in review)."""
    rows = _rows(out / "scan" / "worklist.csv")
    manifest = json.loads((out / "study" / "manifest.json").read_text())
    truth = {im["image_id"]: im["positive"] for im in manifest["images"]}
    assert all(r["status"] == "ok" for r in rows) and len(rows) == len(truth)
    urgent = [r["image_id"] for r in rows if r["tier"] == "urgent"]
    found = sum(truth[i] for i in urgent)
    negatives_in_review = sum(not truth[r["image_id"]] for r in rows if r["tier"] == "review")
    return sum(truth.values()), found, len(urgent) - found, negatives_in_review


@pytest.mark.slow
def test_demo_with_the_shipped_weights_finds_its_pneumothoraces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pneumotriage demo` on a fresh cache, in float32: copies both shipped demo weights into the cache, scans the
    synthetic study, and ranks at least 7 of its 8 pneumothoraces urgent, no other image urgent and at most 2 of
    its 12 negatives in review (the review threshold shipped with the demo segmenter, tuned for specificity 0.9);
    a second run reuses the cached weights."""
    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--workers", "0", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "not for clinical use" in result.output and result.output.count("copied from the package") == 2
    assert {p.name for p in (home / "weights").glob("demo-*.pt")} == {"demo-classifier.pt", "demo-segmenter.pt"}
    positives, found, false_urgent, negatives_in_review = _demo_tiers(out)
    assert (positives, false_urgent) == (8, 0) and found >= 7, _rows(out / "scan" / "worklist.csv")
    assert negatives_in_review <= 2, _rows(out / "scan" / "worklist.csv")
    assert f"({found} of the 8 true pneumothoraces)" in result.output
    assert (
        "demo-classifier and demo-segmenter: trained on synthetic images, not for clinical use"
        in (out / "scan" / "report.html").read_text()
    )

    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--workers", "0", "--seed", "8"])
    assert again.exit_code == 0 and "copied" not in again.output

    # An earlier release's copy of a bundled weight in the cache is replaced by the package's, not refused.
    stale = home / "weights" / "demo-segmenter.pt"
    stale.write_bytes(stale.read_bytes() + b"an earlier release")
    third = CliRunner().invoke(app, ["demo", "--out", str(out), "--workers", "0"])
    assert third.exit_code == 0 and "demo-segmenter: copied from the package" in third.output, third.output


@pytest.mark.slow
def test_the_shipped_demo_weights_are_what_the_recipe_trains_now(tmp_path: Path) -> None:
    """The full recipe checked without its eight minutes of training: each shipped file's training config is the
    one the recipe gives now, and it was trained and validated on the split of the study the recipe renders now
    (its data fingerprint). A recipe, study or split changed since the files were built fails here; whether a
    full rebuild on this CPU is as good as the shipped files is `weights fetch --rebuild`'s own report."""
    import dataclasses

    import torch

    from pneumotriage.demo import _LOCAL_FIELDS, RECIPES, demo_training_study, recipe_config
    from pneumotriage.folds import index_dataset
    from pneumotriage.train import data_fingerprint, split_records
    from pneumotriage.weights import bundled_path, load_registry

    study = demo_training_study(tmp_path / "study")
    records = index_dataset(study, study / "train-rle.csv").records
    for name, recipe in RECIPES.items():
        spec = load_registry().get_spec(name)
        shipped = torch.load(bundled_path(spec), map_location="cpu", weights_only=True)
        cfg = recipe_config(spec, recipe, study, tmp_path / "run", "fp32")
        expected = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOCAL_FIELDS}
        assert shipped["config"] == expected, name
        assert shipped["data_fingerprint"] == data_fingerprint(*split_records(cfg, records)), name


@pytest.mark.slow
def test_demo_weights_rebuild_runs_every_step_and_reports_against_the_shipped_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`weights fetch demo-classifier demo-segmenter --rebuild`, on a smaller run of the recipe (3 epochs, 64
    phantoms: the same steps, the classifier in its own process, tuning, packing, the cache's built-here record, in
    a minute instead of eight): each weight is built, compared with the shipped file, listed as built here, and the
    demo runs on them; `fetch --force` brings the shipped files back."""
    import functools

    import pneumotriage.demo as demo
    from pneumotriage.demo import Scale, quality

    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    monkeypatch.setenv("PNEUMOTRIAGE_PRECISION", "fp32")
    monkeypatch.setattr(demo, "build_all", functools.partial(demo.build_all, scale=Scale(epochs=3, images=64)))
    result = CliRunner().invoke(app, ["weights", "fetch", "demo-classifier", "demo-segmenter", "--rebuild"])
    assert result.exit_code == 0, result.output
    assert result.output.count("built demo-") == 2 and result.output.count("the shipped file") == 2
    listing = CliRunner().invoke(app, ["weights", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    for name in ("demo-classifier", "demo-segmenter"):
        assert rows[name]["status"] == "verified" and rows[name]["built_here"], rows[name]
        assert set(quality(home / "weights" / f"{name}.pt")), name  # the figures the rebuild compares
    out = tmp_path / "demo"
    ran = CliRunner().invoke(app, ["demo", "--out", str(out), "--workers", "0"])
    assert ran.exit_code == 0 and "copied" not in ran.output, ran.output
    assert len(_rows(out / "scan" / "worklist.csv")) == 20
    again = CliRunner().invoke(app, ["weights", "fetch", "demo-classifier", "demo-segmenter", "--force"])
    assert again.exit_code == 0, again.output
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["weights", "list", "--json"]).stdout)}
    assert not rows["demo-classifier"]["built_here"] and not rows["demo-segmenter"]["built_here"]

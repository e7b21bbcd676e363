"""The report's legend is built from the decisions that ran, so that it never contradicts a row: the classifier
then the segmenter, the classifier alone (--no-segment, or no segmenter given), the segmenter alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumotriage.postprocess import Thresholds
from pneumotriage.scan import Decisions
from pneumotriage.scan.outputs import summarise
from pneumotriage.scan.records import ImageResult, ScanSummary
from pneumotriage.scan.tiers import legend_items, tier_of


def _summary(
    roles: tuple[str, ...], *, gate: float = 0.3, review: float | None = None, no_segment: bool = False
) -> ScanSummary:
    models = [{"role": r, "name": f"{r}.pt", "clinical": True} for r in roles]
    return summarise(
        Path("out"),
        [],
        counts={},
        models=models,
        thresholds=Thresholds(gate=gate, review=review),
        no_segment=no_segment,
        plan={},
        skipped=[],
        timings={},
        urgent_probability=0.9,
    )


def _legend(summary: ScanSummary) -> dict[str, str]:
    return dict(legend_items(summary))


def test_the_cascade_legend_speaks_of_the_gate_and_the_outline_at_the_images_own_size() -> None:
    legend = _legend(_summary(("classifier", "segmenter")))
    assert "the segmenter outlined" in legend["urgent"] and "scaled to each image's size" in legend["urgent"]
    assert "segmented from the gate 0.3 up" in legend["urgent"]
    assert "nothing outlined but classifier probability ≥ the review threshold 0.3" in legend["review"]
    assert legend["routine"] == "nothing outlined and classifier probability below the review threshold 0.3"


def test_the_cascade_legend_gives_the_gate_and_the_review_threshold_each_once_as_stored() -> None:
    """Three decisions, three numbers: the gate 0.019583 (as `tune` stores it) and the review threshold 0.31 read
    the same wherever they appear, never 0.020 in one place and 0.0196 in another."""
    legend = _legend(_summary(("classifier", "segmenter"), gate=0.019583, review=0.31))
    text = " ".join(legend.values())
    assert "gate 0.019583" in legend["urgent"] and "review threshold 0.31" in legend["review"]
    assert "0.0196" not in text and "0.020" not in text
    assert "images below the gate" not in legend["routine"]  # the gate is below the review threshold
    low_review = _legend(_summary(("classifier", "segmenter"), gate=0.5, review=0.2))
    assert "images below the gate 0.5 are not segmented" in low_review["routine"]


@pytest.mark.parametrize("no_segment", [True, False], ids=["no-segment", "no-segmenter-given"])
def test_the_classifier_alone_never_says_the_segmenter_outlined(no_segment: bool) -> None:
    roles = ("classifier", "segmenter") if no_segment else ("classifier",)
    summary = _summary(roles, no_segment=no_segment)
    legend = _legend(summary)
    assert summary.decisions == "classifier" and "outline survived" not in legend["review"]
    assert "segmenter outlined" not in " ".join(legend.values())
    assert legend["urgent"].startswith("classifier probability ≥ 0.9")
    assert ("--no-segment" if no_segment else "no segmenter given") in legend["urgent"]
    assert "probability ≥ the review threshold 0.3 and below 0.9" in legend["review"]
    assert any("classifier only" in n for n in summary.notes)


def test_a_gate_above_the_urgent_probability_leaves_no_review_by_probability_and_the_legend_says_so() -> None:
    """The issue's case: the classifier's own gate 0.959 (and so its review threshold) above the urgent probability
    0.9. Rows urgent at 0.927 and routine below 0.9 must both agree with the legend."""
    summary = _summary(("classifier",), gate=0.959)
    legend = _legend(summary)
    assert "no image is review by its probability" in legend["review"]
    assert legend["routine"] == "probability below 0.9"
    options = Decisions(urgent_probability=0.9)
    tiers = {
        p: tier_of(
            ImageResult(image_id=str(p), path=f"{p}.dcm", status="ok", probability=p),
            Thresholds(gate=0.959),
            options,
            False,
        )
        for p in (0.927, 0.95, 0.5)
    }
    assert tiers == {0.927: "urgent", 0.95: "urgent", 0.5: "routine"}


def test_the_segmenter_alone_speaks_of_its_own_score() -> None:
    summary = _summary(("segmenter",), gate=0.5)
    legend = _legend(summary)
    assert summary.decisions == "segmenter" and "classifier" not in legend["review"] + legend["routine"]
    assert "no classifier" in legend["urgent"] and "image score" in legend["routine"]

"""Tiers and the worklist order."""

from __future__ import annotations

from pneumotriage.postprocess import Thresholds
from pneumotriage.scan import Decisions, ImageResult
from pneumotriage.scan.tiers import rank, tier_of


def test_tier_rules_and_ranking() -> None:
    o = Decisions(urgent_probability=0.9)
    r = ImageResult(image_id="a", path="a", status="ok", probability=0.7, area_px=10)
    assert tier_of(r, Thresholds(gate=0.5), o, segmented_run=True) == "urgent"
    r.area_px = 0
    assert tier_of(r, Thresholds(gate=0.5), o, segmented_run=True) == "review"
    assert tier_of(r, Thresholds(gate=0.8), o, segmented_run=True) == "routine"
    r.probability = 0.95
    assert tier_of(r, Thresholds(gate=0.5), o, segmented_run=False) == "urgent"
    bad = ImageResult(image_id="b", path="b", status="error", error="x")
    assert tier_of(bad, Thresholds(gate=0.5), o, segmented_run=True) == "review"
    results = [
        ImageResult(image_id="r1", path="", status="ok", probability=0.1, tier="routine"),
        ImageResult(image_id="e1", path="", status="error", tier="review"),
        ImageResult(image_id="v1", path="", status="ok", probability=0.6, tier="review"),
        ImageResult(image_id="u1", path="", status="ok", probability=0.8, tier="urgent", area_px=5),
        ImageResult(image_id="u2", path="", status="ok", probability=0.8, tier="urgent", area_px=50),
    ]
    assert [x.image_id for x in rank(results)] == ["u2", "u1", "v1", "e1", "r1"]


def test_the_gate_and_the_review_threshold_are_two_decisions() -> None:
    """The gate only sends images to the segmenter; an image with nothing outlined is review from the review
    threshold up, whatever the gate; an outline is urgent whatever the probability."""
    o = Decisions(urgent_probability=0.9)
    t = Thresholds(gate=0.02, review=0.3)
    assert t.as_dict()["review"] == 0.3 and Thresholds(gate=0.02).review == 0.02  # unset: the gate, as before
    tiers = {
        p: tier_of(ImageResult(image_id="a", path="a", status="ok", probability=p, area_px=0), t, o, True)
        for p in (0.01, 0.05, 0.29, 0.3, 0.95)
    }
    assert tiers == {0.01: "routine", 0.05: "routine", 0.29: "routine", 0.3: "review", 0.95: "review"}
    outlined = ImageResult(image_id="b", path="b", status="ok", probability=0.05, area_px=40)
    assert tier_of(outlined, t, o, True) == "urgent"
    # the classifier alone: urgent from urgent_probability, review from the review threshold
    alone = {
        p: tier_of(ImageResult(image_id="c", path="c", status="ok", probability=p), t, o, False)
        for p in (0.1, 0.5, 0.95)
    }
    assert alone == {0.1: "routine", 0.5: "review", 0.95: "urgent"}


def test_each_row_says_why_in_plain_words_and_its_own_units() -> None:
    from pneumotriage.scan.tiers import reason_of

    t = Thresholds(gate=0.2, review=0.5)

    def row(**kw: object) -> ImageResult:
        r = ImageResult(image_id="a", path="/in/a.dcm", status="ok", **kw)  # type: ignore[arg-type]
        r.tier = tier_of(r, t, Decisions(urgent_probability=0.9), segmented_run=True)
        return r

    outlined = row(probability=0.97, segmented=True, area_px=900, area_cm2=8.25, side="left")
    assert reason_of(outlined, t, "cascade") == "outlined 8.2 cm² on the left"
    no_spacing = row(probability=0.97, segmented=True, area_px=745, side="both")
    assert reason_of(no_spacing, t, "cascade") == "outlined 745 px on both sides"
    assert reason_of(row(probability=0.94, segmented=True, area_px=0), t, "cascade") == (
        "classifier 0.940, nothing outlined"
    )
    assert reason_of(row(probability=0.1), t, "cascade") == "classifier 0.100, not segmented (below the gate 0.2)"
    flagged = row(probability=0.9, segmented=True, area_px=9000, flag="implausible outline — check: it covers 80%")
    assert reason_of(flagged, t, "cascade").startswith("implausible outline — check: it covers 80%")
    assert reason_of(row(probability=0.6, segmented=True), t, "segmenter").startswith("segmenter score 0.600")
    alone = ImageResult(image_id="a", path="a", status="ok", probability=0.95, tier="urgent")
    assert reason_of(alone, t, "classifier", 0.9) == "classifier 0.950 ≥ 0.9 (classifier alone, no outlines)"
    # A row not triaged or unreadable gives the reason without the file's path (the row names the file).
    ct = ImageResult("h", "/in/h.dcm", "not triaged", error="/in/h.dcm: not triaged: modality CT (--accept ...)")
    assert reason_of(ct, t, "cascade") == "not triaged: modality CT (--accept ...)"
    broken = ImageResult("b", "/in/b.dcm", "error", error="/in/b.dcm: the file ends early")
    assert reason_of(broken, t, "cascade") == "unreadable: the file ends early"

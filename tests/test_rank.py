"""Tiers and the worklist order."""

from __future__ import annotations

from pneumotriage.scan import ImageResult, ScanOptions
from pneumotriage.scan.rank import rank, tier_of


def test_tier_rules_and_ranking() -> None:
    o = ScanOptions(urgent_probability=0.9)
    r = ImageResult(image_id="a", path="a", status="ok", probability=0.7, area_px=10)
    assert tier_of(r, 0.5, o, segmented_run=True) == "urgent"
    r.area_px = 0
    assert tier_of(r, 0.5, o, segmented_run=True) == "review"
    assert tier_of(r, 0.8, o, segmented_run=True) == "routine"
    r.probability = 0.95
    assert tier_of(r, 0.5, o, segmented_run=False) == "urgent"
    bad = ImageResult(image_id="b", path="b", status="error", error="x")
    assert tier_of(bad, 0.5, o, segmented_run=True) == "review"
    results = [
        ImageResult(image_id="r1", path="", status="ok", probability=0.1, tier="routine"),
        ImageResult(image_id="e1", path="", status="error", tier="review"),
        ImageResult(image_id="v1", path="", status="ok", probability=0.6, tier="review"),
        ImageResult(image_id="u1", path="", status="ok", probability=0.8, tier="urgent", area_px=5),
        ImageResult(image_id="u2", path="", status="ok", probability=0.8, tier="urgent", area_px=50),
    ]
    assert [x.image_id for x in rank(results)] == ["u2", "u1", "v1", "e1", "r1"]

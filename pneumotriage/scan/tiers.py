"""Stage 9, rank: each row's tier by the documented priority rules, then the worklist order."""

from __future__ import annotations

from typing import Any

from pneumotriage.postprocess import Thresholds
from pneumotriage.scan.options import ScanOptions
from pneumotriage.scan.records import TIERS, ImageResult, Tier


def tier_of(result: ImageResult, thresholds: Thresholds, options: ScanOptions, segmented_run: bool) -> Tier:
    """Priority rules (documented in the README):

    - with segmentation: ``urgent`` when the segmenter outlined a pneumothorax; ``review`` when nothing was
      outlined but the probability reaches the review threshold, or when the outline is implausible (its
      ``flag``: never urgent on such an outline alone); otherwise ``routine``. (The gate decides only which
      images are segmented.)
    - classifier alone (``no_segment``): ``urgent`` at probability >= ``urgent_probability``, ``review`` at
      >= the review threshold, else ``routine``;
    - an image that could not be read: ``review`` (a person must look at it).
    """
    if result.status != "ok" or result.probability is None:
        return "review"
    if segmented_run and result.area_px:
        return "review" if result.flag else "urgent"
    if not segmented_run and result.probability >= options.urgent_probability:
        return "urgent"
    return "review" if result.probability >= thresholds.review_at else "routine"


def order_key(r: ImageResult) -> tuple[Any, ...]:
    """Where a row with its tier set stands in the worklist: tier, then (within a tier) readable images by
    probability and area, errors last of ``review``; ties by image id."""
    return (
        TIERS.index(r.tier),
        r.status != "ok",
        -(r.probability if r.probability is not None else -1.0),
        -(r.area_px or 0),
        r.image_id,
    )


def rank(results: list[ImageResult]) -> list[ImageResult]:
    """Most urgent first (:func:`order_key`), numbered from 1."""
    ranked = sorted(results, key=order_key)
    for i, r in enumerate(ranked, 1):
        r.rank = i
    return ranked


def tiered(
    rows: list[ImageResult], thresholds: Thresholds, options: ScanOptions, segmented_run: bool
) -> list[ImageResult]:
    """Each row's tier (:func:`tier_of`), then the worklist's order (:func:`rank`): how a scan, and a merge of a
    sharded scan, ends."""
    for r in rows:
        r.tier = tier_of(r, thresholds, options, segmented_run)
    return rank(rows)


def reason_of(r: ImageResult, thresholds: Thresholds, decisions: str, urgent_probability: float | None = None) -> str:
    """Why a ranked row has its tier, in plain words and the image's own units ("outlined 8.3 cm² on the left";
    "classifier 0.94, nothing outlined"; "not triaged: ..."). ``decisions`` is the scan's: "cascade", "classifier"
    or "segmenter" (:class:`~pneumotriage.scan.records.ScanSummary`)."""
    from pneumotriage.postprocess import shown

    if r.status != "ok":
        text = r.error or r.status
        if text.startswith(f"{r.path}: "):  # the file is the row's own: its reason alone
            text = text[len(r.path) + 2 :]
        if r.status == "not triaged" and not text.startswith("not triaged"):
            return f"not triaged: {text}"
        return text if r.status == "not triaged" else f"unreadable: {text}"
    score = "segmenter score" if decisions == "segmenter" else "classifier"
    p = f"{score} {r.probability:.3f}" if r.probability is not None else f"no {score} output"
    if r.flag:
        return f"{r.flag}; {p}"
    if r.area_px:
        area = f"{r.area_cm2:.1f} cm²" if r.area_cm2 is not None else f"{r.area_px} px"
        where = " on both sides" if r.side == "both" else f" on the {r.side}" if r.side else ""
        return f"outlined {area}{where}"
    if decisions == "classifier":
        urgent = shown(urgent_probability if urgent_probability is not None else ScanOptions.urgent_probability)
        return f"{p}" + (f" ≥ {urgent}" if r.tier == "urgent" else "") + " (classifier alone, no outlines)"
    if r.segmented:
        return f"{p}, nothing outlined"
    return f"{p}, not segmented (below the gate {shown(thresholds.gate)})"

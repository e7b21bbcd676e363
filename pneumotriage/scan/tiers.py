"""Stage 9, rank: each row's tier by the documented priority rules, then the worklist order; and the words
that explain them, in one place with the rules: each row's reason and the report's legend."""

from __future__ import annotations

from typing import Any

from pneumotriage.postprocess import Thresholds, shown
from pneumotriage.scan.options import Decisions
from pneumotriage.scan.records import TIERS, ImageResult, ScanSummary, Tier

#: The urgent probability of a scan by the classifier alone, unless given.
_URGENT = Decisions.urgent_probability


def tier_of(result: ImageResult, thresholds: Thresholds, decide: Decisions, segmented_run: bool) -> Tier:
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
    if not segmented_run and result.probability >= decide.urgent_probability:
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
    rows: list[ImageResult], thresholds: Thresholds, decide: Decisions, segmented_run: bool
) -> list[ImageResult]:
    """Each row's tier (:func:`tier_of`), then the worklist's order (:func:`rank`): how a scan, and a merge of a
    sharded scan, ends."""
    for r in rows:
        r.tier = tier_of(r, thresholds, decide, segmented_run)
    return rank(rows)


def reason_of(r: ImageResult, thresholds: Thresholds, decisions: str, urgent_probability: float | None = None) -> str:
    """Why a ranked row has its tier, in plain words and the image's own units ("outlined 8.3 cm² on the left";
    "classifier 0.94, nothing outlined"; "not triaged: ..."). ``decisions`` is the scan's: "cascade", "classifier"
    or "segmenter" (:class:`~pneumotriage.scan.records.ScanSummary`)."""
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
        urgent = shown(urgent_probability if urgent_probability is not None else _URGENT)
        return f"{p}" + (f" ≥ {urgent}" if r.tier == "urgent" else "") + " (classifier alone, no outlines)"
    if r.segmented:
        return f"{p}, nothing outlined"
    return f"{p}, not segmented (below the gate {shown(thresholds.gate)})"


_NOT_TRIAGED = (
    "an image <i>not triaged</i>: not a frontal chest radiograph, or not one read truly (its row says why; "
    "<code>--accept</code> widens the check)"
)


def legend_items(summary: ScanSummary) -> list[tuple[str, str]]:
    """What each tier means in this scan, built from the decisions that ran (the classifier alone, the classifier
    then the segmenter, or the segmenter alone) and the thresholds it ran at, so that it never contradicts a row."""
    from pneumotriage.scan.finish import MAX_BORDER_SHARE, MAX_OUTLINE_SHARE

    t = summary.thresholds
    gate, review = shown(t.gate), shown(t.review_at)
    unreadable = f"a file that could not be read, or {_NOT_TRIAGED}"
    if summary.decisions == "classifier":
        urgent = shown(summary.urgent_probability if summary.urgent_probability is not None else _URGENT)
        why = "--no-segment" if summary.no_segment else "no segmenter given"
        items = [("urgent", f"classifier probability ≥ {urgent} (the classifier alone: {why}; no outlines)")]
        if t.review_at < float(urgent):
            items.append(("review", f"probability ≥ the review threshold {review} and below {urgent}; or {unreadable}"))
            items.append(("routine", f"probability below the review threshold {review}"))
        else:  # a review threshold at or above the urgent probability leaves no probability for review
            items.append(
                (
                    "review",
                    f"{unreadable} (the review threshold {review} is not below {urgent}: no image is review by its "
                    "probability)",
                )
            )
            items.append(("routine", f"probability below {urgent}"))
        return items
    scaled = (
        f"at least {t.min_area:g} pixels of a 1024 x 1024 image (scaled to each image's size; the areas in the "
        f"rows are the image's own) above {shown(t.top_score)}, the outline then drawn at {shown(t.bottom_score)}"
        + (f", parts under {t.min_component:g} px (at 1024²) dropped" if t.min_component else "")
    )
    implausible = (
        f"an implausible outline (over {MAX_OUTLINE_SHARE:.0%} of the image, or along over {MAX_BORDER_SHARE:.0%} "
        "of an image border: marked <i>implausible outline — check</i>)"
    )
    if summary.decisions == "segmenter":
        return [
            ("urgent", f"the segmenter outlined a pneumothorax ({scaled}; every image segmented, no classifier)"),
            (
                "review",
                f"nothing outlined but the segmenter's image score (its probability column) ≥ the review threshold "
                f"{review}; {implausible}; or {unreadable}",
            ),
            ("routine", f"nothing outlined and the segmenter's image score below {review}"),
        ]
    routine = f"nothing outlined and classifier probability below the review threshold {review}"
    if t.gate > t.review_at:
        routine += f" (images below the gate {gate} are not segmented)"
    return [
        ("urgent", f"the segmenter outlined a pneumothorax ({scaled}; images segmented from the gate {gate} up)"),
        (
            "review",
            f"nothing outlined but classifier probability ≥ the review threshold {review}; {implausible}; "
            f"or {unreadable}",
        ),
        ("routine", routine),
    ]

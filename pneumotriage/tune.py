"""Choosing the operating thresholds on validation data.

The cascade's decisions after the models are five numbers: the classifier gate, the triplet rule's
``top_score`` / ``min_area`` / ``bottom_score`` and the smallest mask component kept. :func:`tune` picks them to
maximise the competition score (mean Dice, 1 for a correct empty mask) on labelled images, or fixes the gate for a
target sensitivity first.

1. The models run once over the images (probability maps at the segmenter's input size and the classifier's
   probability); the result is cached on disk under a key of the models' and images' identities.
2. Per image, counts are taken exactly as the scan would post-process it (:func:`pneumotriage.postprocess.outline`:
   probabilities resized to the image's own size, thresholded, small components dropped): for each grid value of
   ``bottom_score`` and ``min_component`` the predicted area and its overlap with the label, and for each
   ``top_score`` the number of confident pixels at the model's size.
3. The search is then arithmetic on those counts: an image's Dice is ``d_kept`` when the gate and the triplet let
   its mask through and ``d_empty`` otherwise, so the mean over images for every combination is one matrix
   product, ``mean(d_empty) + kept^T (d_kept - d_empty) / N``.

The figures reported are the scan's own on these images: scanning them with the tuned checkpoint gives the same
competition score (to float rounding where the scan ran on a GPU).

Why one module of ~660 lines: the three steps (predict once, count per image, search the grid) share one
data layout (:class:`Counts`) that no other module needs, and the out-of-fold grouping is part of step 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from pneumotriage.errors import UsageError
from pneumotriage.folds import ImageRecord, index_dataset
from pneumotriage.io import file_key
from pneumotriage.labels import RleLabels, read_rle_csv
from pneumotriage.metrics import binary_metrics, dice_from_counts, threshold_for_sensitivity
from pneumotriage.models import LoadedModel, save_checkpoint
from pneumotriage.postprocess import EIGHT_CONNECTED, Thresholds, min_confident, resize_window, scaled_area
from pneumotriage.runtime import Progress
from pneumotriage.scan import ScanOptions, scan_thresholds

PARAMETERS = Thresholds.NAMES
CACHE_VERSION = 2  # 2: inputs smaller than the display copy decoded as training decodes them


@dataclass(frozen=True)
class Grid:
    """The values tried for each threshold (``min_area`` and ``min_component`` in pixels at 1024²). The gate's
    grid is used only with a classifier; the input checkpoint's own values are always added."""

    top_score: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    min_area: tuple[float, ...] = (0.0, 250.0, 500.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0)
    bottom_score: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
    min_component: tuple[float, ...] = (0.0, 250.0, 500.0, 1000.0, 2000.0)
    gate: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(0, 20))

    def with_values(self, current: dict[str, float]) -> Grid:
        """This grid with ``current`` (the checkpoint's thresholds) added to each axis, each axis sorted."""
        return replace(
            self,
            **{k: tuple(sorted({*getattr(self, k), float(current[k])})) for k in PARAMETERS if k in current},
        )


@dataclass
class Predictions:
    """The models' outputs over the tuning images, in one order."""

    image_ids: list[str]
    shapes: np.ndarray  # (N, 2) rows, columns of each source image
    maps: np.ndarray  # (N, S, S) float32 segmenter probabilities at its input size
    classifier: np.ndarray | None  # (N,) classifier probabilities
    unreadable: list[str] = field(default_factory=list)


@dataclass
class Counts:
    """What the search needs, per image (see the module docstring)."""

    true_area: np.ndarray  # (N,)
    confident: np.ndarray  # (N, T) pixels above each top_score, at the model's size
    area: np.ndarray  # (N, B, M) predicted area per bottom_score and min_component
    inter: np.ndarray  # (N, B, M) overlap with the label
    model_size: tuple[int, int]


@dataclass
class TuneResult:
    thresholds: dict[str, float]
    defaults: dict[str, float]
    score: float
    default_score: float
    #: The best settings, best first: dicts of the five thresholds and ``competition_dice``.
    top: list[dict[str, float]]
    figures: dict[str, Any]
    out: Path
    cache: Path | None
    notes: list[str] = field(default_factory=list)
    #: The review threshold chosen (None without a classifier): its target, its figures here
    #: (:func:`review_figures`) and the same figures at the specificities of :data:`REVIEW_TABLE`.
    review: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------------------
# 1. predictions, cached


def _cache_key(
    records: Sequence[ImageRecord], segmenter: LoadedModel, classifier: LoadedModel | None, tta: bool
) -> str:
    digest = hashlib.sha256()
    head = {
        "version": CACHE_VERSION,
        "segmenter": segmenter.sha256,
        "classifier": classifier.sha256 if classifier is not None else None,
        "tta": tta,
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for r in records:
        digest.update(f"{r.image_id}|{file_key(r.path)}\n".encode())
    return digest.hexdigest()[:24]


def _load_cached(folder: Path, image_ids: list[str]) -> Predictions | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("image_ids") != image_ids:
            return None
        maps = np.load(folder / "maps.npy", mmap_mode="r")[: len(meta["readable"])]
        classifier = np.load(folder / "classifier.npy") if meta.get("classifier") else None
        shapes = np.load(folder / "shapes.npy")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return Predictions(list(meta["readable"]), shapes, maps, classifier, list(meta.get("unreadable", [])))


def predict(
    records: Sequence[ImageRecord],
    *,
    segmenter: LoadedModel,
    classifier: LoadedModel | None,
    cache_root: Path | None,
    scratch: Path,
    tta: bool = False,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[Predictions, Path | None]:
    """Run the models over ``records`` once, or read their outputs from ``cache_root`` when these exact models
    and files were predicted before. Returns the predictions and the cache folder (None without a cache).

    The probability maps go straight into a memory-mapped file (N x S x S float32: 2.5 GB for 2,400 images at
    512 px), never all into memory: under ``cache_root`` when caching, else in ``scratch``, which must outlive
    the returned predictions."""
    from pneumotriage.runtime import pick_device
    from pneumotriage.scan import choose_backends, classify, decoded_batches, plan_for, prepare_models, segment, turned

    emit = progress or (lambda event: None)
    ids = [r.image_id for r in records]
    folder = cache_root / _cache_key(records, segmenter, classifier, tta) if cache_root is not None else None
    if folder is not None and folder.is_dir():
        cached = _load_cached(folder, ids)
        if cached is not None:
            emit({"event": "cached", "path": str(folder)})
            return cached, folder

    torch_device = pick_device(device)
    options = ScanOptions(batch_size=batch_size, workers=workers, device=device, backend=backend)
    plan = plan_for(
        options, torch_device, max([segmenter.spec.input_size] + ([classifier.spec.input_size] if classifier else []))
    )
    size = segmenter.spec.input_size
    keys = [segmenter.spec.input_key] + ([classifier.spec.input_key] if classifier is not None else [])
    n = len(records)
    work = folder.with_name(f"{folder.name}.partial-{os.getpid()}") if folder is not None else scratch
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    maps = np.lib.format.open_memmap(work / "maps.npy", mode="w+", dtype=np.float32, shape=(n, size, size))
    cls = np.zeros(n, dtype=np.float32) if classifier is not None else None
    shapes = np.zeros((n, 2), dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    unreadable: list[str] = []
    loaded = (classifier, segmenter)
    classifier, ready = prepare_models(torch_device, classifier, segmenter)
    (classifier, ready), _ = choose_backends(
        torch_device,
        (loaded[0], classifier),
        (loaded[1], ready),
        backend=backend,
        batch=plan.batch_size,
        threads=plan.torch_threads,
    )
    assert ready is not None
    segmenter = ready
    done = 0
    # The scan's own decoding, over the records in order.
    with decoded_batches([(r.path, r.image_id) for r in records], keys, plan, torch_device) as batches:
        for index, batch in batches:
            unreadable += [decoded.error or str(found.path) for found, decoded in batch.failed]
            done += len(index) + len(batch.failed)
            if index:
                probs, _ = segment(segmenter, batch.inputs[segmenter.spec.input_key], torch_device, tta)
                found_maps = probs.cpu().numpy()
                for j, item in enumerate(batch.items):
                    if any(item.decoded.flip):  # an image turned upright: its map back on the stored grid
                        found_maps[j] = turned(found_maps[j], item.decoded.flip).copy()
                maps[index] = found_maps
                if classifier is not None and cls is not None:
                    cls[index] = classify(classifier, batch.inputs[classifier.spec.input_key], torch_device)
                shapes[index] = np.asarray([item.decoded.shape for item in batch.items])
                # A model's answer that is not a number never enters a metric or a threshold: as unreadable.
                finite = np.isfinite(found_maps.reshape(len(index), -1)).all(axis=1)
                if cls is not None:
                    finite &= np.isfinite(cls[index])
                ok[index] = finite
                unreadable += [
                    f"{item.found.path}: the model's output for it is not a number (damaged weights?)"
                    for item, good in zip(batch.items, finite.tolist(), strict=True)
                    if not good
                ]
            emit({"event": "predicted", "done": done, "total": n})
    keep = np.flatnonzero(ok)
    for j, i in enumerate(keep):  # readable images first, in order (in place: j <= i)
        if i != j:
            maps[j] = maps[i]
    maps.flush()
    prediction = Predictions(
        [ids[i] for i in keep], shapes[keep], maps[: len(keep)], cls[keep] if cls is not None else None, unreadable
    )
    if folder is not None:
        _store(work, folder, ids, prediction)
        prediction.maps = np.load(folder / "maps.npy", mmap_mode="r")[: len(keep)]
    return prediction, folder


def _store(work: Path, folder: Path, ids: list[str], p: Predictions) -> None:
    """Finish the cache in ``work`` (which holds the maps), then rename it into place: a cache folder is complete
    or absent."""
    np.save(work / "shapes.npy", p.shapes)
    if p.classifier is not None:
        np.save(work / "classifier.npy", p.classifier)
    meta = {
        "image_ids": ids,
        "readable": p.image_ids,
        "classifier": p.classifier is not None,
        "unreadable": p.unreadable,
    }
    (work / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(work, folder)


# --------------------------------------------------------------------------------------------------------------
# 2. counts


def count(predictions: Predictions, labels: RleLabels, grid: Grid, progress: Progress | None = None) -> Counts:
    """Per-image counts for every grid value, post-processed as the scan does (see the module docstring)."""
    emit = progress or (lambda event: None)
    tops = torch.tensor(grid.top_score, dtype=torch.float32)
    n, b_n, m_n = len(predictions.image_ids), len(grid.bottom_score), len(grid.min_component)
    true_area = np.zeros(n, dtype=np.int64)
    confident = np.zeros((n, len(tops)), dtype=np.int64)
    area = np.zeros((n, b_n, m_n), dtype=np.int64)
    inter = np.zeros((n, b_n, m_n), dtype=np.int64)
    for i, image_id in enumerate(predictions.image_ids):
        if i % 16 == 0:
            emit({"event": "counted", "done": i, "total": n})
        p = torch.from_numpy(np.array(predictions.maps[i], dtype=np.float32))
        confident[i] = (p[None] > tops[:, None, None]).flatten(1).sum(1).numpy()
        rows, cols = (int(v) for v in predictions.shapes[i])
        truth = labels.masks_for(image_id, rows, cols) if labels[image_id] else None
        true_area[i] = np.count_nonzero(truth) if truth is not None else 0
        # The resized map only where the lowest bottom_score can be exceeded: the same values as the scan's.
        window = resize_window(p.numpy(), (rows, cols), min(grid.bottom_score))
        if window is None:
            continue
        h, w = window.values.shape
        if truth is not None:
            truth = truth[window.top : window.top + h, window.left : window.left + w]
        for bi, bottom in enumerate(grid.bottom_score):
            mask = window.values > bottom
            if not mask.any():
                continue
            components, k = ndimage.label(mask, structure=EIGHT_CONNECTED)
            sizes = np.bincount(components.ravel(), minlength=k + 1)
            hits = np.bincount(components[truth], minlength=k + 1) if truth is not None else np.zeros(k + 1, np.int64)
            sizes[0] = hits[0] = 0
            for mi, smallest in enumerate(grid.min_component):
                kept = sizes >= scaled_area(smallest, (rows, cols)) if smallest > 0 else sizes > 0
                area[i, bi, mi] = sizes[kept].sum()
                inter[i, bi, mi] = hits[kept].sum()
    emit({"event": "counted", "done": n, "total": n})
    size = tuple(predictions.maps.shape[1:3])
    return Counts(true_area, confident, area, inter, (int(size[0]), int(size[1])))


# --------------------------------------------------------------------------------------------------------------
# 3. search


def scores(counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float]) -> np.ndarray:
    """The competition score of every combination, shape (T, A, G, B, M) over top_score, min_area, gate,
    bottom_score, min_component (G = 1 without a classifier: every image is segmented, as the scan does)."""
    n = len(counts.true_area)
    need = np.array([min_confident(a, counts.model_size) for a in grid.min_area])
    triplet = counts.confident[:, :, None] >= need[None, None, :]  # (N, T, A)
    if classifier is None:
        passed = np.ones((n, 1), dtype=bool)
    else:
        passed = classifier[:, None] >= np.asarray(gates, dtype=np.float32)[None, :]  # (N, G)
    kept = (triplet[:, :, :, None] & passed[:, None, None, :]).reshape(n, -1).astype(np.float64)
    d_empty = (counts.true_area == 0).astype(np.float64)
    d_kept = dice_from_counts(counts.inter, counts.area, counts.true_area[:, None, None])  # (N, B, M)
    gain = (d_kept - d_empty[:, None, None]).reshape(n, -1)
    table: np.ndarray = d_empty.mean() + kept.T @ gain / n
    t_n, a_n, g_n = triplet.shape[1], triplet.shape[2], passed.shape[1]
    return table.reshape(t_n, a_n, g_n, len(grid.bottom_score), len(grid.min_component))


def _setting(grid: Grid, gates: Sequence[float], index: tuple[int, ...]) -> dict[str, float]:
    t, a, g, b, m = index
    return {
        "gate": float(gates[g]),
        "top_score": float(grid.top_score[t]),
        "min_area": float(grid.min_area[a]),
        "bottom_score": float(grid.bottom_score[b]),
        "min_component": float(grid.min_component[m]),
    }


def _index_of(grid: Grid, gates: Sequence[float], setting: dict[str, float]) -> tuple[int, ...]:
    return (
        list(grid.top_score).index(setting["top_score"]),
        list(grid.min_area).index(setting["min_area"]),
        list(gates).index(setting["gate"]),
        list(grid.bottom_score).index(setting["bottom_score"]),
        list(grid.min_component).index(setting["min_component"]),
    )


def _outlined(
    counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float], index: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Each tuning image's mask area and overlap with its label at one setting (0 where nothing is outlined)."""
    t, a, g, b, m = index
    need = min_confident(grid.min_area[a], counts.model_size)
    kept = counts.confident[:, t] >= need
    if classifier is not None:
        kept &= classifier >= gates[g]
    return np.where(kept, counts.area[:, b, m], 0), np.where(kept, counts.inter[:, b, m], 0)


def _figures(
    counts: Counts, grid: Grid, classifier: np.ndarray | None, gates: Sequence[float], index: tuple[int, ...]
) -> dict[str, Any]:
    """The scan's figures on the tuning images at one setting: competition score, Dice on positives, and the
    image-level decision "a mask was drawn" against the labels."""
    area, inter = _outlined(counts, grid, classifier, gates, index)
    dice = dice_from_counts(inter, area, counts.true_area)
    y = counts.true_area > 0
    decision = binary_metrics(y, (area > 0).astype(float), 0.5)
    return {
        "competition_dice": float(dice.mean()),
        "dice_positive_mean": float(dice[y].mean()) if y.any() else None,
        "sensitivity": decision["recall"],
        "specificity": decision["specificity"],
        "n_images": int(len(y)),
        "n_positive": int(y.sum()),
    }


# --------------------------------------------------------------------------------------------------------------
# the review threshold

#: The review specificity `tune` aims at unless told: nine in ten negatives with nothing outlined stay routine.
#: (The demo study's negatives, 12, then have at most 2 in review: test_demo checks it.)
DEFAULT_REVIEW_SPECIFICITY = 0.9
#: The specificities `tune` reports the review threshold's figures at, beside the chosen one.
REVIEW_TABLE = (0.5, 0.8, 0.9, 0.95, 0.99)


def review_figures(y: np.ndarray, outlined: np.ndarray, p: np.ndarray, review: float) -> dict[str, Any]:
    """The triage at a review threshold: an outlined image is urgent, one with nothing outlined is review when its
    probability ``p`` reaches ``review``, else routine. Sensitivity: the positives urgent or review; specificity:
    the negatives routine; review share: the images in review."""
    y, outlined = np.asarray(y, dtype=bool), np.asarray(outlined, dtype=bool)
    review_tier = ~outlined & (np.asarray(p) >= review)
    flagged = outlined | review_tier
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "review": float(review),
        "sensitivity": float(flagged[y].mean()) if n_pos else None,
        "specificity": float((~flagged[~y]).mean()) if n_neg else None,
        "review_share": float(review_tier.mean()) if len(y) else 0.0,
        "urgent": int(outlined.sum()),
        "in_review": int(review_tier.sum()),
        "negatives_in_review": int((review_tier & ~y).sum()),
        "positives_routine": int((~flagged & y).sum()),
        "n_images": int(len(y)),
        "n_positive": n_pos,
    }


def _shortest_above(lo: float, hi: float) -> float:
    """The number with the fewest decimals (up to 6) in (lo, hi]: a threshold that reads the same everywhere."""
    for d in range(1, 7):
        scale = 10.0**d
        c = (math.floor(lo * scale) + 1) / scale
        if lo < c <= hi:
            return c
    return hi


def review_threshold(
    y: np.ndarray, outlined: np.ndarray, p: np.ndarray, *, specificity: float | None = None, share: float | None = None
) -> tuple[float, str | None]:
    """The lowest review threshold (so the most positives the segmenter missed still reach a person) at which at
    least ``specificity`` of the negatives stay routine, or at most ``share`` of the images go to review. Returns
    it and a note where the target cannot be met (negatives the segmenter outlined are never routine)."""
    y, outlined, p = np.asarray(y, dtype=bool), np.asarray(outlined, dtype=bool), np.asarray(p, dtype=np.float64)
    free = np.sort(p[~outlined])  # the images the review threshold decides, ascending
    note = None
    if share is not None:
        allowed = math.floor(share * len(y) + 1e-9)  # images that may go to review
        if allowed >= len(free):
            return 0.0, None
        lo = float(free[len(free) - allowed - 1])  # the highest probability that must stay routine
    else:
        target = DEFAULT_REVIEW_SPECIFICITY if specificity is None else specificity
        negatives = np.sort(p[~outlined & ~y])
        need = math.ceil(target * int((~y).sum()) - 1e-9)  # negatives that must stay routine
        if need <= 0:
            return 0.0, None
        if need > len(negatives):  # out of reach: every negative left alone is made routine
            note = (
                f"review specificity {target:g} cannot be met: the segmenter outlines "
                f"{int((outlined & ~y).sum())} of the {int((~y).sum())} negatives here; every negative it leaves "
                "alone is routine"
            )
        lo = float(negatives[min(need, len(negatives)) - 1]) if len(negatives) else 0.0
    above = free[free > lo]
    hi = float(above[0]) if len(above) else 1.0
    return _shortest_above(lo, hi), note


# --------------------------------------------------------------------------------------------------------------
# out-of-fold


@dataclass
class Group:
    """Images and the models that predict them: all images and the models given, or (out-of-fold) one fold's
    validation images and the member trained without them."""

    records: list[ImageRecord]
    segmenter: LoadedModel
    classifier: LoadedModel | None


def _fold_of(member: LoadedModel, records: list[ImageRecord], option: str) -> tuple[tuple[Any, ...], list[ImageRecord]]:
    """A fold run's identity (fold, folds, seed, val_fraction) and its validation records among ``records``,
    which must be the images and labels it was trained on."""
    from pneumotriage.train import TrainConfig, data_fingerprint, split_records

    where = member.path or member.name
    config = member.meta.get("config")
    if not isinstance(config, dict) or not config:
        raise UsageError(
            f"{option} {where}: no training config in it, so its validation fold is unknown",
            hint="--oof takes the best.pt (or swa.pt) of `pneumotriage train` runs with --fold K --folds N",
        )
    cfg = TrainConfig.from_dict(config)
    train, val = split_records(cfg, records)
    if data_fingerprint(train, val) != member.meta.get("data_fingerprint"):
        raise UsageError(
            f"{option} {where} was trained on other images or labels than these",
            hint="--oof needs DATA and --labels to be the training data the fold runs were given",
        )
    return (cfg.fold, cfg.folds, cfg.seed, cfg.val_fraction), val


def oof_groups(records: list[ImageRecord], segmenter: LoadedModel, classifier: LoadedModel | None) -> list[Group]:
    """Out-of-fold groups: each member of the segmenter (fold) ensemble predicts only the images of its own
    validation fold, with the classifier member of the same fold (or, for one classifier, that one), so that no
    image is predicted by a model that saw it in training."""
    groups: list[Group] = []
    covered: set[str] = set()
    classifiers: dict[tuple[Any, ...], LoadedModel] = {}
    if classifier is not None and classifier.members:
        for c in classifier.members:
            fold, _ = _fold_of(c, records, "--classifier")
            classifiers[fold] = c
    for member in segmenter.members or [segmenter]:
        fold, val = _fold_of(member, records, "--segmenter")
        ids = {r.image_id for r in val}
        if ids & covered:
            raise UsageError(
                f"--segmenter {member.path or member.name}: its validation fold overlaps another member's",
                hint="--oof takes one run per fold (--fold 0 .. --fold N-1 of the same --folds and --seed)",
            )
        covered |= ids
        partner = classifier
        if classifier is not None and classifier.members:
            if fold not in classifiers:
                raise UsageError(
                    f"no --classifier was trained on fold {fold[0]} of {fold[1]} (seed {fold[2]}), the fold of "
                    f"--segmenter {member.path or member.name}",
                    hint="give one classifier run per fold, or a single classifier",
                )
            partner = classifiers[fold]
        groups.append(Group(val, member, partner))
    return groups


def _joined(parts: list[Predictions], counts: list[Counts]) -> tuple[Predictions, Counts]:
    """The groups' predictions and counts as one set (maps are not joined: the search needs only the counts)."""
    if len({c.model_size for c in counts}) > 1:
        raise UsageError("--oof: the fold segmenters have different input sizes; tune needs one size")
    cls = [p.classifier for p in parts]
    joined = Predictions(
        [i for p in parts for i in p.image_ids],
        np.concatenate([p.shapes for p in parts]),
        np.zeros((0, 1, 1), dtype=np.float32),
        np.concatenate(cls) if all(c is not None for c in cls) else None,  # type: ignore[arg-type]
        [u for p in parts for u in p.unreadable],
    )
    return joined, Counts(
        np.concatenate([c.true_area for c in counts]),
        np.concatenate([c.confident for c in counts]),
        np.concatenate([c.area for c in counts]),
        np.concatenate([c.inter for c in counts]),
        counts[0].model_size,
    )


# --------------------------------------------------------------------------------------------------------------
# the whole job


def tune(
    data: str | Path,
    labels_csv: str | Path,
    *,
    segmenter: LoadedModel,
    classifier: LoadedModel | None,
    out: str | Path,
    grid: Grid | None = None,
    sensitivity: float | None = None,
    cache_root: Path | None = None,
    tta: bool = False,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    top_k: int = 10,
    progress: Progress | None = None,
    force: bool = False,
    oof: bool = False,
    review_specificity: float | None = None,
    review_share: float | None = None,
) -> TuneResult:
    """Tune the thresholds on the labelled DICOMs under ``data`` and write a copy of the segmenter's checkpoint
    with them (and the figures they reach here) to ``out``; the input checkpoint is never modified. For an
    ensemble segmenter, ``out`` is an ensemble file (JSON) naming the members with the tuned thresholds.

    With ``oof`` the segmenter is a fold ensemble (or one fold run) and ``data`` its training data: each image is
    predicted only by the member whose validation fold holds it (:func:`oof_groups`), and the thresholds are
    chosen on those out-of-fold predictions.

    Where the best setting outlines none of the positive images here (sensitivity 0: a segmenter that has not
    learnt, or thresholds no outline passes), nothing is written unless ``force``: such a checkpoint would tier
    every image routine or review.

    With a classifier, the review threshold (an image with nothing outlined goes to a person from this
    probability up) is chosen last, at the chosen gate and triplet, as the lowest that keeps
    ``review_specificity`` of the negatives routine (default :data:`DEFAULT_REVIEW_SPECIFICITY`), or that sends at
    most ``review_share`` of the images to review (:func:`review_threshold`)."""
    out = Path(out)
    for m in (segmenter, classifier):
        if m is not None and m.path is not None and out.resolve() == m.path.resolve():
            raise UsageError("--out is an input checkpoint: tune writes a new file", path=out)
    if sensitivity is not None and classifier is None:
        raise UsageError("--sensitivity sets the classifier's gate: give --classifier")
    if sensitivity is not None and not 0.0 < sensitivity <= 1.0:
        raise UsageError(f"--sensitivity {sensitivity}: give a share in (0, 1]")
    for option, value in (("--review-specificity", review_specificity), ("--review-share", review_share)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UsageError(f"{option} {value}: give a share from 0 to 1")
        if value is not None and classifier is None:
            raise UsageError(f"{option} sets the review threshold on the classifier's probability: give --classifier")
    if review_specificity is not None and review_share is not None:
        raise UsageError("give --review-specificity or --review-share, not both")
    index = index_dataset(data, labels_csv)
    if not index.records:
        raise UsageError("no labelled DICOM found: the label file's ImageIds must be the file names", path=data)
    labels = read_rle_csv(labels_csv)
    # The thresholds the scan would use with these checkpoints: the baseline the chosen setting must beat.
    current = scan_thresholds(classifier, segmenter, ScanOptions()).as_dict()
    if classifier is None:
        current["gate"] = 0.0  # without a classifier the scan segments every image
    grid = (grid or Grid()).with_values(current)
    ensemble = bool(segmenter.members)
    if ensemble and out.suffix.lower() != ".json":
        raise UsageError("an ensemble is tuned into an ensemble file: give --out a name ending in .json", path=out)
    notes: list[str] = []
    if oof:
        groups = oof_groups(list(index.records), segmenter, classifier)
        notes.append(
            f"out-of-fold: {len(groups)} fold run(s), each predicting its own validation images only "
            f"({sum(len(g.records) for g in groups)} of {len(index.records)} images)"
        )
        if classifier is not None and not classifier.members:
            notes.append("one classifier for every fold: its probabilities are not out-of-fold")
    else:
        groups = [Group(list(index.records), segmenter, classifier)]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, not in /tmp (often a RAM disk): the maps may be gigabytes. They are needed only until
    # the per-image counts are taken.
    parts: list[Predictions] = []
    part_counts: list[Counts] = []
    cache: Path | None = None
    with tempfile.TemporaryDirectory(prefix=".pneumotriage-tune-", dir=out.parent) as scratch:
        for i, group in enumerate(groups):
            part, cache = predict(
                group.records,
                segmenter=group.segmenter,
                classifier=group.classifier,
                cache_root=cache_root,
                scratch=Path(scratch) / f"maps{i}",
                tta=tta,
                device=device,
                backend=backend,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
            )
            parts.append(part)
            part_counts.append(count(part, labels, grid, progress))
        predictions, counts = _joined(parts, part_counts) if len(parts) > 1 else (parts[0], part_counts[0])
        if not predictions.image_ids:
            raise UsageError("none of the labelled images could be read", path=data)
    y = counts.true_area > 0
    cls = predictions.classifier
    if cls is None:
        gates: list[float] = [0.0]
        notes.append("no classifier: every image is segmented; the gate is not tuned")
    elif sensitivity is not None:
        if not y.any():
            raise UsageError("--sensitivity needs positive images among the labels")
        # Rounded down to 6 decimals (the worklist's precision), so no positive it lets through is lost to rounding.
        gates = [math.floor(threshold_for_sensitivity(y, cls, sensitivity) * 1e6) / 1e6]
        notes.append(f"gate fixed at {gates[0]:g} for classifier sensitivity >= {sensitivity:g} on these images")
    else:
        gates = list(grid.gate)
    table = scores(counts, grid, cls, gates)

    default_index = _index_of(grid, [current["gate"]], current)
    default_score = float(scores(counts, grid, cls, [current["gate"]])[default_index])
    best_index = tuple(int(i) for i in np.unravel_index(int(np.argmax(table)), table.shape))
    if current["gate"] in gates and default_score >= float(table[best_index]):
        best_index = _index_of(grid, gates, current)  # never move off the checkpoint's values without a gain
    order = np.argsort(-table, axis=None, kind="stable")[:top_k]
    top = [
        {
            **_setting(grid, gates, tuple(int(i) for i in np.unravel_index(j, table.shape))),
            "competition_dice": float(table.flat[j]),
        }
        for j in order
    ]
    chosen = _setting(grid, gates, best_index)
    figures = _figures(counts, grid, cls, gates, best_index)
    new_thresholds = {k: chosen[k] for k in ("top_score", "min_area", "bottom_score", "min_component")}
    review: dict[str, Any] | None = None
    if classifier is not None and cls is not None:
        new_thresholds["gate"] = chosen["gate"]
        outlined = _outlined(counts, grid, cls, gates, best_index)[0] > 0
        r, unmet = review_threshold(y, outlined, cls, specificity=review_specificity, share=review_share)
        new_thresholds["review"] = chosen["review"] = r
        if unmet:
            notes.append(unmet)
        review = {
            "target": {"share": review_share}
            if review_share is not None
            else {"specificity": DEFAULT_REVIEW_SPECIFICITY if review_specificity is None else review_specificity},
            "figures": review_figures(y, outlined, cls, r),
            "table": [
                {"specificity_target": target, **review_figures(y, outlined, cls, at)}
                for target in REVIEW_TABLE
                for at in [review_threshold(y, outlined, cls, specificity=target)[0]]
            ],
        }
    elif classifier is None:
        notes.append("no classifier: the review threshold is not tuned (a scan reviews from the gate up)")
    if figures["n_positive"] and not figures["sensitivity"]:
        if not force:
            raise UsageError(
                f"the best setting outlines none of the {figures['n_positive']} positive images here "
                f"(competition Dice {figures['competition_dice']:.4f} comes from the negatives alone); nothing written",
                path=segmenter.path or segmenter.name,
                hint="train the segmenter further, or pass --force to write it anyway",
            )
        notes.append("written with --force: this setting outlines none of the positive images here")
    if predictions.unreadable:
        notes.append(f"{len(predictions.unreadable)} images could not be read and were left out")
    if index.skipped:
        notes.append(
            f"{len(index.skipped)} files under {data} were skipped (not DICOM, no usable header or duplicates)"
        )

    tuning = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(data),
        "labels": str(labels_csv),
        "images": len(predictions.image_ids),
        "unreadable": len(predictions.unreadable),
        "skipped_files": len(index.skipped),
        "chosen": chosen,
        "defaults": current,
        "default_competition_dice": default_score,
        "figures": figures,
        "sensitivity_target": sensitivity,
        "tta": tta,
        "grid": {k: list(v) for k, v in asdict(grid).items() if k != "gate"} | {"gate": list(gates)},
        "segmenter_sha256": segmenter.sha256,
        "classifier_sha256": classifier.sha256 if classifier is not None else None,
        "out_of_fold": oof,
        "review": review,
    }
    meta = segmenter.meta
    if ensemble:
        from pneumotriage.models.ensemble import write_ensemble

        write_ensemble(
            out,
            segmenter.members,
            {**segmenter.thresholds, **new_thresholds},
            tuning=tuning,
            clinical=bool(meta.get("clinical", True)),
            note=meta.get("note"),
        )
    else:
        _write_tuned(out, segmenter, new_thresholds, tuning)
    return TuneResult(
        thresholds=chosen,
        defaults=current,
        score=figures["competition_dice"],
        default_score=default_score,
        top=top,
        figures=figures,
        out=out,
        cache=cache,
        notes=notes,
        review=review,
    )


def _write_tuned(out: Path, segmenter: LoadedModel, thresholds: dict[str, float], tuning: dict[str, Any]) -> None:
    """A copy of the segmenter's checkpoint with the tuned thresholds and how they were chosen."""
    meta = segmenter.meta
    save_checkpoint(
        out,
        segmenter.model,
        thresholds={**segmenter.thresholds, **thresholds},
        config=meta.get("config"),
        data_fingerprint=meta.get("data_fingerprint"),
        metrics=meta.get("metrics"),
        epoch=meta.get("epoch"),
        extra={
            "tuning": tuning,
            "clinical": bool(meta.get("clinical", True)),
            **{k: meta[k] for k in ("synthetic_share", "note") if k in meta},
            "tuned_from": {
                "name": segmenter.name,
                "path": str(segmenter.path) if segmenter.path else None,
                "sha256": segmenter.sha256,
            },
        },
    )

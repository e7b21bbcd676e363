"""Out-of-fold tuning: each image predicted only by the fold run whose validation fold holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumotriage.errors import UsageError
from pneumotriage.folds import ImageRecord
from pneumotriage.models import LoadedModel
from pneumotriage.tune.records import Counts, Predictions


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


def joined(parts: list[Predictions], counts: list[Counts]) -> tuple[Predictions, Counts]:
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

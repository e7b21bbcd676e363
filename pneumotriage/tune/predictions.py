"""Step 1: the models run once over the labelled images, their outputs cached on disk under a key of the models'
and images' identities.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumotriage.folds import ImageRecord
from pneumotriage.io import file_key
from pneumotriage.models import LoadedModel
from pneumotriage.runtime import Progress, progress_event
from pneumotriage.scan import Execution
from pneumotriage.tune.records import CACHE_VERSION, Predictions


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


def predict_once(
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
            emit(progress_event("cached", path=str(folder)))
            return cached, folder

    torch_device = pick_device(device)
    plan = plan_for(
        Execution(batch_size=batch_size, workers=workers, device=device, backend=backend),
        torch_device,
        max([segmenter.spec.input_size] + ([classifier.spec.input_size] if classifier else [])),
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
            emit(progress_event("predicted", done=done, total=n))
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

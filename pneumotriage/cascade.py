"""The triage cascade: discover DICOMs, classify every image, segment the likely positives, rank a worklist.

Images stream through DataLoader workers that decode and resize them; the classifier runs on every batch; the
segmenter runs only on images whose probability passes the gate (or on all with ``segment_all``). Each finished
image's mask, overlay and thumbnail are written at once and its record appended to a journal in
``OUT/.scan/``, so an interrupted scan (kill -9 included) resumes without redoing finished images and ends with
the outputs of an uninterrupted run. Memory stays flat with the number of images: only one small record per
image is kept.

The library never prints: progress goes to the ``progress`` callback.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch.utils.data import DataLoader, Dataset

from pneumotriage.datasets import prepare_image
from pneumotriage.dicom import DicomHeader, SkippedFile, discover, read_dicom
from pneumotriage.errors import PneumotriageError, UsageError
from pneumotriage.io import atomic_write_bytes, atomic_write_text
from pneumotriage.models import DEFAULT_THRESHOLDS, LoadedModel
from pneumotriage.postprocess import remove_small_components, scaled_area, triplet_keep
from pneumotriage.rle import EMPTY, rle_encode
from pneumotriage.train import autocast_for

Progress = Callable[[dict[str, Any]], None]

TIERS = ("urgent", "review", "routine")
JOURNAL_VERSION = 1
#: Fields left out of every output with ``no_phi``.
PHI_FIELDS = ("patient_id", "accession", "study_datetime")


@dataclass
class ScanOptions:
    """How to scan. Threshold fields left at None come from the checkpoints."""

    gate: float | None = None
    top_score: float | None = None
    min_area: float | None = None
    bottom_score: float | None = None
    min_component: float | None = None
    segment_all: bool = False
    no_segment: bool = False
    tta: bool = False
    urgent_probability: float = 0.9
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    rle_relative: bool = True
    no_phi: bool = False
    resume: bool = False
    overlays: bool = True


@dataclass
class ImageResult:
    """One row of the worklist."""

    image_id: str
    path: str
    status: str  # "ok" | "error"
    error: str | None = None
    rank: int = 0
    tier: str = "review"
    probability: float | None = None
    segmented: bool = False
    area_px: int | None = None
    area_cm2: float | None = None
    side: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    study_datetime: str | None = None
    rows: int | None = None
    columns: int | None = None
    mask_file: str | None = None
    overlay_file: str | None = None
    rle: str = EMPTY
    key: str = ""


@dataclass
class ScanSummary:
    out: Path
    results: list[ImageResult]
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.status != "ok" for r in self.results)


# --------------------------------------------------------------------------------------------------------------
# names


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(image_id: str, taken: set[str]) -> str:
    """A file name from an image id: only letters, digits, '.', '_' and '-'; no leading dot; unique in ``taken``
    (a short hash of the id is added on a collision)."""
    name = _SAFE.sub("_", image_id).strip("._-")[:120] or "image"
    if name in taken:
        name = f"{name}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"
        n = 1
        base = name
        while name in taken:
            name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _key(header: DicomHeader) -> str:
    st = header.path.stat()
    return f"{header.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------------------
# decoding in workers


class _ScanDataset(Dataset[dict[str, Any]]):
    """Decoded images at each model's input size and, unless ``display`` is None, a display copy (uint8, longest
    side ``display``); a file that cannot be read becomes an ``error`` item, never an exception."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int], display: int | None) -> None:
        self.paths = list(paths)
        self.sizes = sorted(set(sizes))
        self.display = display

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = read_dicom(path, reduce_to=max(*self.sizes, self.display or 0))
        except PneumotriageError as exc:
            return {"index": index, "error": str(exc)}
        except (OSError, ValueError, RuntimeError) as exc:  # anything a damaged file can raise past pydicom
            return {"index": index, "error": f"{path}: cannot be read ({type(exc).__name__}: {exc})"}
        item: dict[str, Any] = {"index": index, "original_shape": image.original_shape}
        for size in self.sizes:
            item[f"image{size}"] = prepare_image(image.pixels, size)
        if self.display is not None:
            h, w = image.pixels.shape
            scale = min(1.0, self.display / max(h, w))
            shape = (max(1, round(h * scale)), max(1, round(w * scale)))
            shown = F.interpolate(
                torch.from_numpy(image.pixels)[None, None], size=shape, mode="bilinear", antialias=True
            )[0, 0]
            item["display"] = (shown.clamp(0, 1) * 255).round().to(torch.uint8)
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [i for i in items if "error" not in i]
    batch: dict[str, Any] = {
        "errors": [(i["index"], i["error"]) for i in items if "error" in i],
        "index": [i["index"] for i in ok],
        "original_shape": [i["original_shape"] for i in ok],
        "display": [i.get("display") for i in ok],
    }
    for key in (k for k in (ok[0] if ok else {}) if k.startswith("image")):
        batch[key] = torch.stack([i[key] for i in ok])
    return batch


def decode_loader(
    paths: Sequence[Path],
    sizes: Sequence[int],
    *,
    display: int | None,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> DataLoader[dict[str, Any]]:
    """Batches of decoded images (see :class:`_ScanDataset`), decoded in ``workers`` processes. Each batch holds
    ``index`` (positions in ``paths``), ``errors`` ((position, message) pairs), ``original_shape``, ``display``
    and ``image<size>`` tensors for each size."""
    return DataLoader(
        _ScanDataset(paths, sizes, display),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )


def prepare_models(device: torch.device, *models: LoadedModel | None) -> None:
    """Move models to ``device`` in eval mode (channels_last on CUDA)."""
    for m in models:
        if m is not None:
            m.model.to(device).eval()
            if device.type == "cuda":
                m.model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------------
# models


@torch.no_grad()
def classify(model: LoadedModel, images: torch.Tensor, device: torch.device) -> np.ndarray:
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(device):
        logits = model.model(x)
    return torch.sigmoid(logits.float()).cpu().numpy()


@torch.no_grad()
def segment(model: LoadedModel, images: torch.Tensor, device: torch.device, tta: bool) -> tuple[Any, Any]:
    """Probability maps (B, S, S) on the device and image-level scores (B,)."""
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(device):
        out = model.model(x)
        probs = torch.sigmoid(out["mask"].float())[:, 0]
        if tta:
            flipped = model.model(torch.flip(x, dims=[3]))
            probs = (probs + torch.flip(torch.sigmoid(flipped["mask"].float())[:, 0], dims=[2])) / 2
    present = torch.sigmoid(out["present"].float()) if "present" in out else probs.flatten(1).amax(1)
    return probs.float(), present.float()


# --------------------------------------------------------------------------------------------------------------
# per-image outputs


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # zlib level 1: masks and radiographs compress almost as well as at 6, several times faster.
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


@functools.lru_cache(maxsize=16)
def _empty_mask_png(rows: int, cols: int) -> bytes:
    """Most images are negative: their mask PNG is the same bytes for every image of a size."""
    return _png(np.zeros((rows, cols), dtype=np.uint8))


def _overlay(display: np.ndarray, mask_display: np.ndarray) -> np.ndarray:
    """The radiograph with the mask tinted and outlined in red; a negative stays grey (one channel)."""
    if not mask_display.any():
        return display
    from scipy import ndimage

    rgb = np.repeat(display[:, :, None], 3, axis=2)
    outline = mask_display & ~ndimage.binary_erosion(mask_display, iterations=2)
    fill = mask_display & ~outline
    rgb[fill] = (0.7 * rgb[fill] + 0.3 * np.array([255, 60, 60])).astype(np.uint8)
    rgb[outline] = (255, 40, 40)
    return rgb


def _thumbnail(rgb: np.ndarray, side: int = 192) -> bytes:
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def patient_side(mask: np.ndarray) -> str | None:
    """The patient's side of a frontal radiograph's mask: the image's left half is the patient's right."""
    if not mask.any():
        return None
    half = mask.shape[1] // 2
    on_image_left = int(np.count_nonzero(mask[:, :half]))
    on_image_right = int(np.count_nonzero(mask[:, half:]))
    total = on_image_left + on_image_right
    if min(on_image_left, on_image_right) >= 0.2 * total:
        return "both"
    return "right" if on_image_left > on_image_right else "left"


def tier_of(result: ImageResult, gate: float, options: ScanOptions, segmented_run: bool) -> str:
    """Priority rules (documented in the README):

    - with segmentation: ``urgent`` when the segmenter outlined a pneumothorax; ``review`` when the classifier
      passed the gate but no outline survived the triplet rule; ``routine`` below the gate;
    - classifier alone (``no_segment``): ``urgent`` at probability >= ``urgent_probability``, ``review`` at
      >= the gate, else ``routine``;
    - an image that could not be read: ``review`` (a person must look at it).
    """
    if result.status != "ok" or result.probability is None:
        return "review"
    if segmented_run:
        if result.area_px:
            return "urgent"
        return "review" if result.probability >= gate else "routine"
    if result.probability >= options.urgent_probability:
        return "urgent"
    return "review" if result.probability >= gate else "routine"


def rank(results: list[ImageResult]) -> list[ImageResult]:
    """Most urgent first: tier, then (within a tier) readable images by probability and area, errors last of
    ``review``; ties keep a stable order by image id."""

    def order(r: ImageResult) -> tuple[Any, ...]:
        return (
            TIERS.index(r.tier),
            r.status != "ok",
            -(r.probability if r.probability is not None else -1.0),
            -(r.area_px or 0),
            r.image_id,
        )

    ranked = sorted(results, key=order)
    for i, r in enumerate(ranked, 1):
        r.rank = i
    return ranked


# --------------------------------------------------------------------------------------------------------------
# the journal


class _Journal:
    """Finished images, one JSON line each, appended and synced; read back on resume."""

    def __init__(self, folder: Path, signature: dict[str, Any], resume: bool) -> None:
        self.path = folder / "journal.jsonl"
        self.signature_path = folder / "signature.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, ImageResult] = {}
        if resume and self.path.exists():
            old = json.loads(self.signature_path.read_text()) if self.signature_path.exists() else None
            if old != signature:
                raise UsageError(
                    "cannot resume: this output folder was scanned with other models or settings",
                    path=folder.parent,
                    hint="resume with the same options, or scan into a new --out",
                )
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                result = ImageResult(**data)
                # Per-image files are not fsynced (one fsync each cost more than the models on a GPU): after a
                # power cut a journaled image whose files did not reach the disk is done again.
                files = [folder.parent / f for f in (result.mask_file, result.overlay_file) if f]
                if all(f.is_file() and f.stat().st_size > 0 for f in files):
                    self.done[result.key] = result
        elif not resume and self.path.exists():
            raise UsageError(
                "this output folder already holds a scan",
                path=folder.parent,
                hint="pass --resume to continue it, or choose another --out",
            )
        else:
            self.path.write_text("")
        atomic_write_text(self.signature_path, json.dumps(signature, indent=1, sort_keys=True) + "\n")
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def add(self, result: ImageResult) -> None:
        """Record a finished image. The line reaches the OS at once (a killed process loses nothing);
        :meth:`sync` makes a batch of lines durable against a power cut with one fsync."""
        self._fh.write(json.dumps(asdict(result)) + "\n")
        self._fh.flush()
        self.done[result.key] = result

    def sync(self) -> None:
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self.sync()
        self._fh.close()


# --------------------------------------------------------------------------------------------------------------
# the scan


def scan_thresholds(classifier: LoadedModel | None, segmenter: LoadedModel | None, o: ScanOptions) -> dict[str, float]:
    """The gate and post-processing thresholds a scan uses: the defaults, then the checkpoints', then ``o``'s."""
    t = {**DEFAULT_THRESHOLDS["classifier"], **DEFAULT_THRESHOLDS["segmenter"]}
    if classifier is not None:
        t["gate"] = float(classifier.thresholds.get("gate", t["gate"]))
        # `pneumotriage tune` stores the gate it chose in the segmenter's checkpoint, for the classifier it was
        # tuned with: it holds for that classifier (same sha256) only.
        tuned_with = (segmenter.meta.get("tuning") or {}).get("classifier_sha256") if segmenter is not None else None
        if segmenter is not None and "gate" in segmenter.thresholds and tuned_with == classifier.sha256:
            t["gate"] = float(segmenter.thresholds["gate"])
    if segmenter is not None:
        for k in ("top_score", "min_area", "bottom_score", "min_component"):
            t[k] = float(segmenter.thresholds.get(k, t[k]))
    for k in t:
        value = getattr(o, k)
        if value is not None:
            t[k] = float(value)
    return t


def _model_info(m: LoadedModel | None, role: str) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "role": role,
        "name": m.name or (m.path.name if m.path else None),
        "model": m.spec.title,
        "input_size": m.spec.input_size,
        "sha256": m.sha256,
        "clinical": bool(m.meta.get("clinical", True)),
    }


def scan(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    options: ScanOptions | None = None,
    progress: Progress | None = None,
) -> ScanSummary:
    """Scan DICOM files or folders into ``out``; see the module docstring. Returns the ranked results."""
    from pneumotriage.train import pick_device
    from pneumotriage.worklist import write_outputs

    o = options or ScanOptions()
    emit = progress or (lambda event: None)
    if classifier is None and segmenter is None:
        raise UsageError("a scan needs a classifier, a segmenter, or both")
    if o.no_segment:
        segmenter = None
        if classifier is None:
            raise UsageError("--no-segment triages on the classifier alone: give --classifier")
    out = Path(out)
    state = out / ".scan"
    t = scan_thresholds(classifier, segmenter, o)
    device = pick_device(o.device)
    models = [m for m in (_model_info(classifier, "classifier"), _model_info(segmenter, "segmenter")) if m]
    signature = {
        "version": JOURNAL_VERSION,
        "models": models,
        "thresholds": t,
        "options": {k: v for k, v in asdict(o).items() if k not in ("resume", "workers", "batch_size", "device")},
    }
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise UsageError("no such file or folder", path=p)
    headers: list[DicomHeader] = []
    results: list[ImageResult] = []
    for found in discover(paths):
        if isinstance(found, SkippedFile):
            results.append(
                ImageResult(
                    image_id=found.path.stem,
                    path=str(found.path),
                    status="error",
                    error=f"{found.path}: {found.reason}",
                )
            )
        elif found.problem is not None:
            results.append(
                ImageResult(
                    image_id=found.image_id,
                    path=str(found.path),
                    status="error",
                    error=f"{found.path}: {found.problem}",
                    **_identity(found),
                )
            )
        else:
            headers.append(found)
        emit({"event": "discovered", "count": len(headers) + len(results)})
    timings["discover_s"] = time.perf_counter() - t_start
    if not headers and not results:
        raise UsageError("no DICOM files found", path=paths[0] if paths else None)

    journal = _Journal(state, signature, o.resume)
    taken: set[str] = {r.mask_file.rsplit("/", 1)[-1][:-4] for r in journal.done.values() if r.mask_file}
    todo = [h for h in headers if _key(h) not in journal.done]
    emit({"event": "start", "total": len(headers), "todo": len(todo), "resumed": len(headers) - len(todo)})

    for sub in ("masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (state / "thumbs").mkdir(parents=True, exist_ok=True)
    sizes = [m.spec.input_size for m in (classifier, segmenter) if m is not None]
    display = max(512, *sizes)
    loader = decode_loader(
        [h.path for h in todo], sizes, display=display, batch_size=o.batch_size, workers=o.workers, device=device
    )
    prepare_models(device, classifier, segmenter)

    model_s = 0.0
    counts = {"decoded": 0, "classified": 0, "segmented": 0, "errors": len(results)}
    # Post-processing and PNG/JPEG encoding run in threads (numpy, zlib and Pillow release the GIL), so the
    # models are not kept waiting on file writes; results reach the journal in submission order.
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2))), thread_name_prefix="scan-out")
    pending: deque[Future[ImageResult]] = deque()
    max_pending = 4 * o.batch_size
    try:
        for batch in loader:
            for index, message in batch["errors"]:
                h = todo[index]
                journal.add(
                    ImageResult(
                        image_id=h.image_id,
                        path=str(h.path),
                        status="error",
                        error=message,
                        key=_key(h),
                        **_identity(h),
                    )
                )
                counts["errors"] += 1
            if not batch["index"]:
                continue
            counts["decoded"] += len(batch["index"])
            n = len(batch["index"])
            t0 = time.perf_counter()
            if classifier is not None:
                probs = classify(classifier, batch[f"image{classifier.spec.input_size}"], device)
                counts["classified"] += n
            else:
                probs = None
            if segmenter is not None:
                chosen = [i for i in range(n) if o.segment_all or probs is None or probs[i] >= t["gate"]]
            else:
                chosen = []
            seg_probs: dict[int, torch.Tensor] = {}
            scores: dict[int, float] = {}
            if chosen and segmenter is not None:
                images = batch[f"image{segmenter.spec.input_size}"][chosen]
                maps, present = segment(segmenter, images, device, o.tta)
                for j, i in enumerate(chosen):
                    seg_probs[i] = maps[j]
                    scores[i] = float(present[j])
                counts["segmented"] += len(chosen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_s += time.perf_counter() - t0
            for i in range(n):
                h = todo[batch["index"][i]]
                probability = float(probs[i]) if probs is not None else scores.get(i)
                name = safe_name(h.image_id, taken)
                pending.append(
                    pool.submit(
                        _finish,
                        h,
                        name,
                        probability,
                        seg_probs.get(i),
                        batch["original_shape"][i],
                        batch["display"][i],
                        t,
                        o,
                        out,
                        state,
                    )
                )
            # Bounded: at most a few batches of post-processing in flight, so memory stays flat.
            while len(pending) > max_pending:
                journal.add(pending.popleft().result())
            journal.sync()  # one fsync per batch: per image it cost ~8 ms, most of a GPU scan's time
            emit({"event": "batch", **counts})
        while pending:
            journal.add(pending.popleft().result())
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        journal.close()

    results.extend(journal.done[_key(h)] for h in headers if _key(h) in journal.done)
    counts["errors"] = sum(r.status != "ok" for r in results)  # those found before a resume too
    segmented_run = segmenter is not None
    for r in results:
        r.tier = tier_of(r, t["gate"], o, segmented_run)
    ranked = rank(results)
    timings["model_s"] = model_s
    timings["total_s"] = time.perf_counter() - t_start
    notes = []
    if o.no_segment:
        notes.append("classifier only (--no-segment): no outlines, areas or sides")
    if any(not m["clinical"] for m in models):
        notes.append("synthetic demo weights: not for clinical use")
    summary = ScanSummary(
        out=out,
        results=ranked,
        counts={
            **counts,
            "images": len(ranked),
            "urgent": sum(r.tier == "urgent" for r in ranked),
            "review": sum(r.tier == "review" for r in ranked),
            "routine": sum(r.tier == "routine" for r in ranked),
            "resumed": len(headers) - len(todo),
        },
        timings=timings,
        models=models,
        thresholds=t,
        notes=notes,
    )
    write_outputs(summary, rle_relative=o.rle_relative, no_phi=o.no_phi)
    emit({"event": "done", **summary.counts})
    return summary


def _identity(h: DicomHeader) -> dict[str, Any]:
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "accession": h.accession_number,
        "patient_id": h.patient_id,
        "study_datetime": h.study_datetime.isoformat() if h.study_datetime else None,
        "rows": h.rows,
        "columns": h.columns,
    }


def _finish(
    h: DicomHeader,
    name: str,
    probability: float | None,
    probs: torch.Tensor | None,
    original_shape: tuple[int, int],
    display: torch.Tensor,
    t: dict[str, float],
    o: ScanOptions,
    out: Path,
    state: Path,
) -> ImageResult:
    """Post-process one image (triplet rule, small components, back to the source size) and write its files."""
    rows, cols = original_shape
    mask = np.zeros((rows, cols), dtype=bool)
    segmented = probs is not None
    if probs is not None:
        if bool(triplet_keep(probs[None], top_score=t["top_score"], min_area=t["min_area"])[0]):
            full = F.interpolate(probs[None, None], size=(rows, cols), mode="bilinear", align_corners=False)[0, 0]
            mask = (full > t["bottom_score"]).cpu().numpy()
            mask = remove_small_components(mask, scaled_area(t["min_component"], (rows, cols)))
    area = int(np.count_nonzero(mask))
    spacing = h.pixel_spacing_mm
    result = ImageResult(
        image_id=h.image_id,
        path=str(h.path),
        status="ok",
        probability=None if probability is None else round(probability, 6),
        segmented=segmented,
        area_px=area if segmented else None,
        area_cm2=round(area * spacing[0] * spacing[1] / 100.0, 3) if segmented and spacing else None,
        side=patient_side(mask) if segmented else None,
        key=_key(h),
        rle=rle_encode(mask, relative=True) if area else EMPTY,
        **_identity(h),
    )
    shown = display.numpy()
    mask_png = _png((mask * 255).astype(np.uint8)) if area else _empty_mask_png(rows, cols)
    atomic_write_bytes(out / "masks" / f"{name}.png", mask_png, durable=False)
    result.mask_file = f"masks/{name}.png"
    mask_shown = (
        F.interpolate(torch.from_numpy(mask)[None, None].float(), size=shown.shape, mode="area")[0, 0].numpy() >= 0.5
        if area
        else np.zeros(shown.shape, dtype=bool)
    )
    rgb = _overlay(shown, mask_shown)
    if o.overlays and area:  # an overlay shows an outline; a negative has none (its thumbnail is in the report)
        atomic_write_bytes(out / "overlays" / f"{name}.png", _png(rgb), durable=False)
        result.overlay_file = f"overlays/{name}.png"
    atomic_write_bytes(state / "thumbs" / f"{name}.jpg", _thumbnail(rgb), durable=False)
    return result


def iter_thumbnails(out: Path, results: Sequence[ImageResult]) -> Iterator[tuple[ImageResult, bytes | None]]:
    """Each result with its thumbnail (JPEG bytes) when one was written."""
    for r in results:
        name = r.mask_file.rsplit("/", 1)[-1][:-4] if r.mask_file else None
        path = out / ".scan" / "thumbs" / f"{name}.jpg" if name else None
        yield r, (path.read_bytes() if path is not None and path.exists() else None)

"""Models for CPU servers: ``pneumotriage export`` (a model as a self-describing ONNX graph, checked against torch
on DICOMs) and ``pneumotriage quantize`` (an int8 graph, written only where it keeps its accuracy).

Both feed the graphs exactly the input the scan makes (the scan's own reading and decoding, the model's own
pipeline), so the figures they print are the scan's: parity is the largest difference in probability (a
segmenter: any pixel of its map) between torch and each installed runtime on the same images.

Quantization is static (ONNX Runtime's QDQ form: int8 weights per output channel, uint8 activations whose
ranges come from calibration images): the labelled folder is split, by a hash of each image id and within
positives and negatives apart, into calibration images and held-out images. On the held-out images the float32
graph and the int8 graph (run by each installed runtime) are scored alike: a classifier by the AUC of its
probability, a segmenter by its mean Dice on the positive images (the map binarised at its ``bottom_score``; the
AUC of its largest map probability is shown beside it, not judged: on a few dozen held-out images one pair
ranked the other way moves it by more than the limit). A classifier that loses more than ``max_auc_drop`` AUC,
or a segmenter more than ``max_dice_drop`` Dice, is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumotriage.errors import PneumotriageError, UsageError
from pneumotriage.folds import ImageRecord, index_dataset
from pneumotriage.io import atomic_write_bytes
from pneumotriage.labels import read_rle_csv
from pneumotriage.metrics import dice_per_image, roc_auc
from pneumotriage.models import LoadedModel
from pneumotriage.models.backends import PARITY, graph_for, probabilities
from pneumotriage.models.ensemble import write_ensemble
from pneumotriage.models.exported import (
    RUNTIMES,
    OnnxNet,
    describe,
    export_graph,
    installed,
    output_names,
    runtime_version,
    with_metadata,
)
from pneumotriage.postprocess import resize_full
from pneumotriage.scan import model_inputs, turned

#: The most accuracy a quantized model may lose on the held-out images (unless forced).
MAX_AUC_DROP = 0.005
MAX_DICE_DROP = 0.01


class AccuracyLost(PneumotriageError):
    """The int8 model scores worse than the float32 one by more than the limits allow: not written."""


class ParityError(PneumotriageError):
    """An exported graph does not give torch's answers: not written."""


def installed_runtimes() -> list[str]:
    return [r for r in RUNTIMES if installed(r)]


def _probabilities(net: torch.nn.Module, inputs: np.ndarray, batch: int = 4) -> np.ndarray:
    """:func:`~pneumotriage.models.backends.probabilities` of ``inputs`` (N, S, S) in batches: a classifier's
    ``(N,)``, a segmenter's maps ``(N, S, S)``."""
    parts = [
        probabilities(net, torch.from_numpy(inputs[i : i + batch][:, None])).numpy()
        for i in range(0, len(inputs), batch)
    ]
    return np.concatenate([p[:, 0] if p.ndim == 4 else p for p in parts])


# ----------------------------------------------------------------------------------------------------------------
# export


@dataclass
class Exported:
    """What ``export`` wrote, and the parity measured (largest |Δ probability| per runtime, over ``images``)."""

    files: list[Path]
    parity: dict[str, float]
    images: int
    ensemble: Path | None = None


def _images_for_parity(check: Path | None, scratch: Path) -> list[Path]:
    """DICOMs under ``check``; without it, a few synthetic phantoms written to ``scratch``."""
    from pneumotriage.dicom import DicomHeader, discover
    from pneumotriage.synth import write_study

    if check is None:
        write_study(scratch / "phantoms", 4, size=(512, 512), seed=3, positive_rate=0.5)
        check = scratch / "phantoms"
    if not check.exists():
        raise UsageError("no such file or folder", path=check)
    files = [h.path for h in discover(check) if isinstance(h, DicomHeader) and h.problem is None]
    if not files:
        raise UsageError("no DICOM files to check parity on", path=check, hint="give --check a folder of DICOMs")
    return files


def parity_of(loaded: LoadedModel, graph: bytes, inputs: np.ndarray) -> dict[str, float]:
    """The largest difference in probability between torch and each installed runtime running ``graph``."""
    reference = _probabilities(loaded.model.eval(), inputs)
    names = output_names(loaded.model, loaded.spec.kind)
    gaps = {}
    for runtime in installed_runtimes():
        net = OnnxNet(graph, loaded.spec.kind, names, runtime, threads=torch.get_num_threads())
        gaps[runtime] = float(np.abs(_probabilities(net, inputs) - reference).max()) if len(inputs) else math.nan
    return gaps


def export_model(
    loaded: LoadedModel, out: Path, *, check: Path | None = None, limit: int = 16, force: bool = False
) -> Exported:
    """Write ``loaded`` to ``out`` as an ONNX graph with its description (an ensemble: one graph per member,
    ``OUT-<n>.onnx``, and ``OUT.json``, an ensemble file naming them), after checking each graph against torch
    on up to ``limit`` DICOMs of ``check``. A graph that differs by more than
    :data:`~pneumotriage.models.backends.PARITY` is not written unless ``force``."""
    if not installed_runtimes():
        raise UsageError("checking an export needs ONNX Runtime or OpenVINO", hint="pip install 'pneumotriage[onnx]'")
    members = loaded.members or [loaded]
    targets = [out] if not loaded.members else [out.with_name(f"{out.stem}-{i}.onnx") for i in range(len(members))]
    with tempfile.TemporaryDirectory(prefix="pneumotriage-export-") as scratch:
        files = _images_for_parity(check, Path(scratch))[:limit]
        worst: dict[str, float] = {}
        graphs = []
        count = 0
        for member in members:
            names = output_names(member.model, member.spec.kind)
            graph = export_graph(member)
            rows = [x for _, x, _ in model_inputs(files, member.spec.input_key)]
            count = len(rows)
            inputs = np.stack(rows) if rows else np.zeros((0, 1, 1), np.float32)
            gaps = parity_of(member, graph, inputs)
            for runtime, gap in gaps.items():
                worst[runtime] = max(worst.get(runtime, 0.0), gap)
            parity = {"images": count, "max_abs_probability_difference": gaps, "limit": PARITY}
            graphs.append(with_metadata(graph, describe(member, names, parity=parity)))
    if count == 0:
        raise UsageError("none of the files checked could be read as the scan reads them", path=check)
    bad = {r: g for r, g in worst.items() if not g <= PARITY}
    if bad and not force:
        raise ParityError(
            "the exported graph does not give torch's answers: "
            + ", ".join(f"{runtime_version(r)} differs by {g:.2e}" for r, g in bad.items())
            + f" (limit {PARITY:g})",
            hint="report it; --force writes it anyway",
        )
    for target, graph in zip(targets, graphs, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, graph)
    ensemble = None
    if loaded.members:
        from pneumotriage.models.exported import load_onnx

        ensemble = write_ensemble(out.with_suffix(".json"), [load_onnx(t) for t in targets], loaded.thresholds)
    return Exported(targets, worst, count, ensemble)


# ----------------------------------------------------------------------------------------------------------------
# quantize


@dataclass
class Scores:
    """A graph's figures on the held-out images."""

    auc: float
    dice: float | None  # segmenters: mean Dice on the positives

    def as_dict(self) -> dict[str, float | None]:
        return {"auc": _round(self.auc), "dice_positives": _round(self.dice)}


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


@dataclass
class Quantized:
    out: Path | None
    calibration: int
    held_out: int
    positives: int
    before: Scores
    after: dict[str, Scores]
    refused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the figures before and after, as the scan shows them."""
        parts = []
        for runtime, s in self.after.items():
            text = f"AUC {_shown(self.before.auc)} → {_shown(s.auc)}"
            if s.dice is not None:
                text += f", Dice on positives {_shown(self.before.dice)} → {_shown(s.dice)}"
            parts.append(f"{text} ({runtime_version(runtime)})")
        return "; ".join(parts) + f" on {self.held_out} held-out images ({self.positives} positive)"


def _shown(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def split(records: Sequence[ImageRecord], held_out: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(calibration, held-out): within positives and negatives apart, ordered by a hash of the image id, the
    first ``held_out`` share held out (at least one of each where there are two or more)."""
    calibrate: list[ImageRecord] = []
    held: list[ImageRecord] = []
    for positive in (True, False):
        group = sorted(
            (r for r in records if r.positive == positive),
            key=lambda r: hashlib.sha256(r.image_id.encode()).hexdigest(),
        )
        n = round(len(group) * held_out)
        if len(group) >= 2:
            n = min(max(n, 1), len(group) - 1)
        held += group[:n]
        calibrate += group[n:]
    return calibrate, held


def _scores(
    loaded: LoadedModel,
    probs: np.ndarray,
    records: Sequence[ImageRecord],
    flips: Sequence[tuple[bool, bool]],
    labels: Any,
) -> Scores:
    truth = np.array([r.positive for r in records])
    if loaded.spec.kind == "classifier":
        return Scores(_auc(truth, probs), None)
    image_scores = probs.reshape(len(probs), -1).max(axis=1)
    bottom = float(loaded.thresholds.get("bottom_score", 0.5))
    dices = []
    for record, prob, flip in zip(records, probs, flips, strict=True):
        if not record.positive:
            continue
        upright = turned(prob, flip) if any(flip) else prob
        pred = resize_full(upright, (record.height, record.width)) > bottom
        true = labels.masks_for(record.image_id, record.height, record.width)
        dices.append(float(dice_per_image(pred[None], true[None])[0]))
    return Scores(_auc(truth, image_scores), float(np.mean(dices)) if dices else math.nan)


def _auc(truth: np.ndarray, scores: np.ndarray) -> float:
    return roc_auc(truth, scores) if 0 < truth.sum() < len(truth) else math.nan


class _Calibration:
    """ONNX Runtime's calibration reader over the calibration inputs, one image at a time."""

    def __init__(self, inputs: np.ndarray) -> None:
        self.inputs, self.i = inputs, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.inputs):
            return None
        self.i += 1
        return {"image": self.inputs[self.i - 1][None, None]}

    def rewind(self) -> None:
        self.i = 0


def quantize_model(
    loaded: LoadedModel,
    data: Path,
    labels_csv: Path,
    out: Path,
    *,
    held_out: float = 0.5,
    max_auc_drop: float = MAX_AUC_DROP,
    max_dice_drop: float = MAX_DICE_DROP,
    force: bool = False,
    relative: bool = True,
    home: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Quantized:
    """Quantize ``loaded`` to int8 with calibration images from the labelled folder ``data`` and score it on
    held-out ones (module docstring); write it to ``out`` where it keeps its accuracy (or ``force``). Raises
    :class:`AccuracyLost` (nothing written) otherwise."""
    if loaded.members:
        raise UsageError("quantize takes one model: quantize each member of an ensemble, then list them in one")
    if not installed("onnxruntime"):
        raise UsageError("quantize needs ONNX Runtime", hint="pip install 'pneumotriage[onnx]'")
    if not 0 < held_out < 1:
        raise UsageError(f"--held-out {held_out:g}: give a share between 0 and 1")
    say = progress or (lambda text: None)
    index = index_dataset(data, labels_csv, relative=relative)
    if len(index.records) < 2:
        raise UsageError("quantize needs at least 2 labelled images (calibration and held-out)", path=data)
    calibrate, held = split(index.records, held_out)
    key = loaded.spec.input_key
    say(f"reading {len(calibrate)} calibration and {len(held)} held-out images")
    cal_inputs = np.stack([x for _, x, _ in model_inputs([r.path for r in calibrate], key)] or [np.zeros((0,))])
    found = list(model_inputs([r.path for r in held], key))
    if cal_inputs.ndim != 3 or not found:
        raise UsageError("too few of the labelled images could be read as the scan reads them", path=data)
    held = [held[i] for i, _, _ in found]
    held_inputs = np.stack([x for _, x, _ in found])
    flips = [f for _, _, f in found]
    labels = read_rle_csv(labels_csv, relative=relative)
    graph = graph_for(loaded, home)
    names = loaded.model.names if isinstance(loaded.model, OnnxNet) else output_names(loaded.model, loaded.spec.kind)
    say("quantizing")
    int8 = quantize_graph(graph, cal_inputs)
    threads = torch.get_num_threads()
    reference = OnnxNet(graph, loaded.spec.kind, names, "onnxruntime", threads)
    before = _scores(loaded, _probabilities(reference, held_inputs), held, flips, labels)
    after = {}
    for runtime in installed_runtimes():
        say(f"scoring with {runtime_version(runtime)}")
        net = OnnxNet(int8, loaded.spec.kind, names, runtime, threads)
        after[runtime] = _scores(loaded, _probabilities(net, held_inputs), held, flips, labels)
    result = Quantized(None, len(cal_inputs), len(held), sum(r.positive for r in held), before, after)
    for runtime, s in after.items():
        result.refused += _losses(before, s, runtime, max_auc_drop, max_dice_drop)
    if result.refused and not force:
        raise AccuracyLost(
            f"int8 loses accuracy on {len(held)} held-out images: {'; '.join(result.refused)}",
            hint="calibrate on more (and more typical) images, or keep the float32 model; --force writes it anyway",
        )
    figures = {
        "calibration_images": len(cal_inputs),
        "held_out_images": len(held),
        "held_out_positives": result.positives,
        "before": before.as_dict(),
        "after": {runtime_version(r): s.as_dict() for r, s in after.items()},
        "limits": {"auc_drop": max_auc_drop, "dice_drop": max_dice_drop},
        "forced": bool(result.refused),
        "summary": result.summary(),
    }
    meta_source = describe(loaded, names, quantization=figures)
    atomic_write_bytes(out, with_metadata(int8, meta_source))
    result.out = out
    return result


def _losses(before: Scores, after: Scores, runtime: str, auc_drop: float, dice_drop: float) -> list[str]:
    """Why ``after`` is refused against ``before`` (empty where it is not). A figure that cannot be computed on
    the held-out images (no positives or no negatives) counts as lost: the accuracy was not shown kept."""
    lost = []
    if before.dice is None:  # a classifier: judged on its AUC
        if not math.isfinite(before.auc):
            lost.append("no AUC on the held-out images (they need positives and negatives)")
        elif not before.auc - after.auc <= auc_drop:
            lost.append(f"AUC {before.auc:.4f} → {after.auc:.4f} ({runtime})")
    elif after.dice is not None:  # a segmenter: on its outlines (its image-level AUC is shown, not judged)
        if not math.isfinite(before.dice):
            lost.append("no Dice on the held-out images (they hold no positive)")
        elif not before.dice - after.dice <= dice_drop:
            lost.append(f"Dice on positives {before.dice:.4f} → {after.dice:.4f} ({runtime})")
    return lost


def quantize_graph(graph: bytes, calibration: np.ndarray) -> bytes:
    """``graph`` statically quantized (QDQ: int8 weights per channel, uint8 activations) with ranges from
    ``calibration`` (N, S, S)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pneumotriage-quantize-") as scratch:
        source, pre, target = (Path(scratch) / name for name in ("model.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(graph)
        # Graph clean-up before quantizing (constant folding, shapes); the symbolic shape pass cannot follow
        # every decoder and is not needed for convolutional networks.
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        quiet = logging.root.manager.disable
        logging.disable(logging.WARNING)  # a root-logger line for every batch norm that stays unfused (DenseNet's)
        try:
            quantize_static(
                str(pre),
                str(target),
                _Calibration(calibration.astype(np.float32)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            logging.disable(quiet)
        return target.read_bytes()

"""How to scan: the user's options, the thresholds in force, and what ``auto`` resolves to on this machine."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from pneumotriage.errors import UsageError
from pneumotriage.models import DEFAULT_THRESHOLDS, LoadedModel
from pneumotriage.postprocess import Thresholds
from pneumotriage.runtime import PRECISIONS, usable_cores


def _how(default: Any) -> Any:
    """A field that says how the scan runs, not what it writes: it may change between a scan and its resume
    (outputs move in the last float digits at most), so it is left out of :meth:`ScanOptions.signature`."""
    return field(default=default, metadata={"how": True})


@dataclass(frozen=True)
class Decisions:
    """What each image is judged by: thresholds (None: the checkpoints'), which images go to which model, the
    models' precision and the input check's rules. Checked when made."""

    gate: float | None = None
    top_score: float | None = None
    min_area: float | None = None
    bottom_score: float | None = None
    min_component: float | None = None
    review: float | None = None
    segment_all: bool = False
    no_segment: bool = False
    tta: bool = False
    urgent_probability: float = 0.9
    #: Model precision: "auto" (bf16 autocast on CUDA, float32 on a CPU), "bf16" or "fp32".
    precision: str = "auto"
    #: Input-check rules widened (:data:`pneumotriage.inputcheck.RULES`): images they would refuse are triaged.
    accept: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse a value that cannot be meant (out of range, not finite, not a number) with one line, before a
        scan writes anything: a gate of 2 or NaN would silently make every image routine."""
        for name in Thresholds.ALL:
            _THRESHOLD_CHECKS[name]("--" + name.replace("_", "-"), getattr(self, name))
        _check_probability("--urgent-probability", self.urgent_probability)
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose {', '.join(PRECISIONS)}")
        from pneumotriage.inputcheck import check_accept

        object.__setattr__(self, "accept", check_accept(self.accept))


@dataclass(frozen=True)
class Outputs:
    """What a scan writes besides the worklist."""

    rle_relative: bool = True
    no_phi: bool = False
    overlays: bool = True
    #: DICOM outputs for a PACS (:mod:`pneumotriage.scan.pacs`): a Segmentation per outlined image, a
    #: Comprehensive SR per image, in ``OUT/dicom/``.
    dicom_seg: bool = False
    dicom_sr: bool = False
    #: Rows of the report (beyond the outlined ones) that get a thumbnail, made after ranking.
    report_thumbnails: int = 100
    #: Write submission.csv: None (auto) writes it unless the scan has no segmenter, where every row would be
    #: "-1". Written at the end from the journaled rows, which it does not change.
    submission: bool | None = _how(None)

    def __post_init__(self) -> None:
        if self.report_thumbnails < 0:
            raise UsageError(f"report_thumbnails {self.report_thumbnails}: give 0 or more")


@dataclass(frozen=True)
class Execution:
    """How the scan runs: none of it changes what it writes beyond the last float digits, so a resume may change
    it. ``batch_size`` and ``workers`` left at None are chosen for the device (see :func:`plan_for`)."""

    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    resume: bool = False
    #: Where JPEG Baseline pixel data is decoded: "auto" (on the model's GPU when there is one and fewer than
    #: :data:`JPEG_WORKERS_OVER_DEVICE` workers, else in the worker processes), "workers" or "device". On the
    #: device only an image the codec would not shrink for a model's input (see :func:`scan.read.read`).
    jpeg_decode: str = "auto"
    #: What runs the models on a CPU (:data:`pneumotriage.models.backends.BACKENDS`): "auto" (the fastest
    #: installed, measured once per model and machine), "torch", "onnxruntime" or "openvino".
    backend: str = "auto"
    #: Compile the models (``torch.compile``) for one batch shape; worth it on a GPU for large folders (the
    #: first batch waits for compilation; docs/performance.md has the figures).
    compile: bool = False
    #: Where segmented images are finished (post-processed, encoded, written): None (auto: on a GPU in the
    #: workers; on a CPU in this process too whenever the models would wait for decoding), or True: always in
    #: the workers, as on a GPU (``benchmarks/scan.py --feeder`` measures the feeding process so).
    finish_in_workers: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH:
            raise UsageError(f"--batch-size {self.batch_size}: give 1 to {MAX_BATCH}, or auto")
        most = max_workers()
        if self.workers is not None and not 0 <= self.workers <= most:
            raise UsageError(f"--workers {self.workers}: give 0 to {most} (4 per core here), or auto")
        if self.jpeg_decode not in ("auto", "workers", "device"):
            raise UsageError(f"jpeg_decode {self.jpeg_decode!r}: choose auto, workers or device")
        from pneumotriage.models.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.compile and self.backend not in ("auto", "torch"):
            raise UsageError(f"--compile compiles torch's models: it does not go with --backend {self.backend}")


#: Each part's fields, by name: :meth:`ScanOptions.of` routes a flat option to its part.
_PARTS = {"decide": Decisions, "write": Outputs, "run": Execution}


@dataclass(frozen=True)
class ScanOptions:
    """How to scan, in three parts by what each is for: ``decide`` (what each image is judged by), ``write``
    (what is written besides the worklist) and ``run`` (how the scan runs). Each part checks its values when
    made, so a ScanOptions that exists is valid. :meth:`of` builds one from flat options, as the CLI has them."""

    decide: Decisions = field(default_factory=Decisions)
    write: Outputs = field(default_factory=Outputs)
    run: Execution = field(default_factory=Execution)

    @classmethod
    def of(cls, **flat: Any) -> ScanOptions:
        """ScanOptions from flat options (``gate=0.5, workers=0``), each given to the part it belongs to."""
        return cls().but(**flat)

    def but(self, **flat: Any) -> ScanOptions:
        """These options with the flat ones given changed (checked as they are made)."""
        by_part: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
        for name, value in flat.items():
            by_part[_part_of(name)][name] = value
        return ScanOptions(
            **{part: replace(getattr(self, part), **changes) if changes else getattr(self, part)
               for part, changes in by_part.items()}
        )  # fmt: skip

    def writes_submission(self) -> bool:
        return self.write.submission if self.write.submission is not None else not self.decide.no_segment

    def signature(self) -> dict[str, Any]:
        """The options that change what a scan writes (a resume must use the same), flat: the decisions and the
        outputs, but for those that say how the scan runs."""
        flat: dict[str, Any] = {}
        for part in (self.decide, self.write):
            for f in fields(part):
                if not f.metadata.get("how"):
                    value = getattr(part, f.name)
                    flat[f.name] = list(value) if isinstance(value, tuple) else value
        return flat


def _part_of(name: str) -> str:
    for part, kind in _PARTS.items():
        if name in _FIELDS[kind]:
            return part
    raise TypeError(f"ScanOptions has no option {name!r}")


_FIELDS = {kind: {f.name for f in fields(kind)} for kind in _PARTS.values()}


#: The largest batch a scan takes: 64 fills an H100; 4,096 images of 512 px are 4 GB of input alone.
MAX_BATCH = 4096


def max_workers() -> int:
    """The most worker processes a scan starts: 4 per usable core (at least 8), enough to hide slow storage; more
    only cost memory (each holds a copy of the decoders)."""
    return max(8, 4 * usable_cores())


def _check_probability(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise UsageError(f"{name} {value!r}: give a probability from 0 to 1")


def _check_count(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} {value!r}: give a pixel count of 0 or more")


#: Each threshold's check: a probability, or a pixel count.
_THRESHOLD_CHECKS = {
    "gate": _check_probability,
    "top_score": _check_probability,
    "bottom_score": _check_probability,
    "min_area": _check_count,
    "min_component": _check_count,
    "review": _check_probability,
}


def _from_checkpoint(model: LoadedModel, name: str, default: float) -> float:
    """A threshold a checkpoint stores, checked: a damaged or hand-edited one (NaN, a string) is refused with the
    file named, not turned into a scan that calls everything routine."""
    from pneumotriage.weights import WeightError

    value = model.thresholds.get(name, default)
    try:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UsageError(f"{name} {value!r} is not a number")
        _THRESHOLD_CHECKS[name](name, value)
    except UsageError as exc:
        raise WeightError(
            f"its {exc.message}",
            path=model.path or model.name,
            hint="pass the threshold explicitly, or re-run `pneumotriage tune` to write a checkpoint with a valid one",
        ) from None
    return float(value)


def scan_thresholds(classifier: LoadedModel | None, segmenter: LoadedModel | None, o: Decisions) -> Thresholds:
    """The thresholds a scan uses: the defaults, then the checkpoints', then ``o``'s. Every value is checked
    (``o``'s when it was made; a checkpoint's by :func:`_from_checkpoint`).

    The gate and the review threshold are decisions on the classifier's probability: each comes from the
    classifier's checkpoint, or from the segmenter's where `pneumotriage tune` chose it with this classifier (same
    sha256). A review threshold set nowhere is the gate in effect (checkpoints from before it existed)."""
    t: dict[str, float] = {**DEFAULT_THRESHOLDS["classifier"], **DEFAULT_THRESHOLDS["segmenter"]}
    tuned_with = (segmenter.meta.get("tuning") or {}).get("classifier_sha256") if segmenter is not None else None
    for k in ("gate", "review"):
        if getattr(o, k) is not None:
            continue
        if classifier is not None and k in classifier.thresholds:
            t[k] = _from_checkpoint(classifier, k, t.get(k, 0.5))
        # `pneumotriage tune` stores the gate (and the review threshold) it chose in the segmenter's checkpoint,
        # for the classifier it was tuned with: they hold for that classifier only; without a classifier the
        # review threshold applies to the segmenter's own image score, as tuned without one.
        if segmenter is not None and k in segmenter.thresholds:
            same = classifier is not None and tuned_with == classifier.sha256
            if same or (classifier is None and k == "review" and tuned_with is None):
                t[k] = _from_checkpoint(segmenter, k, t.get(k, 0.5))
    if segmenter is not None:
        for k in ("top_score", "min_area", "bottom_score", "min_component"):
            if getattr(o, k) is None:
                t[k] = _from_checkpoint(segmenter, k, t[k])
    for k in Thresholds.ALL:
        value = getattr(o, k)
        if value is not None:
            t[k] = float(value)
    return Thresholds.from_mapping(t)


@dataclass(frozen=True)
class Plan:
    """What a scan runs with: resolved from the options and the device, shown in ``--verbose`` and the report."""

    device: str
    batch_size: int
    workers: int
    torch_threads: int
    jpeg_on_device: bool
    why: str
    #: What runs each model ("classifier", "segmenter"): :meth:`pneumotriage.models.backends.BackendChoice.as_dict`.
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: From this many worker processes on, JPEG Baseline is decoded in the workers rather than on the GPU (``auto``).
JPEG_WORKERS_OVER_DEVICE = 8


def cpu_batch(input_size: int) -> int:
    """The batch a CPU runs fastest, by the largest model input: larger inputs fill the cores alone, smaller ones
    gain from batching (measured per model and size: docs/performance.md, "Figures behind the defaults")."""
    return 1 if input_size >= 384 else 4 if input_size >= 192 else 8


def plan_for(o: Execution, device: torch.device, input_size: int = 512, cores: int | None = None) -> Plan:
    """Resolve ``auto`` batch size and workers for ``device`` and models whose largest input is ``input_size``.

    On a CPU the models take ~95 % of a scan and are fastest with small batches (:func:`cpu_batch`: 1 image at
    512 px) and one torch thread per core. Decoding (a few ms per image against
    hundreds in the models) needs one worker process, run at a lower priority so that it fills the models'
    idle moments instead of taking cores from them; with two or more cores to spare a second worker runs the
    finishing stage beside it. (Whenever the models would wait for decoding, the main process finishes images
    itself: see the engine.) On a GPU: large batches, one worker per core but the one that feeds the GPU, and
    JPEG Baseline decoded in those workers when there are enough of them, else on the GPU.
    """
    cores = cores or usable_cores()
    gpu = device.type == "cuda"
    if gpu:
        batch = o.batch_size or 64
        workers = o.workers if o.workers is not None else max(1, cores - 1)
        why = "GPU: large batches, one decoding worker per core but the one that feeds the GPU"
    else:
        batch = o.batch_size or cpu_batch(input_size)
        workers = o.workers if o.workers is not None else (1 if cores <= 2 else min(cores // 2, 4))
        why = (
            f"CPU with {cores} cores, models at {input_size} px: batch {batch}, {cores} torch threads, "
            f"{workers} low-priority worker process{'es' if workers != 1 else ''} for decoding and finishing"
        )
    on_device = o.jpeg_decode == "device"
    if o.jpeg_decode == "auto":
        # Enough workers decode JPEG Baseline faster than nvJPEG's batches, which the feeding process waits on;
        # with fewer cores to spare, nvJPEG takes the decoding off them (docs/performance.md, GPU).
        on_device = gpu and workers < JPEG_WORKERS_OVER_DEVICE
    if gpu:
        why += "; JPEG Baseline decoded " + (
            "on the GPU (nvJPEG) where a model's input is over half the image's side, else as training does, in the "
            "workers"
            if on_device
            else "in the workers"
        )
    return Plan(
        device=str(device),
        batch_size=batch,
        workers=workers,
        torch_threads=cores if not gpu else max(1, torch.get_num_threads()),
        jpeg_on_device=on_device,
        why=why,
    )

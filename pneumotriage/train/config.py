"""What a training run is asked (:class:`TrainConfig`, saved in its folder) and what it gives back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pneumotriage.datasets import AUGMENT_LEVELS
from pneumotriage.errors import UsageError
from pneumotriage.losses import parse_loss
from pneumotriage.models import ModelSpec
from pneumotriage.models.foreign import RUNTIMES
from pneumotriage.models.spec import IMPORTED_CLASSIFIERS, IMPORTED_SEGMENTERS
from pneumotriage.runtime import PRECISIONS

DEFAULT_LOSS = {"classifier": "bce:1", "segmenter": "bce:3,dice:1,focal:4"}
#: The validation figure that picks the best epoch (higher is better).
SELECTION_METRIC = {"classifier": "auc", "segmenter": "competition_dice"}
#: How epochs that tie on it are told apart, in order: for a segmenter, Dice on the positive images with the
#: triplet rule, then without it (a model that outlines nothing ties on the competition Dice with every other
#: such epoch, all of them scored on the negatives alone); then the lower validation loss.
SELECTION_RULE = {
    "classifier": ("auc", "-loss"),
    "segmenter": ("competition_dice", "dice_positives_triplet", "dice_positives", "-loss"),
}


@dataclass
class TrainConfig:
    """One training run. ``pneumotriage train classifier|segmenter`` sets these fields from its options of the
    same names; ``config.json`` in the run folder holds them, so that ``--resume`` and ``tune --oof`` rebuild it."""

    #: "classifier" (stage 1, one logit per image) or "segmenter" (stage 2, a mask logit per pixel).
    kind: str
    #: The folder of training DICOMs (searched recursively) and its SIIM-form RLE label CSV.
    data: str
    labels: str
    #: The run folder: best.pt, last.pt, metrics.jsonl, config.json, oof.csv, curves.png.
    out: str
    #: Architecture (:data:`~pneumotriage.models.CLASSIFIERS` or :data:`~pneumotriage.models.SEGMENTERS`);
    #: empty: densenet121 for a classifier, unet for a segmenter.
    arch: str = ""
    #: A segmenter's encoder (:data:`~pneumotriage.models.ENCODERS`); None: resnet34.
    encoder: str | None = None
    #: A segmenter's extra image-level head ("is there any pneumothorax"), trained beside the mask.
    empty_head: bool = False
    epochs: int = 10
    #: The side, in pixels, images are resized to (square).
    image_size: int = 256
    #: Images per step, across all processes under torchrun.
    batch_size: int = 8
    #: Peak learning rate of AdamW with cosine decay, and its weight decay.
    lr: float = 3e-4
    weight_decay: float = 1e-4
    #: Seeds the fold split, sampling, augmentation and initialisation.
    seed: int = 0
    #: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.
    device: str = "auto"
    #: DataLoader worker processes that decode DICOMs.
    workers: int = 2
    #: Validation: fold ``fold`` of ``folds`` (patient-grouped, stratified); or, with ``val_fraction``, that share
    #: held out instead.
    fold: int = 0
    folds: int = 5
    val_fraction: float | None = None
    #: The loss, e.g. "bce+dice+focal" (:func:`~pneumotriage.losses.parse_loss`); empty: the kind's default.
    loss: str = ""
    #: A segmenter's share of positive images per epoch, from the first to the last (linear), as the SIIM-ACR
    #: winners' 0.8 -> 0.4; None: the data's own share.
    positive_share: tuple[float, float] | None = None
    #: Start the backbone from its cached ImageNet weights (fetched when missing); False: random weights.
    pretrained: bool = True
    #: Augmentation level: "none", "light" or "strong".
    augment: str = "strong"
    #: A folder for resized arrays, so that later epochs skip decoding.
    cache: str | None = None
    #: Stop after this many epochs without a better validation score; None: run every epoch.
    patience: int | None = None
    #: The label CSV's run-length form: SIIM's relative one, or absolute.
    relative_rle: bool = True
    #: auto (bf16 + channels_last on CUDA), bf16 (also on a CPU with native bf16) or fp32.
    precision: str = "auto"
    #: Classifier: choose the gate as the highest threshold that keeps this share of the validation positives
    #: (a triage cascade's operating point: the segmenter's triplet rule removes what it lets through); None:
    #: Youden's J (sensitivity + specificity - 1 at its largest).
    gate_sensitivity: float | None = None
    #: Stochastic weight averaging: the weights of the last ``swa_epochs`` epochs averaged
    #: (``torch.optim.swa_utils.AveragedModel``), batch-norm statistics recomputed over the training images, and
    #: written as ``swa.pt`` beside ``best.pt`` with its own validation figures. 0: none.
    swa_epochs: int = 0
    #: Draw ``curves.png`` beside ``metrics.jsonl``: after the first epoch, then again once :data:`CURVES_EVERY_S`
    #: have passed since the last drawing, and after the last epoch (a drawing takes ~0.2-0.75 s: after every
    #: epoch of a short run it took a fifth of the time). The demo build, whose run folders are thrown away,
    #: turns it off.
    curves: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_LOSS:
            raise UsageError(f"unknown model kind {self.kind!r}; valid: classifier, segmenter")
        if not self.arch:
            self.arch = "densenet121" if self.kind == "classifier" else "unet"
        if self.kind == "segmenter" and not self.encoder:
            self.encoder = "resnet34"
        if self.kind == "classifier":
            self.encoder = None
        imported = {**IMPORTED_CLASSIFIERS, **IMPORTED_SEGMENTERS, **RUNTIMES}
        if self.arch in imported:
            raise UsageError(
                f"{self.arch} ({imported[self.arch]}) is only ever imported with `pneumotriage convert`, "
                "not trained here"
            )
        if not self.loss:
            self.loss = DEFAULT_LOSS[self.kind]
        if self.positive_share is not None:
            self.positive_share = (float(self.positive_share[0]), float(self.positive_share[1]))
            if not all(0.0 <= s <= 1.0 for s in self.positive_share):
                raise UsageError("positive shares must lie in [0, 1]")
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise UsageError("epochs and batch size must be >= 1 and the image size >= 32")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise UsageError(f"--swa-epochs {self.swa_epochs}: give 0 (none) up to --epochs ({self.epochs})")
        if self.val_fraction is None and not 0 <= self.fold < self.folds:
            raise UsageError(f"--fold must be in 0..{self.folds - 1}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise UsageError("--val-fraction must lie strictly between 0 and 1")
        parse_loss(self.loss)
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.augment not in AUGMENT_LEVELS:
            raise UsageError(f"unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENT_LEVELS)}")

    def spec(self) -> ModelSpec:
        return ModelSpec(
            kind=self.kind,
            arch=self.arch,
            encoder=self.encoder,
            input_size=self.image_size,
            empty_head=self.empty_head and self.kind == "segmenter",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positive_share"] = list(self.positive_share) if self.positive_share else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        if d.get("positive_share") is not None:
            d["positive_share"] = tuple(d["positive_share"])
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int | None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    #: What the user must know of the result (a best checkpoint that outlines nothing).
    warnings: list[str] = field(default_factory=list)
    #: The averaged model's validation figures (with ``swa_epochs``), written as swa.pt.
    swa_metrics: dict[str, Any] = field(default_factory=dict)

"""Training of both stages: one loop for the classifier and the segmenter, from one CPU to many GPUs.

- Data: the dataset index (DICOMs matched with the label CSV), a patient-grouped stratified fold (or held-out
  share) for validation, :class:`~pneumotriage.datasets.RadiographDataset` decoded in DataLoader workers.
- Device: auto picks cuda > mps > cpu; on CUDA, bf16 autocast and channels_last. ``precision="bf16"`` also
  uses them on a CPU with native bf16 (AVX512-BF16 / AMX), faster there (docs/performance.md); ``"fp32"`` turns
  them off.
- Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
  GPU, gloo on CPU), each rank takes its slice of every epoch, and rank 0 alone validates, logs and writes.
- Every epoch: validation, ``metrics.jsonl`` (one JSON line per epoch), ``last.pt`` (with optimiser state, for
  ``--resume``), and ``best.pt`` when the validation metric improved. Writes are atomic, so a run killed at any
  moment resumes from its last finished epoch.

The library never prints: progress goes to the ``progress`` callback as small event dicts.

The modules: :mod:`~pneumotriage.train.config` (what a run is asked), :mod:`~pneumotriage.train.dist` (torchrun),
:mod:`~pneumotriage.train.data` (split and loaders), :mod:`~pneumotriage.train.steps` (a step, validation and
the best epoch), :mod:`~pneumotriage.train.run` (the run: epochs, checkpoints, resuming).
"""

from pneumotriage.train.config import DEFAULT_LOSS, TrainConfig, TrainResult
from pneumotriage.train.data import data_fingerprint, split_records
from pneumotriage.train.run import train
from pneumotriage.train.steps import (
    Objective,
    best_warnings,
    better,
    predict,
    selection_key,
    train_step,
    validation_metrics,
)

__all__ = [
    "DEFAULT_LOSS",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "best_warnings",
    "better",
    "data_fingerprint",
    "predict",
    "selection_key",
    "split_records",
    "train",
    "train_step",
    "validation_metrics",
]

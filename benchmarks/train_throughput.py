"""Training throughput: the real data pipeline against the pure model rate, per default model and size.

For each model (the default classifier, DenseNet121, and the default segmenter, UNet / ResNet34) and input size
it times, in the same run and on the same device:

- ``model``: forward + backward + optimiser step on random tensors already on the device (the ceiling);
- ``decode``: the same steps fed by the training DataLoader, whose workers decode the DICOMs, resize and augment;
- ``cache``: the same, with the resized arrays read from the preprocessed cache (epochs after the first).

and prints images/s and the ratio pipeline / model. A ratio near 1 means the model is the bottleneck; the target
is >= 0.80. The study is synthetic: 1024 x 1024 JPEG Baseline DICOMs, as in SIIM-ACR.

    python benchmarks/train_throughput.py                  # CPU, small settings
    python benchmarks/train_throughput.py --device cuda --workers 16 --batch-size 64 --steps 30 --n 512
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pneumotriage.datasets import EpochSampler, RadiographDataset, make_augment
from pneumotriage.folds import index_dataset
from pneumotriage.labels import read_rle_csv
from pneumotriage.losses import parse_loss
from pneumotriage.models import ModelSpec, build_model
from pneumotriage.runtime import pick_device
from pneumotriage.synth import write_study
from pneumotriage.train import DEFAULT_LOSS, Objective, train_step

MODELS = {
    "classifier densenet121": ModelSpec("classifier", "densenet121"),
    "segmenter unet/resnet34": ModelSpec("segmenter", "unet", "resnet34"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(spec: ModelSpec, size: int, device: torch.device) -> tuple[Any, Any, Any]:
    model = build_model(ModelSpec(**{**spec.__dict__, "input_size": size})).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = Objective(spec.kind, parse_loss(DEFAULT_LOSS[spec.kind]), pos_weight=1.0)
    return model, optimizer, objective


def pure_rate(spec: ModelSpec, size: int, batch: int, steps: int, device: torch.device) -> float:
    model, optimizer, objective = _setup(spec, size, device)
    data = {
        "image": torch.rand(batch, 1, size, size, device=device),
        "label": (torch.rand(batch, device=device) > 0.5).float(),
        "mask": (torch.rand(batch, 1, size, size, device=device) > 0.9).float(),
    }
    for _ in range(3):
        train_step(model, objective, optimizer, data, device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, objective, optimizer, data, device)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def pipeline_rate(
    spec: ModelSpec, size: int, batch: int, steps: int, device: torch.device, dataset: RadiographDataset, workers: int
) -> float:
    model, optimizer, objective = _setup(spec, size, device)
    sampler = EpochSampler(dataset.positives, epochs=1, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=True,
    )

    def batches() -> Any:
        while True:
            yield from loader

    it = batches()
    for _ in range(3):  # warm-up: workers start, first batches decode
        train_step(model, objective, optimizer, next(it), device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, objective, optimizer, next(it), device)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def item_ms(dataset: RadiographDataset, n: int = 20) -> float:
    """Milliseconds to produce one training item on one thread, as a DataLoader worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            dataset[i % len(dataset)]
        return (time.perf_counter() - t0) / n * 1000
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--batch-size", default="4", help="one batch size, or one per size (comma-separated)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=48, help="images in the synthetic study")
    parser.add_argument("--data", type=Path, help="use this study (with train-rle.csv) instead of making one")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated keys of: " + ", ".join(MODELS))
    args = parser.parse_args()

    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-bench-"))
    try:
        study = args.data
        if study is None:
            study = tmp / "study"
            t0 = time.perf_counter()
            write_study(study, args.n, positive_rate=0.5, size=(1024, 1024), seed=1)
            print(f"made {args.n} synthetic 1024 px JPEG DICOMs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        csv = study / "train-rle.csv"
        records = index_dataset(study, csv).records
        labels = read_rle_csv(csv)
        # Long epochs: a loader restarting every few batches would measure its ramp-up, not its rate.
        most = max(int(b) for b in args.batch_size.split(","))
        records = records * max(1, -(-(args.steps + 3) * most * 2 // len(records)))
        sizes = [int(s) for s in args.sizes.split(",")]
        batch_sizes = [int(b) for b in args.batch_size.split(",")]
        if len(batch_sizes) == 1:
            batch_sizes *= len(sizes)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"device {device} ({name}); {args.workers} workers; torch {torch.__version__}; {len(set(records))} images"
        )
        print(
            f"{'model':26} {'size':>5} {'batch':>5} {'model img/s':>12} {'decode img/s':>13} {'ratio':>6} "
            f"{'cache img/s':>12} {'ratio':>6}"
        )
        for key in args.models.split(","):
            spec = MODELS[key.strip()]
            for size, batch in zip(sizes, batch_sizes, strict=True):
                masks = spec.kind == "segmenter"
                pure = pure_rate(spec, size, batch, args.steps, device)
                live = RadiographDataset(records, labels, size, masks=masks, augment=make_augment("strong"))
                decode = pipeline_rate(spec, size, batch, args.steps, device, live, args.workers)
                cache_dir = tmp / f"cache-{size}"
                cached = RadiographDataset(
                    records, labels, size, masks=masks, augment=make_augment("strong"), cache_dir=cache_dir
                )
                for i in range(len(cached)):  # fill the cache (what the first epoch does)
                    cached._load(cached.records[i])
                cache = pipeline_rate(spec, size, batch, args.steps, device, cached, args.workers)
                per_item = f"one worker: {item_ms(live):.1f} ms/item decoding, {item_ms(cached):.1f} ms from the cache"
                print(per_item, file=sys.stderr)
                print(
                    f"{key:26} {size:>5} {batch:>5} {pure:>12.1f} {decode:>13.1f} {decode / pure:>6.2f} {cache:>12.1f} "
                    f"{cache / pure:>6.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Demo weights: small models trained on synthetic phantoms, built on this machine from a recipe in the repo.

They exist so that ``pneumotriage demo`` (and anyone without SIIM-ACR data or a GPU) can run the whole cascade
offline. They are registered in ``weights.toml`` with ``clinical = false`` and ``recipe = "demo"``: they are
never a default for real images, and every output of a scan that uses them says "synthetic — not for clinical
use". Training is seeded but not bit-identical across machines, so their hash is recorded when first built
(like an unpinned download) rather than pinned in the registry.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.weights import WeightCache, WeightSpec

#: What each demo weight is trained as: a training config on the study that :func:`demo_training_study` makes.
RECIPES: dict[str, dict[str, Any]] = {
    # The learning tests' study, models and settings (tests/test_train.py), with fewer epochs. EfficientNet-B0
    # trained the same way did not learn at all in 10 epochs (held-out AUC 0.44, Dice 0), and with 64 training
    # images instead of 96 the segmenter had not started to learn after 10 epochs. Eight epochs in bf16 still
    # learn (measured on a separate 40-image study: AUC 0.92, 10 of 16 pneumothoraces outlined, no false outline;
    # in float32, for CPUs without native bf16: AUC 0.96, 11 of 16, no false outline);
    # a ResNet18 classifier and UNet/ResNet18, faster by a third, did not (AUC 0.72, nothing outlined).
    # The classifier is the cascade's gate: its threshold keeps 95 % of the validation positives (the segmenter's
    # triplet rule then removes the false positives it lets through). With Youden's J, in float32 on a 2-core AVX2
    # CPU, the gate sent only 5 of the demo study's 8 pneumothoraces to the segmenter, which outlined 7 of 8 when
    # shown all of them.
    "demo-classifier": {"kind": "classifier", "arch": "densenet121", "epochs": 8, "lr": 1e-3, "gate_sensitivity": 0.95},
    "demo-segmenter": {"kind": "segmenter", "arch": "unet", "encoder": "resnet34", "epochs": 8, "lr": 1e-3},
}
TRAINING_STUDY = {"n": 144, "positive_rate": 0.5, "size": 128, "seed": 3, "ptx_scale": 2.0}


def demo_training_study(folder: Path) -> Path:
    from pneumotriage.synth import synth_workers, write_study

    s = TRAINING_STUDY
    write_study(
        folder,
        int(s["n"]),
        positive_rate=float(s["positive_rate"]),
        size=(int(s["size"]), int(s["size"])),
        seed=int(s["seed"]),
        ptx_scale=float(s["ptx_scale"]),
        workers=synth_workers(int(s["n"])),
    )
    return folder


def _train(spec: WeightSpec, study: Path, run: Path, progress: Callable[[dict[str, Any]], None] | None) -> Path:
    """Train one demo weight by its recipe on ``study``; returns its best checkpoint."""
    from pneumotriage.runtime import cpu_has_bf16
    from pneumotriage.train import TrainConfig, train

    if spec.recipe != "demo" or spec.name not in RECIPES:
        raise UsageError(f"weight {spec.name!r} has no build recipe; known: {', '.join(RECIPES)}")
    recipe = RECIPES[spec.name]
    if recipe["kind"] != spec.kind or spec.input_size != TRAINING_STUDY["size"]:
        raise UsageError(f"weights.toml entry {spec.name!r} does not match its recipe (kind, input size)")
    cfg = TrainConfig(
        data=str(study),
        labels=str(study / "train-rle.csv"),
        out=str(run),
        image_size=spec.input_size,
        batch_size=8,
        seed=0,
        workers=0,
        val_fraction=1 / 3,
        pretrained=False,
        augment="light",
        device="cpu",
        # bf16 with channels_last where the CPU computes bf16 natively (AVX512-BF16/AMX): 1.8x faster there.
        precision="bf16" if cpu_has_bf16() else "fp32",
        cache=str(run.parent / "cache"),
        curves=False,  # the run folder is thrown away once the weight is in the cache
        **recipe,
    )
    train(cfg, progress=progress)
    return run / "best.pt"


def _train_in_child(spec: WeightSpec, study: Path, run: Path) -> Path:
    """:func:`_train` in a worker process, on one thread (the parent trains the other weight meanwhile)."""
    import torch

    torch.set_num_threads(1)
    return _train(spec, study, run, None)


def build(
    spec: WeightSpec,
    cache: WeightCache,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    work_dir: Path | None = None,
) -> tuple[Path, str]:
    """Train the weight ``spec`` names by its recipe and put the best checkpoint in the cache."""
    return build_all([spec], cache, progress=progress, work_dir=work_dir)[0]


def build_all(
    specs: list[WeightSpec],
    cache: WeightCache,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    work_dir: Path | None = None,
) -> list[tuple[Path, str]]:
    """Train the demo weights ``specs`` on one shared synthetic study and put each in the cache.

    Two weights train at once on a machine with two or more cores: the first in a worker process on one thread,
    the last here, on one thread until the worker is done and on all of them after. DenseNet121 gains little from
    a second thread at this size (21 vs 22 img/s on 2 cores), UNet/ResNet34 nearly doubles (9 vs 16), so this
    overlap saves about a fifth of the build. ``progress`` follows the weight trained here.

    The study and the worker are spawned processes, which re-import the calling script: call this from the CLI
    or from behind ``if __name__ == "__main__":``."""
    import torch

    from pneumotriage.runtime import usable_cores

    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-demo-", dir=work_dir))
    try:
        study = demo_training_study(tmp / "study")
        runs = [tmp / f"run-{spec.name}" for spec in specs]
        threads = torch.get_num_threads()
        checkpoints: list[Path] = []
        if len(specs) > 1 and usable_cores() > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(len(specs) - 1, mp_context=multiprocessing.get_context("spawn"))
            try:
                children = [
                    pool.submit(_train_in_child, spec, study, run)
                    for spec, run in zip(specs[:-1], runs[:-1], strict=True)
                ]
                torch.set_num_threads(1)

                def watch(event: dict[str, Any]) -> None:
                    if torch.get_num_threads() < threads and all(c.done() for c in children):
                        torch.set_num_threads(threads)  # the others are done: this one takes every core
                    if progress is not None:
                        progress(event)

                last = _train(specs[-1], study, runs[-1], watch)
                checkpoints = [c.result() for c in children] + [last]
            finally:
                torch.set_num_threads(threads)
                pool.shutdown(cancel_futures=True)
        else:
            checkpoints = [_train(spec, study, run, progress) for spec, run in zip(specs, runs, strict=True)]
        built = []
        for spec, checkpoint in zip(specs, checkpoints, strict=True):
            cache.forget_observed(spec)
            built.append(cache.import_file(spec, checkpoint, allow_unpinned=True))
        return built
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

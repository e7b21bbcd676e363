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
    # images instead of 96 the segmenter had not started to learn after 10 epochs.
    "demo-classifier": {"kind": "classifier", "arch": "densenet121", "epochs": 10, "lr": 1e-3},
    "demo-segmenter": {"kind": "segmenter", "arch": "unet", "encoder": "resnet34", "epochs": 10, "lr": 1e-3},
}
TRAINING_STUDY = {"n": 144, "positive_rate": 0.5, "size": 128, "seed": 3, "ptx_scale": 2.0}


def demo_training_study(folder: Path) -> Path:
    from pneumotriage.synth import write_study

    s = TRAINING_STUDY
    write_study(
        folder,
        int(s["n"]),
        positive_rate=float(s["positive_rate"]),
        size=(int(s["size"]), int(s["size"])),
        seed=int(s["seed"]),
        ptx_scale=float(s["ptx_scale"]),
    )
    return folder


def build(
    spec: WeightSpec,
    cache: WeightCache,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    work_dir: Path | None = None,
) -> tuple[Path, str]:
    """Train the weight ``spec`` names by its recipe and put the best checkpoint in the cache."""
    from pneumotriage.train import TrainConfig, train

    if spec.recipe != "demo" or spec.name not in RECIPES:
        raise UsageError(f"weight {spec.name!r} has no build recipe; known: {', '.join(RECIPES)}")
    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-demo-", dir=work_dir))
    try:
        study = demo_training_study(tmp / "study")
        recipe = RECIPES[spec.name]
        if recipe["kind"] != spec.kind or spec.input_size != TRAINING_STUDY["size"]:
            raise UsageError(f"weights.toml entry {spec.name!r} does not match its recipe (kind, input size)")
        cfg = TrainConfig(
            data=str(study),
            labels=str(study / "train-rle.csv"),
            out=str(tmp / "run"),
            image_size=spec.input_size,
            batch_size=8,
            seed=0,
            workers=0,
            val_fraction=1 / 3,
            pretrained=False,
            augment="light",
            device="cpu",
            **recipe,
        )
        train(cfg, progress=progress)
        cache.forget_observed(spec)
        return cache.import_file(spec, tmp / "run" / "best.pt", allow_unpinned=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

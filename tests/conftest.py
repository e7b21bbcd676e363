"""Shared fixtures: real data from ../shared/data (skipped with a reason where absent) and small synthetic studies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Before torch starts OpenMP: a thread waiting at a barrier sleeps rather than spins. Where a test runs
    # torch on two threads while the other test process computes, spinning made it 6x slower (the Kaggle
    # workflow test: 962 s against 155 s passive, 113 s alone).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from helpers import TINY_SIZE

from pneumotriage.synth import StudySummary, write_study
from pneumotriage.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """``$PNEUMOTRIAGE_REAL_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("PNEUMOTRIAGE_REAL_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    root = real_data_dir()
    if not (root / "siim-sample").is_dir():
        pytest.skip(f"real test data not found at {root} (set PNEUMOTRIAGE_REAL_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudySummary:
    """Twelve 128-px phantoms, five of them positive."""
    return write_study(tmp_path_factory.mktemp("study"), 12, positive_rate=5 / 12, size=(128, 128), seed=11)


@pytest.fixture(autouse=True)
def _private_weights_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's real weights cache."""
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(tmp_path_factory.mktemp("pneumotriage-home")))
    monkeypatch.delenv("PNEUMOTRIAGE_OFFLINE", raising=False)
    monkeypatch.delenv("PNEUMOTRIAGE_MIRROR", raising=False)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small models trained for two epochs at 64 px: enough to run the cascade, not to be right."""
    root = tmp_path_factory.mktemp("scan-models")
    study = write_study(root / "study", 16, positive_rate=0.5, size=(128, 128), seed=5, ptx_scale=2.0)
    paths = {}
    for kind, extra in (("classifier", {"arch": "efficientnet_b0"}), ("segmenter", {"encoder": "efficientnet_b0"})):
        cfg = TrainConfig(
            kind=kind,
            data=str(study.out),
            labels=str(study.labels_csv),
            out=str(root / kind),
            image_size=64,
            batch_size=4,
            epochs=2,
            workers=0,
            device="cpu",
            val_fraction=0.34,
            pretrained=False,
            augment="none",
            **extra,
        )
        train(cfg)
        paths[kind] = root / kind / "best.pt"
    return paths


@pytest.fixture
def scan_input(study: StudySummary, tmp_path: Path) -> Path:
    """The 12-image study, a truncated DICOM and a text file."""
    folder = tmp_path / "in"
    shutil.copytree(study.out, folder)
    (folder / "train-rle.csv").unlink()
    (folder / "manifest.json").unlink()
    (folder / "sample_submission.csv").unlink()
    first = next(folder.rglob("*.dcm"))
    (folder / "broken.dcm").write_bytes(first.read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudySummary, Path, Path]:
    """A 48-image 64-px study and a compact DenseNet classifier and UNet over it trained on it briefly (the demo's
    architectures: a third of ResNet34's and UNet/ResNet34's time, the same code)."""
    from pneumotriage.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    study = write_study(root / "study", 48, positive_rate=0.5, size=(TINY_SIZE, TINY_SIZE), seed=5, ptx_scale=2.0)
    common = {
        "data": str(study.out),
        "labels": str(study.labels_csv),
        "image_size": TINY_SIZE,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 0,
        "device": "cpu",
        "workers": 0,
        "val_fraction": 1 / 3,
        "pretrained": False,
        "augment": "none",
    }
    torch.manual_seed(0)
    cls = train(TrainConfig(kind="classifier", out=str(root / "cls"), arch="densenet_mini", epochs=6, **common))
    seg = train(
        TrainConfig(kind="segmenter", out=str(root / "seg"), arch="unet", encoder="densenet_mini", epochs=10, **common)
    )
    # the last epoch: at 64 px the segmenter's best validation epoch can be one that outlines nothing yet
    return study, cls.run_dir / "best.pt", seg.run_dir / "last.pt"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test process when pytest-xdist runs two of them on the two cores: more would
    # oversubscribe the cores (the tests' subprocesses choose their own).
    torch.set_num_threads(1)

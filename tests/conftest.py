"""Shared fixtures: real data from ../shared/data (skipped with a reason where absent) and small synthetic studies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pneumotriage.synth import StudySummary, write_study

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

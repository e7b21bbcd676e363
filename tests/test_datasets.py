"""Training data: preprocessing, masks, the cache, augmentation and the epoch sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumotriage.datasets import (
    EpochSampler,
    RadiographDataset,
    make_augment,
    prepare_mask,
    share_at,
)
from pneumotriage.folds import index_dataset
from pneumotriage.labels import read_rle_csv
from pneumotriage.native import square
from pneumotriage.synth import StudySummary


def test_prepare_image_and_mask() -> None:
    img = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    t = square(img, 32)
    assert t.shape == (1, 32, 32) and t.dtype == torch.float32 and 0 <= float(t.min()) <= float(t.max()) <= 1
    mask = np.zeros((40, 60), dtype=bool)
    mask[:20, :30] = True
    m = prepare_mask(mask, 32)
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert float(m.mean()) == pytest.approx(0.25, abs=0.03)


def test_dataset_items_and_cache(study: StudySummary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = index_dataset(study.out, study.labels_csv)
    labels = read_rle_csv(study.labels_csv)
    plain = RadiographDataset(index.records, labels, 64, masks=True)
    cached = RadiographDataset(index.records, labels, 64, masks=True, cache_dir=tmp_path / "cache")
    for i, record in enumerate(index.records):
        a, b = plain[i], cached[i]
        assert a["image"].shape == (1, 64, 64) and a["mask"].shape == (1, 64, 64)
        assert float(a["label"]) == float(record.positive) == float(a["mask"].max())
        torch.testing.assert_close(a["image"], b["image"], atol=1e-3, rtol=0)  # float16 in the cache
        torch.testing.assert_close(a["mask"], b["mask"])
    files = list((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == len(index.records)
    # a second pass reads the cache, not the DICOMs
    import pneumotriage.datasets as datasets_module

    def no_decoding(path: object, **options: object) -> None:
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(datasets_module, "read_dicom", no_decoding)
    again = RadiographDataset(index.records, labels, 64, masks=True, cache_dir=tmp_path / "cache")
    assert torch.equal(again[0]["image"], cached[0]["image"])
    with pytest.raises(AssertionError, match="decoded"):
        plain[0]


def test_augment_keeps_image_and_mask_aligned() -> None:
    torch.manual_seed(0)
    image = torch.zeros(1, 64, 64)
    image[:, 20:40, 10:30] = 1.0
    mask = (image > 0.5).float()
    aug = make_augment("strong")
    assert aug is not None and make_augment("none") is None
    for _ in range(10):
        im, m = aug(image.clone(), mask.clone())
        assert m is not None and set(torch.unique(m).tolist()) <= {0.0, 1.0}
        # the bright square and the mask move together
        inside, outside = im[m > 0.5], im[m < 0.5]
        assert float(inside.mean()) > float(outside.mean()) + 0.3


def test_share_schedule() -> None:
    assert share_at(0, 5, (0.8, 0.4)) == pytest.approx(0.8)
    assert share_at(4, 5, (0.8, 0.4)) == pytest.approx(0.4)
    assert share_at(2, 5, (0.8, 0.4)) == pytest.approx(0.6)
    assert share_at(0, 1, (0.8, 0.4)) == pytest.approx(0.8)


def test_sampler_positive_share_and_determinism() -> None:
    positives = [True] * 10 + [False] * 90
    sampler = EpochSampler(positives, epochs=5, seed=3, positive_share=(0.8, 0.4))
    shares = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 100
        shares.append(sum(positives[i] for i in order) / len(order))
    assert shares == pytest.approx([0.8, 0.7, 0.6, 0.5, 0.4])
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler)  # same epoch, same order
    plain = EpochSampler(positives, epochs=5, seed=3)
    assert sorted(plain) == list(range(100))


def test_sampler_shards_across_ranks() -> None:
    positives = [i % 3 == 0 for i in range(11)]
    shards = []
    for rank in range(3):
        s = EpochSampler(positives, epochs=2, seed=1, rank=rank, world_size=3)
        s.set_epoch(1)
        shards.append(list(s))
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    counts = Counter(i for s in shards for i in s)
    assert set(counts) == set(range(11)) and sum(counts.values()) == 12

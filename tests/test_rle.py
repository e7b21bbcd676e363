from __future__ import annotations

import gzip

import numpy as np
import pytest

from pneumotriage import rle_decode, rle_encode
from pneumotriage.errors import RleError
from pneumotriage.labels import read_rle_csv


def test_column_major_relative_golden() -> None:
    # 3 rows x 4 columns; column-major numbering goes down each column first.
    mask = np.array(
        [
            [0, 1, 0, 0],
            [0, 1, 0, 1],
            [1, 0, 0, 1],
        ],
        dtype=bool,
    )
    # Flat column-major: col0 = 0,0,1 ; col1 = 1,1,0 ; col2 = 0,0,0 ; col3 = 0,1,1
    # Runs (0-based): start 2 length 3 (pixels 2,3,4), start 10 length 2.
    # Relative: first start 2, then 10 - (2 + 3) = 5.
    assert rle_encode(mask) == "2 3 5 2"
    assert rle_encode(mask, relative=False) == "3 3 11 2"
    assert np.array_equal(rle_decode("2 3 5 2", 3, 4), mask)
    assert np.array_equal(rle_decode("3 3 11 2", 3, 4, relative=False), mask)


def test_empty_and_full() -> None:
    assert rle_encode(np.zeros((5, 7), dtype=bool)) == "-1"
    assert not rle_decode("-1", 5, 7).any()
    assert not rle_decode("  -1 ", 5, 7).any()
    full = np.ones((5, 7), dtype=bool)
    assert rle_encode(full) == "0 35"
    assert rle_decode("1 35", 5, 7, relative=False).all()


def test_decode_returns_contiguous_bool_of_shape() -> None:
    mask = rle_decode("0 4", 2, 3)
    assert mask.shape == (2, 3) and mask.dtype == bool and mask.flags.c_contiguous
    # The first four column-major pixels are column 0 and column 1.
    assert mask[:, :2].all() and not mask[:, 2].any()


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (16, 16), (37, 23), (64, 128)])
def test_round_trip_random(relative: bool, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = rng.random(shape) < density
        text = rle_encode(mask, relative=relative)
        assert np.array_equal(rle_decode(text, *shape, relative=relative), mask)


def test_relative_and_absolute_describe_the_same_runs() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((50, 40)) < 0.2
    rel = [int(v) for v in rle_encode(mask).split()]
    absolute = [int(v) for v in rle_encode(mask, relative=False).split()]
    starts, end = [], 0
    for gap, length in zip(rel[0::2], rel[1::2], strict=True):
        starts.append(end + gap + 1)
        end += gap + length
    assert starts == absolute[0::2] and rel[1::2] == absolute[1::2]


@pytest.mark.parametrize(
    ("text", "relative", "fragment"),
    [
        ("1 2 3", True, "odd number"),
        ("1 -2", True, "negative"),
        ("5 2 x 1", True, "non-integer"),
        ("0 30", True, "past the image"),
        ("20 5 1 5", True, "past the image"),
        ("0 2", False, "1-based"),
        ("5 4 7 2", False, "inside or before run"),
        ("9 2 3 1", False, "inside or before run"),
    ],
)
def test_malformed_strings_are_rejected(text: str, relative: bool, fragment: str) -> None:
    with pytest.raises(RleError, match=fragment):
        rle_decode(text, 5, 5, relative=relative)


def test_adjacent_and_zero_length_runs() -> None:
    # A relative start of 0 continues right after the previous run; zero-length runs add nothing.
    mask = rle_decode("2 2 0 3 0 0", 4, 4)
    assert mask.ravel(order="F").nonzero()[0].tolist() == [2, 3, 4, 5, 6]
    assert rle_encode(mask) == "2 5"


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("relative", [True, False])
def test_window_encodes_as_the_whole_image(relative: bool) -> None:
    """A mask given as its bounding window (origin + image shape) encodes exactly as the full image would,
    including runs that continue from one column of the window into the next (window as tall as the image)."""
    rng = np.random.default_rng(7)
    for top, left, h, w, shape in [(5, 9, 20, 31, (64, 48)), (0, 3, 64, 10, (64, 48)), (63, 47, 1, 1, (64, 48))]:
        window = rng.random((h, w)) > 0.4
        full = np.zeros(shape, dtype=bool)
        full[top : top + h, left : left + w] = window
        got = rle_encode(window, relative=relative, origin=(top, left), shape=shape)
        assert got == rle_encode(full, relative=relative)
    assert rle_encode(np.zeros((3, 3), bool), origin=(2, 2), shape=(8, 8)) == "-1"
    with pytest.raises(ValueError, match="does not fit"):
        rle_encode(np.ones((4, 4), bool), origin=(6, 0), shape=(8, 8))


@pytest.mark.realdata
def test_siim_sample_round_trip_and_counts(real_data) -> None:  # type: ignore[no-untyped-def]
    labels = read_rle_csv(real_data / "siim-sample" / "train-rle-sample.csv")
    expected = {
        "4904": 9418,
        "1314": 29079,
        "4440": 2486,
        "4982": 5232,
        "12743": 2071,
    }
    raw_rows = (real_data / "siim-sample" / "train-rle-sample.csv").read_text(encoding="utf-8-sig").splitlines()
    originals = {line.split(",")[0]: line.split(",", 1)[1].strip() for line in raw_rows}
    counts = {}
    for image_id, rows in labels.items():
        for rle in rows:
            mask = rle_decode(rle, 1024, 1024)
            assert rle_encode(mask) == originals[image_id]
        if rows:
            key = image_id.split(".")[-3]
            counts[key] = int(labels.masks_for(image_id).sum())
    assert counts == expected
    assert sum(1 for rows in labels.values() if not rows) == 5


@pytest.mark.realdata
def test_full_label_file_round_trips(real_data) -> None:  # type: ignore[no-untyped-def]
    path = real_data / "siim-labels" / "siim-pneumothorax-train-rle.csv.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8-sig").splitlines()[1:]
    positive_rows = [line.split(",", 1)[1].strip() for line in lines if line.split(",", 1)[1].strip() != "-1"]
    assert len(positive_rows) == 3576
    for rle in positive_rows:
        assert rle_encode(rle_decode(rle, 1024, 1024)) == rle


@pytest.mark.realdata
def test_rle_benchmark_prints_its_figure(real_data) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "rle_decode.py"
    labels = real_data / "siim-labels" / "siim-pneumothorax-train-rle.csv.gz"
    done = subprocess.run([sys.executable, str(script), str(labels)], capture_output=True, text=True, check=True)
    assert "rows decoded: 12954 (3576 non-empty)" in done.stdout
    assert "decode all rows, one core" in done.stdout

"""Decode every row of the full SIIM label file to 1024 x 1024 masks on one core and print the time.

Usage: python benchmarks/rle_decode.py [LABELS_CSV_GZ]
Default: ../shared/data/siim-labels/siim-pneumothorax-train-rle.csv.gz (or $PNEUMOTRIAGE_REAL_DATA/siim-labels/...).
Also prints, as a baseline measured in the same run, the cost of only allocating the same number of empty masks.
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np

from pneumotriage.rle import rle_decode


def main() -> int:
    default = Path(os.environ.get("PNEUMOTRIAGE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default / "siim-labels" / "siim-pneumothorax-train-rle.csv.gz"
    if not path.is_file():
        print(f"label file not found: {path} (pass its path as the first argument)", file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    lines = gzip.decompress(path.read_bytes()).decode("utf-8-sig").splitlines()[1:]
    rles = [line.split(",", 1)[1] for line in lines if line.strip()]

    start = time.perf_counter()
    for _ in rles:
        np.zeros((1024, 1024), dtype=bool)
    baseline = time.perf_counter() - start

    best = float("inf")
    pixels = 0
    for _ in range(3):
        start = time.perf_counter()
        pixels = 0
        for rle in rles:
            pixels += int(np.count_nonzero(rle_decode(rle, 1024, 1024)))
        best = min(best, time.perf_counter() - start)
    print(f"rows decoded: {len(rles)} ({sum(r.strip() != '-1' for r in rles)} non-empty), pixels set: {pixels}")
    print(f"decode all rows, one core, best of 3: {best:.3f} s ({best / len(rles) * 1e6:.0f} us/row)")
    print(f"baseline, allocating the empty masks only: {baseline:.3f} s; decode/baseline: {best / baseline:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

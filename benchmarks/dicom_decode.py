"""Throughput of read_dicom on SIIM-like 1024 px JPEG DICOMs, against bare JPEG decoding of the same bytes.

Usage: python benchmarks/dicom_decode.py [--n 64] [--size 1024] [--workers 1,2] [--folder DIR]
Makes a synthetic study (or uses --folder), then prints images/s for:
- baseline: Pillow decoding the JPEG codestreams alone (bytes already in memory),
- read_dicom: parse, decode, LUTs and normalisation, from files,
for each worker count, and the ratio read_dicom / baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames

from pneumotriage.dicom import read_dicom
from pneumotriage.synth import write_study


def _codestream(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _pillow(data: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(data))).shape[0])


def _read(path: Path) -> int:
    return int(read_dicom(path).pixels.shape[0])


def _rate(func, items: list, workers: int) -> float:  # type: ignore[type-arg, no-untyped-def]
    if workers == 1:
        start = time.perf_counter()
        for item in items:
            func(item)
        return len(items) / (time.perf_counter() - start)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(func, items[:workers]))  # start the workers before timing
        start = time.perf_counter()
        list(pool.map(func, items, chunksize=4))
        return len(items) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 1}")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="decode the file list this many times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            files = sorted(p for p in args.folder.rglob("*.dcm"))
        else:
            study = write_study(Path(tmp), args.n, positive_rate=0.3, size=(args.size, args.size), seed=0)
            files = [study.out / im.path for im in study.images]
        files = files * args.repeat
        streams = [_codestream(p) for p in files]
        print(f"{len(files)} decodes of JPEG Baseline DICOMs, {args.size} px, {os.cpu_count()} CPUs visible")
        for workers in sorted({int(w) for w in args.workers.split(",")}):
            base = _rate(_pillow, streams, workers)
            ours = _rate(_read, files, workers)
            print(
                f"workers {workers:2d}: Pillow JPEG only {base:8.1f} img/s | read_dicom {ours:8.1f} img/s "
                f"| read_dicom/baseline {ours / base:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

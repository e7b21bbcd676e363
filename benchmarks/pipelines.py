"""What an imported model's input pipeline costs per image against the tool's own, on the same files.

For each pipeline: the scan's read + decode stages for one image (`model_inputs`: the display copy, plus that input) in
milliseconds, the best of ``--repeat`` passes over the files, and its ratio to the tool's own pipeline at the same
size measured in the same run. The files: ``../shared/data/siim-sample`` (real SIIM JPEG DICOMs) by default.

    python benchmarks/pipelines.py [--folder DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pneumotriage.pipelines import InputKey
from pneumotriage.scan import model_inputs

CASES = [
    ("pneumotriage", 512),
    ("xrv", 512),
    ("pneumotriage", 224),
    ("xrv", 224),
    ("pneumotriage", 256),
    ("png8", 256),
    ("png8-square", 512),
]


def per_image_ms(files: list[Path], key: InputKey, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in model_inputs(files, key):
            pass
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(files)


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "siim-sample"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    files = sorted(args.folder.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOM files in {args.folder}")
    own: dict[int, float] = {}
    print(f"{len(files)} files from {args.folder}; best of {args.repeat}")
    for pipeline, size in CASES:
        ms = per_image_ms(files, InputKey(size, pipeline), args.repeat)
        if pipeline == "pneumotriage":
            own[size] = ms
        base = own.get(size)
        ratio = f"{ms / base:.2f}x the tool's own at {size}" if base and pipeline != "pneumotriage" else "baseline"
        print(f"{pipeline:>13} @{size:<4} {ms:7.1f} ms/image  {ratio}")


if __name__ == "__main__":
    main()

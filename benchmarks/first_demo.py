"""The first ``pneumotriage demo`` a new user runs: wall time from an empty weights cache, and what it finds.

Each run is the installed console script in a fresh process with its own empty ``PNEUMOTRIAGE_HOME`` (so the
demo weights are copied from the package, as on a new machine), for each precision asked and each seed of the
demo study. Printed per run: the wall time, the pneumothoraces ranked urgent (of those in the study) and the
other images ranked urgent, read from the run's worklist and the study's manifest.

    python benchmarks/first_demo.py                       # float32 forced and auto, seeds 7, 8 and 9
    python benchmarks/first_demo.py --precisions fp32 --seeds 7
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _counts(out: Path) -> tuple[int, int, int]:
    truth = {
        im["image_id"]: im["positive"] for im in json.loads((out / "study" / "manifest.json").read_text())["images"]
    }
    with open(out / "scan" / "worklist.csv", newline="") as fh:
        urgent = [row["image_id"] for row in csv.DictReader(fh) if row["tier"] == "urgent"]
    found = sum(1 for i in urgent if truth[i])
    return sum(truth.values()), found, len(urgent) - found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,auto", help="comma-separated: fp32, auto, bf16")
    parser.add_argument("--seeds", default="7,8,9", help="comma-separated seeds of the demo study")
    args = parser.parse_args()
    script = shutil.which("pneumotriage") or str(Path(sys.executable).with_name("pneumotriage"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    for precision in args.precisions.split(","):
        for seed in args.seeds.split(","):
            with tempfile.TemporaryDirectory(prefix="first-demo-") as tmp:
                env = {**os.environ, "PNEUMOTRIAGE_HOME": str(Path(tmp) / "home")}
                out = Path(tmp) / "demo-out"
                start = time.perf_counter()
                done = subprocess.run(
                    [script, "demo", "--out", str(out), "--seed", seed, "--precision", precision],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    print(f"{precision} seed {seed}: exit {done.returncode}\n{done.stderr}")
                    continue
                positives, found, false_urgent = _counts(out)
                print(
                    f"{precision:>5} seed {seed}: {wall:5.1f} s, {found} of {positives} pneumothoraces urgent, "
                    f"{false_urgent} false urgent"
                )


if __name__ == "__main__":
    main()

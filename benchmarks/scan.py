"""Scan throughput: the whole cascade end to end against the pure model time for the same images, in one run.

- end to end: ``pneumotriage.cascade.scan`` over a synthetic folder of 1024 px JPEG DICOMs (SIIM's encoding):
  discovery, decoding in workers, both models, post-processing, every output file;
- model: the classifier on every image and the segmenter on as many images as the scan segmented, on tensors
  already in memory, with the same batch size;
- overhead = (end to end - model) / model; the target on CPU is <= 25 %;
- single image: one file scanned alone, start to finish (models already loaded).

The models are untrained networks of the default architectures at the given input sizes (speed does not depend
on the weights); ``--gate 0`` sends every image to the segmenter, the worst case.

    python benchmarks/scan.py --n 32 --workers 2
    python benchmarks/scan.py --device cuda --n 512 --workers 14 --batch-size 64 --data bench-data
    python benchmarks/scan.py --memory        # peak memory of a scan of 200 and of 2,000 small images

``--memory`` scans synthetic studies of 200 and 2,000 images (64 px, models at 64 px, every image segmented) in
a fresh process each and prints each process's peak resident memory (and its largest decoding worker's): memory
must stay flat with the folder size (target: the larger within 1.2x of the smaller).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pneumotriage.models import LoadedModel, ModelSpec, build_model
from pneumotriage.runtime import pick_device
from pneumotriage.scan import ScanOptions
from pneumotriage.scan import run as scan
from pneumotriage.synth import synth_workers, write_study


def _loaded(spec: ModelSpec) -> LoadedModel:
    model = build_model(spec).eval()
    return LoadedModel(model, spec, dict(model.thresholds), {"clinical": True}, None, "0" * 64, spec.title)


@torch.no_grad()
def pure_model_s(clf: LoadedModel, seg: LoadedModel, n: int, n_seg: int, batch: int, device: torch.device) -> float:
    def run(m: LoadedModel, count: int) -> None:
        size = m.spec.input_size
        x = torch.rand(batch, 1, size, size, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        done = 0
        while done < count:
            k = min(batch, count - done)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.no_grad():
                m.model(x[:k])
            done += k

    for m in (clf, seg):
        m.model.to(device)
        run(m, batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run(clf, n)
    run(seg, n_seg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _memory_child(folder: Path, out: Path, workers: int) -> None:
    """Scan ``folder`` and print this process's peak RSS and its largest child's, in MiB."""
    clf = _loaded(ModelSpec("classifier", "densenet121", input_size=64))
    seg = _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=64))
    summary = scan([folder], out, classifier=clf, segmenter=seg, options=ScanOptions(gate=0.0, workers=workers))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{summary.counts['decoded']} {own:.1f} {child:.1f}")


def memory(workers: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-scan-memory-"))
    try:
        peaks = {}
        for n in (200, 2000):
            folder = tmp / f"study{n}"
            write_study(folder, n, positive_rate=0.3, size=(64, 64), seed=3, workers=synth_workers(n))
            for extra in ("train-rle.csv", "manifest.json"):
                (folder / extra).unlink()
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(folder), str(tmp / f"out{n}"), str(workers)],
                check=True,
                capture_output=True,
                text=True,
            )
            images, own, child = done.stdout.split()
            peaks[n] = float(own)
            print(
                f"{int(images):5d} images: peak RSS {float(own):7.1f} MiB (largest worker {float(child):6.1f} MiB), "
                f"{time.perf_counter() - t0:.1f} s"
            )
        print(f"2,000 / 200 images: {peaks[2000] / peaks[200]:.3f}x (target <= 1.2x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        _memory_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=32, help="images in the synthetic study")
    parser.add_argument("--data", type=Path, help="scan this folder instead of a new synthetic study")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classifier-size", type=int, default=256)
    parser.add_argument("--segmenter-size", type=int, default=512)
    parser.add_argument("--gate", type=float, default=0.0)
    parser.add_argument("--memory", action="store_true", help="peak memory for 200 and 2,000 images instead")
    args = parser.parse_args()
    if args.memory:
        memory(args.workers)
        return 0

    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-scan-bench-"))
    try:
        folder = args.data
        if folder is None:
            folder = tmp / "study"
            write_study(folder, args.n, positive_rate=0.3, size=(1024, 1024), seed=2)
            for extra in ("train-rle.csv", "manifest.json"):
                (folder / extra).unlink()
        clf = _loaded(ModelSpec("classifier", "densenet121", input_size=args.classifier_size))
        seg = _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=args.segmenter_size))
        options = ScanOptions(gate=args.gate, workers=args.workers, batch_size=args.batch_size, device=str(device))

        scan([folder], tmp / "warm", classifier=clf, segmenter=seg, options=options)  # first run: imports, caches
        t0 = time.perf_counter()
        summary = scan([folder], tmp / "out", classifier=clf, segmenter=seg, options=options)
        end_to_end = time.perf_counter() - t0
        n = summary.counts["decoded"]
        model = pure_model_s(clf, seg, n, summary.counts["segmented"], args.batch_size, device)

        one = next(p for p in sorted(folder.rglob("*")) if p.is_file())
        single_options = ScanOptions(gate=args.gate, workers=0, batch_size=1, device=str(device))
        latencies = []
        for i in range(3):
            t1 = time.perf_counter()
            scan([one], tmp / f"one{i}", classifier=clf, segmenter=seg, options=single_options)
            latencies.append(time.perf_counter() - t1)

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"device {device} ({name}); torch {torch.__version__}; {args.workers} workers; batch {args.batch_size}")
        print(
            f"classifier densenet121 @{args.classifier_size}, segmenter unet/resnet34 @{args.segmenter_size}; "
            f"{n} images, {summary.counts['segmented']} segmented"
        )
        print(f"end to end   {end_to_end:8.2f} s   {n / end_to_end:8.1f} img/s")
        print(f"model only   {model:8.2f} s   {n / model:8.1f} img/s")
        print(f"overhead     {(end_to_end - model) / model * 100:7.1f} % of model time (target <= 25 % on CPU)")
        print(f"one image    {min(latencies) * 1000:8.0f} ms (best of 3, models loaded, no workers)")
        print(
            f"inside the scan: {summary.timings['model_s']:.2f} s in the models, "
            f"{summary.timings['discover_s']:.2f} s discovering",
            file=sys.stderr,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

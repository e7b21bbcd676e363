"""Scan throughput, each figure against a baseline measured in the same run.

Modes (one per run):

- default: the whole scan (``pneumotriage.scan.run``) over a synthetic folder of 1024 px JPEG DICOMs (SIIM's
  encoding) with untrained networks of the default architectures, against the pure model time for the same
  images (overhead = (end to end - model) / model), and one file scanned alone;
- ``--ceiling``: the whole scan with near-zero-cost models (a constant classifier; a segmenter returning one
  small region per image) against decoding the same files alone with the same number of worker processes,
  with nothing segmented and with every image outlined (target >= 0.8 for both on the 2-core machine);
- ``--peer``: ``pneumotriage scan --no-segment`` with TorchXRayVision's ResNet50-res512 architecture (random
  weights imported into a scratch registry) against TorchXRayVision's documented per-file loop with the same
  weights on the same files, each a whole process, median of ``--repeat`` paired runs (target >= 2.0x on a 2-core
  CPU with ``--backend auto``, >= 3x on a GPU); ``--load`` runs the pairs again beside a second CPU-bound process.
  torchxrayvision is installed into a scratch folder (``--peer-site``) for this only; it is not a dependency;
- ``--peer-dataloader`` (with the default mode): the same job as a plain PyTorch loop, a ``DataLoader`` with
  pydicom + Pillow decoding in cores - 1 workers feeding the same models at the same batch, nothing written;
  ours / it (target >= 2x on one H100/H200, issue #29);
- ``--memory``: peak memory of scans of 200 and 2,000 small images, each in a fresh process (target: the larger
  within 1.2x of the smaller);
- ``--feeder``: the scan's own process's CPU per image (``getrusage``, all its threads, not the workers'), with
  near-zero-cost models, 512 images of 1024 px, batch 64, one worker and finishing forced to the workers as on a
  GPU: what caps a GPU scan whatever the GPU (targets <= 0.25 ms/img nothing segmented, <= 0.5 every image
  outlined), and split, from a scan of half the files, into what each image and what each scan costs;
- ``--ranks 1,2``: the whole scan of one folder (default architectures, random weights, every image segmented)
  as 1 process and as R torchrun ranks (each on its own GPU, or its share of the CPU cores), each a whole
  process, merge included; throughput and the speed-up against 1 process.

    python benchmarks/scan.py --n 32
    python benchmarks/scan.py --ceiling --workers 2
    python benchmarks/scan.py --peer --n 40 --load
    python benchmarks/scan.py --device cuda --n 512 --batch-size 64 --data bench-data
    python benchmarks/scan.py --device cuda --n 2048 --batch-size 64 --peer-dataloader --data bench-data-2048
    python benchmarks/scan.py --memory
    python benchmarks/scan.py --feeder --data bench-data-512
    python benchmarks/scan.py --ranks 1,2 --n 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pneumotriage.models import LoadedModel, ModelSpec, build_model, save_checkpoint
from pneumotriage.pipelines import InputKey
from pneumotriage.runtime import autocast_for, pick_device, usable_cores
from pneumotriage.scan import Execution, Found, ScanOptions, Workers, decode_task, plan_for, prepare_models
from pneumotriage.scan import run as scan
from pneumotriage.synth import synth_workers, write_study


def _loaded(spec: ModelSpec) -> LoadedModel:
    model = build_model(spec).eval()
    thresholds: dict[str, float] = dict(getattr(model, "thresholds", {}))
    return LoadedModel(model, spec, thresholds, {"clinical": True}, None, "0" * 64, spec.title)


@torch.inference_mode()
def pure_model_s(
    clf: LoadedModel, seg: LoadedModel, n: int, n_seg: int, batch: int, device: torch.device, compiled: bool = False
) -> float:
    """The models alone, set up as the scan runs them, on tensors already in memory."""
    prepared = prepare_models(device, clf, seg, compile_batch=batch if compiled else None)

    def run(m: LoadedModel, count: int) -> None:
        size = m.spec.input_size
        x = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
        done = 0
        while done < count:
            k = min(batch, count - done)
            with autocast_for(device):
                m.model(x[:k])
            done += k

    for m in prepared:
        assert m is not None
        run(m, batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run(prepared[0], n)  # type: ignore[arg-type]
    run(prepared[1], n_seg)  # type: ignore[arg-type]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _study(folder: Path, n: int, distinct: int = 64) -> Path:
    """``n`` 1024 px JPEG DICOMs (SIIM's encoding): ``distinct`` phantoms, copied under other names up to ``n``
    (decoding costs the same for a copy, and rendering phantoms is slow)."""
    src = folder / "src"
    write_study(src, min(n, distinct), positive_rate=0.3, size=(1024, 1024), seed=2, workers=synth_workers(n))
    files = sorted(src.rglob("*.dcm"))
    out = folder / "study"
    out.mkdir(parents=True)
    for i in range(n):
        shutil.copyfile(files[i % len(files)], out / f"img{i:05d}.dcm")
    shutil.rmtree(src)
    return out


def _folder(args: argparse.Namespace, tmp: Path) -> Path:
    """``--data`` (written first when missing: ``--n`` images, kept), else a new study in ``tmp``."""
    if args.data is None:
        return _study(tmp, args.n)
    if not args.data.exists():
        built = _study(tmp / "data", args.n)
        args.data.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), str(args.data))
    return Path(args.data)


# --------------------------------------------------------------------------------------------------------------
# --ceiling


class _Constant(nn.Module):
    """A classifier that costs nothing: logit 0 (probability 0.5) for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], device=x.device)


class _OneRegion(nn.Module):
    """A segmenter that costs next to nothing: one confident 32 x 32 region per image (0.4 % of the image at
    512 px: past the triplet's min_area), the rest certain background; the map is made once and reused."""

    def __init__(self) -> None:
        super().__init__()
        self._map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        if self._map is None or self._map.shape[-2:] != (h, w):
            self._map = torch.full((1, 1, h, w), -10.0, device=x.device)
            self._map[:, :, h // 3 : h // 3 + 32, w // 4 : w // 4 + 32] = 10.0
        return {"mask": self._map.expand(b, 1, h, w)}


def _stub(kind: str, module: nn.Module, size: int) -> LoadedModel:
    arch, encoder = ("unet", "resnet34") if kind == "segmenter" else ("resnet34", None)
    spec = ModelSpec(kind, arch, encoder, input_size=size)
    return LoadedModel(module, spec, {}, {"clinical": True}, None, "0" * 64, f"zero-cost {kind}")


def decode_alone_s(files: list[Path], workers: int, size: int) -> float:
    """The decode stage alone: the same worker processes reading and decoding every file into the slot arena,
    with the same window of files in flight, nothing else."""
    window = 2 + 2 * workers
    with Workers(workers, slots=window, keys=[InputKey(size)], map_size=None) as pool:
        t0 = time.perf_counter()
        pending: deque[tuple[int, Future[Any]]] = deque()
        free = deque(range(window))
        for i, path in enumerate(files):
            if not free:
                slot, future = pending.popleft()
                future.result()
                free.append(slot)
            slot = free.popleft()
            pending.append((slot, pool.submit(decode_task, Found(path, path.stem, str(i)), slot, slot, False)))
        for _, future in pending:
            future.result()
        return time.perf_counter() - t0


def _zero_cost(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[Path], LoadedModel, LoadedModel]:
    """The study's folder and files, and the near-zero-cost classifier and segmenter at 512 px."""
    folder = _folder(args, tmp)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return folder, files, _stub("classifier", _Constant(), 512), _stub("segmenter", _OneRegion(), 512)


def ceiling(args: argparse.Namespace, tmp: Path) -> None:
    folder, files, clf, seg = _zero_cost(args, tmp)
    size = 512
    auto = plan_for(Execution(), torch.device("cpu"), size).workers
    print(
        f"{len(files)} files of {folder}; models at {size} px; {usable_cores()} cores (auto: {auto} worker"
        f"{'s' if auto != 1 else ''}); torch {torch.__version__}; JPEG decoding: {args.jpeg_decode}"
    )
    for workers in args.workers_list:
        decode_alone_s(files[: 2 * workers + 2], workers, size)  # warm the page cache and the code paths
        base = min(decode_alone_s(files, workers, size) for _ in range(3))
        print(f"{workers} workers: decoding alone {len(files) / base:7.1f} img/s")
        for label, options in (
            # the constant 0.5 never reaches 1
            ("nothing segmented", ScanOptions.of(gate=1.0, workers=workers, jpeg_decode=args.jpeg_decode)),
            ("every image outlined", ScanOptions.of(segment_all=True, workers=workers, jpeg_decode=args.jpeg_decode)),
        ):
            times = []
            for i in range(3):
                t0 = time.perf_counter()
                summary = scan(
                    [folder], tmp / f"ceiling-{workers}-{label[:4]}-{i}", classifier=clf, segmenter=seg, options=options
                )
                times.append(time.perf_counter() - t0)
            outlined = sum(1 for r in summary.results if r.area_px)
            best = min(times)
            print(
                f"  scan, {label:20s} {len(files) / best:7.1f} img/s = {base / best:.2f} of decoding alone "
                f"(target >= 0.8); {outlined} outlined; batch {summary.plan['batch_size']}"
            )


# --------------------------------------------------------------------------------------------------------------
# --feeder


def _main_cpu_s() -> float:
    """CPU seconds of this process (all its threads; not its children, the worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def feeder(args: argparse.Namespace, tmp: Path) -> None:
    """The feeding process's own CPU per image, as on a GPU: near-zero-cost models, finishing in the workers.

    Printed three ways: the whole scan of every file divided by the files (the issue's figure); and, from a
    second scan of the first half of the files, what one more image costs (the slope) and what a scan costs
    whatever its size (starting the workers, the arena's memory, the report's fixed parts)."""
    folder, files, clf, seg = _zero_cost(args, tmp)
    half = tmp / "feeder-half"
    half.mkdir()
    for path in files[: len(files) // 2]:
        os.link(path, half / path.name)  # the same files, not copies: the page cache holds them once
    size = 512
    workers = _auto(args.workers) or 1
    batch = args.batch_size or 64
    print(
        f"{len(files)} files of {folder}; models at {size} px; batch {batch}; {workers} worker"
        f"{'s' if workers != 1 else ''}; finishing in the workers; torch {torch.__version__}"
    )
    for label, extra, target in (
        ("nothing segmented", {"gate": 1.0}, 0.25),
        ("every image outlined", {"segment_all": True}, 0.5),
    ):
        common = {"workers": workers, "batch_size": batch, "finish_in_workers": True, "jpeg_decode": "workers"}
        options = ScanOptions.of(**common, **extra)
        scan([folder], tmp / f"feeder-warm-{label[:4]}", classifier=clf, segmenter=seg, options=options)
        cpu: dict[int, float] = {}
        for source, n in ((folder, len(files)), (half, len(files) // 2)):
            runs = []
            for i in range(5):  # the best of 5: another process on the machine only ever adds
                before, t0 = _main_cpu_s(), time.perf_counter()
                out = tmp / f"feeder-{label[:4]}-{n}-{i}"
                summary = scan([source], out, classifier=clf, segmenter=seg, options=options)
                runs.append((_main_cpu_s() - before, time.perf_counter() - t0))
                shutil.rmtree(out)
            cpu[n], wall = min(runs)
            if n == len(files):
                outlined = sum(1 for r in summary.results if r.area_px)
                print(
                    f"  {label:20s} main-process CPU {cpu[n] / n * 1000:.3f} ms/img (target <= {target}); "
                    f"{n / wall:.0f} img/s; {outlined} outlined"
                )
        n, m = len(files), len(files) // 2
        slope = (cpu[n] - cpu[m]) / (n - m)
        print(
            f"  {'':20s} of which: {slope * 1000:.3f} ms for each image, {(cpu[n] - slope * n) * 1000:.0f} ms a scan "
            f"(from scans of {m} and {n} images)"
        )


# --------------------------------------------------------------------------------------------------------------
# --peer

_PEER_LOOP = """
import glob, os, sys, torch, torchvision
import torchxrayvision as xrv
model = xrv.models.ResNet(weights="resnet50-res512-all", cache_dir=sys.argv[2])
transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(512)])
n = 0
for path in sorted(glob.glob(os.path.join(sys.argv[1], "**", "*.dcm"), recursive=True)):
    img = transform(xrv.utils.read_xray_dcm(path)[None, ...])
    with torch.no_grad():
        model(torch.from_numpy(img)[None, ...])
    n += 1
print(n)
"""
_XRV_FILE = "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt"


def _peer_site(site: Path) -> None:
    """torchxrayvision and what it imports beyond our own dependencies, in a scratch folder."""
    if (site / "torchxrayvision").is_dir() and (site / "tqdm").is_dir():
        return
    packages = [
        "torchxrayvision",
        "pandas",
        "imageio",
        "requests",
        "python-dateutil",
        "pytz",
        "tzdata",
        "six",
        "urllib3",
        "idna",
        "charset-normalizer",
        "certifi",
        "tqdm",
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *packages], check=True
    )


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def peer(args: argparse.Namespace, tmp: Path) -> None:
    folder = _folder(args, tmp)
    _peer_site(args.peer_site)
    cache = tmp / "xrv-cache"
    cache.mkdir()
    # TorchXRayVision's ResNet50-res512 layout (one input channel, 18 outputs), random weights, for both sides.
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(net.state_dict(), cache / _XRV_FILE)
    env = {**os.environ, "PNEUMOTRIAGE_HOME": str(tmp / "home")}
    ours = [sys.executable, "-m", "pneumotriage"]
    subprocess.run(
        [*ours, "weights", "import", "xrv-resnet50-res512-all", str(cache / _XRV_FILE), "--allow-unpinned"],
        check=True,
        env=env,
        capture_output=True,
    )
    peer_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.peer_site), env.get("PYTHONPATH")]))}
    n = len(list(folder.rglob("*.dcm")))
    peer_cmd = [sys.executable, "-c", _PEER_LOOP, str(folder), str(cache)]
    extra = ["--device", args.device, "--backend", args.backend, "--precision", args.precision]
    extra += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    scan_cmd = [*ours, "scan", str(folder), "--classifier", "xrv-resnet50-res512-all", "--no-segment", "--no-progress"]
    # A first scan, not timed, makes what later scans find ready: with --backend auto it measures the backends
    # and exports the graph (once per model and machine), as a user's first scan does.
    first = _wall([*scan_cmd, "--out", str(tmp / "peer-first"), *extra], env)
    plan = json.loads((tmp / "peer-first" / "worklist.json").read_text())["plan"]
    chosen = plan.get("backends", {}).get("classifier", {})
    print(
        f"{n} files of {folder}; {usable_cores()} cores; torch {torch.__version__}; "
        f"ours: {plan['device']}, batch {plan['batch_size']}, {plan['workers']} workers, "
        f"backend {chosen.get('version', 'torch')} ({chosen.get('why', '')}); first scan {first:.1f} s"
    )
    loads = [False, True] if args.load else [False]
    for loaded in loads:
        load = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
        try:
            times: dict[str, list[float]] = {"peer": [], "ours": []}
            for i in range(args.repeat):  # paired: each pair runs back to back, under the same conditions
                times["peer"].append(_wall(peer_cmd, peer_env))
                times["ours"].append(_wall([*scan_cmd, "--out", str(tmp / f"peer-out{int(loaded)}-{i}"), *extra], env))
        finally:
            if load is not None:
                load.kill()
                load.wait()
        ratios = sorted(p / o for p, o in zip(times["peer"], times["ours"], strict=True))
        print("with a second CPU-bound process running:" if loaded else "quiet:")
        for side in ("peer", "ours"):
            print(f"  {side:5s} whole process: {', '.join(f'{t:.1f}' for t in times[side])} s")
        print(
            f"  ours / peer speed, median of {len(ratios)} paired runs: {ratios[len(ratios) // 2]:.2f}x "
            f"(each pair: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 2.0x on a CPU with --backend auto)"
        )


def ranks(args: argparse.Namespace, tmp: Path) -> None:
    folder = _folder(args, tmp)
    n = len(list(folder.rglob("*.dcm")))
    torch.manual_seed(0)
    models = tmp / "models"
    models.mkdir()
    clf = save_checkpoint(
        models / "clf.pt", build_model(ModelSpec("classifier", "densenet121", input_size=args.classifier_size))
    )
    seg = save_checkpoint(
        models / "seg.pt", build_model(ModelSpec("segmenter", "unet", "resnet34", input_size=args.segmenter_size))
    )
    common = ["--classifier", str(clf), "--segmenter", str(seg), "--gate", str(args.gate), "--no-progress"]
    common += ["--device", args.device] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    env = {**os.environ, "PNEUMOTRIAGE_HOME": str(tmp / "home")}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per rank; each rank sets its own from its cores
    best: dict[int, float] = {}
    for r in args.ranks_list:
        launcher = [sys.executable] if r == 1 else [sys.executable, "-m", "torch.distributed.run"]
        launcher += [] if r == 1 else ["--nproc-per-node", str(r), "--master-port", str(29500 + r)]
        times = []
        for i in range(args.repeat):
            out = tmp / f"ranks{r}-{i}"
            times.append(_wall([*launcher, "-m", "pneumotriage", "scan", str(folder), "--out", str(out), *common], env))
        best[r] = min(times)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {usable_cores()} cores"
    print(f"{n} files of {folder}; {name}; torch {torch.__version__}; every image segmented (gate {args.gate})")
    print(f"classifier densenet121 @{args.classifier_size}, segmenter unet/resnet34 @{args.segmenter_size}")
    for r, t in best.items():
        print(
            f"{r} process{'es' if r > 1 else '  '}: best of {args.repeat} {t:7.1f} s  {n / t:7.2f} img/s  "
            f"speed-up {best[args.ranks_list[0]] / t:.2f}x"
        )


def _memory_child(folder: Path, out: Path, workers: int) -> None:
    """Scan ``folder`` and print this process's peak RSS and its largest child's, in MiB."""
    clf = _loaded(ModelSpec("classifier", "densenet121", input_size=64))
    seg = _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=64))
    summary = scan([folder], out, classifier=clf, segmenter=seg, options=ScanOptions.of(gate=0.0, workers=workers))
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


def _auto(text: str) -> int | None:
    return None if text == "auto" else int(text)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        _memory_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="images in the synthetic study (default 32; 1024 for --ceiling, 40 for --peer)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="scan this folder instead of a new synthetic study; if it does not exist, the study is written there "
        "and kept for later runs",
    )
    parser.add_argument("--workers", default="auto", help="worker processes, or a list for --ceiling (1,2)")
    parser.add_argument("--batch-size", type=_auto, default=None)
    parser.add_argument("--classifier-size", type=int, default=256)
    parser.add_argument("--segmenter-size", type=int, default=512)
    parser.add_argument("--gate", type=float, default=0.0)
    parser.add_argument("--compile", action="store_true", help="default mode: scan with compiled models")
    parser.add_argument(
        "--jpeg-decode",
        choices=("auto", "workers", "device"),
        default="auto",
        help="where JPEG Baseline frames are decoded (default and --ceiling): the plan's choice, the worker "
        "processes, or the device (nvJPEG on CUDA)",
    )
    parser.add_argument("--memory", action="store_true", help="peak memory for 200 and 2,000 images")
    parser.add_argument("--ceiling", action="store_true", help="near-zero-cost models against decoding alone")
    parser.add_argument(
        "--feeder", action="store_true", help="the feeding process's own CPU per image (512 images, batch 64)"
    )
    parser.add_argument("--peer", action="store_true", help="against TorchXRayVision's per-file loop")
    parser.add_argument(
        "--peer-dataloader",
        action="store_true",
        help="default mode: also a plain PyTorch DataLoader loop (pydicom + Pillow in cores - 1 workers) with the "
        "same models and batch, and the ratio",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="--peer: paired runs (the median counts); --ranks: runs (the best)"
    )
    parser.add_argument("--backend", default="auto", help="--peer: our scan's --backend")
    parser.add_argument(
        "--precision", default="auto", help="--peer: our scan's --precision (bf16: on a CPU with native bf16 only)"
    )
    parser.add_argument(
        "--load", action="store_true", help="--peer: the pairs again while a second CPU-bound process runs"
    )
    parser.add_argument("--ranks", help="processes to compare, e.g. 1,2 (torchrun ranks; 1: a plain scan)")
    parser.add_argument(
        "--peer-site",
        type=Path,
        default=Path.home() / ".cache" / "pneumotriage-bench" / "xrv-site",
        help="--peer: scratch folder torchxrayvision is installed into",
    )
    args = parser.parse_args()
    if args.memory:
        memory(_auto(args.workers) or 2)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="pneumotriage-scan-bench-"))
    try:
        if args.ceiling:
            args.n = args.n or 1024
            args.workers_list = [int(w) for w in (args.workers if args.workers != "auto" else "1,2").split(",")]
            ceiling(args, tmp)
        elif args.feeder:
            args.n = args.n or 512
            feeder(args, tmp)
        elif args.peer:
            args.n = args.n or 40
            peer(args, tmp)
        elif args.ranks:
            args.n = args.n or 64
            args.ranks_list = [int(r) for r in args.ranks.split(",")]
            ranks(args, tmp)
        else:
            args.n = args.n or 32
            default(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# --peer-dataloader


class _PlainDicoms(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """What a plain PyTorch loop does with a folder of DICOMs: pydicom reads each file (Pillow decodes its JPEG
    Baseline), the pixels are scaled to [0, 1] by their range and resized to each model's size."""

    def __init__(self, files: list[Path], sizes: tuple[int, int]) -> None:
        self.files, self.sizes = files, sizes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import pydicom
        import torch.nn.functional as F  # noqa: N812 (the usual name)

        pixels = torch.from_numpy(pydicom.dcmread(self.files[i]).pixel_array.astype("float32"))
        low, high = pixels.min(), pixels.max()
        pixels = ((pixels - low) / torch.clamp(high - low, min=1.0))[None, None]
        a, b = (F.interpolate(pixels, size=(s, s), mode="bilinear", antialias=True)[0] for s in self.sizes)
        return a, b


@torch.inference_mode()
def dataloader_loop_s(
    files: list[Path], clf: LoadedModel, seg: LoadedModel, batch: int, gate: float, device: torch.device
) -> float:
    """The whole job done as a plain loop would: a ``DataLoader`` (cores - 1 workers, pinned memory on CUDA)
    feeding the same prepared models, the images at or above ``gate`` segmented and their maps brought back;
    nothing written. Seconds from the loader's start to the last map."""
    classifier, segmenter = prepare_models(device, clf, seg)
    assert classifier is not None and segmenter is not None
    sizes = (clf.spec.input_size, seg.spec.input_size)
    loader = torch.utils.data.DataLoader(
        _PlainDicoms(files, sizes),
        batch_size=batch,
        num_workers=max(1, usable_cores() - 1),
        pin_memory=device.type == "cuda",
    )
    t0 = time.perf_counter()
    for small, large in loader:
        with autocast_for(device):
            x = small.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            probs = torch.sigmoid(classifier.model(x).float()).cpu()
            keep = probs >= gate
            if keep.any():
                y = large[keep].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                torch.sigmoid(segmenter.model(y)["mask"].float()).cpu()
    return time.perf_counter() - t0


def default(args: argparse.Namespace, tmp: Path) -> None:
    device = pick_device(args.device)
    folder = _folder(args, tmp)
    clf = _loaded(ModelSpec("classifier", "densenet121", input_size=args.classifier_size))
    seg = _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=args.segmenter_size))
    options = ScanOptions.of(
        gate=args.gate,
        workers=_auto(args.workers),
        batch_size=args.batch_size,
        device=str(device),
        jpeg_decode=args.jpeg_decode,
        compile=args.compile,
    )

    scan([folder], tmp / "warm", classifier=clf, segmenter=seg, options=options)  # first run: imports, caches
    t0 = time.perf_counter()
    summary = scan([folder], tmp / "out", classifier=clf, segmenter=seg, options=options)
    end_to_end = time.perf_counter() - t0
    n = summary.counts["decoded"]
    batch = summary.plan["batch_size"]
    model = pure_model_s(clf, seg, n, summary.counts["segmented"], batch, device, args.compile)

    one = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    single_options = ScanOptions.of(gate=args.gate, workers=0, batch_size=1, device=str(device))
    latencies = []
    for i in range(3):
        t1 = time.perf_counter()
        scan([one], tmp / f"one{i}", classifier=clf, segmenter=seg, options=single_options)
        latencies.append(time.perf_counter() - t1)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    p = summary.plan
    print(
        f"device {device} ({name}); torch {torch.__version__}; {p['workers']} workers; batch {batch}; JPEG decoded "
        f"{'on the device' if p['jpeg_on_device'] else 'in the workers'}"
    )
    print(
        f"classifier densenet121 @{args.classifier_size}, segmenter unet/resnet34 @{args.segmenter_size}; "
        f"{n} images, {summary.counts['segmented']} segmented"
    )
    print(f"end to end   {end_to_end:8.2f} s   {n / end_to_end:8.1f} img/s")
    print(f"model only   {model:8.2f} s   {n / model:8.1f} img/s")
    print(f"overhead     {(end_to_end - model) / model * 100:7.1f} % of model time (target <= 25 % on CPU)")
    print(f"one image    {min(latencies) * 1000:8.0f} ms (best of 3, models loaded, no workers)")
    if args.peer_dataloader:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        loop = dataloader_loop_s(files, clf, seg, batch, args.gate, device)
        print(
            f"plain DataLoader loop {loop:8.2f} s   {len(files) / loop:8.1f} img/s   ours / it: "
            f"{loop / end_to_end:.2f}x (target >= 2x on a GPU)"
        )


if __name__ == "__main__":
    raise SystemExit(main())

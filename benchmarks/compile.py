"""Does ``torch.compile`` make the scan's models faster? Eager against compiled, in one run on one device.

Each model is set up as the scan runs it (``prepare_models``: eval, batch norm folded, channels_last; bf16
autocast on CUDA), untrained, fed random tensors already on the device, under ``torch.inference_mode``. For each
mode: the first call's time (compilation included), then the median of ``--repeat`` timed batches after three
warm-up batches. The answer decides whether a ``--compile`` option earns its keep.

    python benchmarks/compile.py --device cuda
    python benchmarks/compile.py --device cpu --sizes 64 --batch 2 --repeat 3 --modes eager,default
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pneumotriage.models import LoadedModel, ModelSpec, build_model
from pneumotriage.runtime import autocast_for, pick_device
from pneumotriage.scan import prepare_models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _compiled(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "eager":
        return net
    return torch.compile(net, mode=None if mode == "default" else mode)  # type: ignore[return-value]


@torch.inference_mode()
def measure(spec: ModelSpec, batch: int, mode: str, device: torch.device, repeat: int) -> tuple[float, float]:
    """(first call s, median batch s) of ``spec`` run in ``mode``."""
    torch.manual_seed(0)
    net = build_model(spec).eval()
    loaded = LoadedModel(net, spec, dict(net.thresholds), {}, None, "0" * 64, spec.title)
    [prepared] = prepare_models(device, loaded)
    assert prepared is not None
    model = _compiled(prepared.model, mode)
    size = spec.input_size
    inputs = [
        torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]

    def step(i: int = 0) -> None:
        with autocast_for(device):
            model(inputs[i % 2])

    first = _time(step, device)
    for i in range(3):
        step(i)
    times = [_time(lambda i=i: step(i), device) for i in range(repeat)]  # type: ignore[misc]
    return first, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="256,512", help="classifier input sizes")
    parser.add_argument("--segmenter-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--modes", default="eager,default,reduce-overhead")
    args = parser.parse_args()
    device = pick_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    specs = [ModelSpec("classifier", "densenet121", input_size=s) for s in sizes]
    specs.append(ModelSpec("segmenter", "unet", "resnet34", input_size=args.segmenter_size))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); torch {torch.__version__}; batch {args.batch}; {args.repeat} timed batches")
    print(f"{'model':32s} {'mode':16s} {'first call s':>12s} {'ms/batch':>9s} {'img/s':>8s} {'vs eager':>8s}")
    for spec in specs:
        label = f"{spec.title} @{spec.input_size}"
        eager = None
        for mode in modes:
            try:
                first, per_batch = measure(spec, args.batch, mode, device, args.repeat)
            except Exception as exc:  # a mode that does not compile here is a result too
                print(f"{label:32s} {mode:16s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            eager = per_batch if mode == "eager" else eager
            ratio = f"{eager / per_batch:7.2f}x" if eager else "       -"
            print(f"{label:32s} {mode:16s} {first:12.1f} {per_batch * 1000:9.1f} {args.batch / per_batch:8.1f} {ratio}")
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

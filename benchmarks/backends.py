"""The CPU backends side by side: each default architecture at its default size (DenseNet121 @256, UNet/ResNet34
@512; untrained weights, batch norm statistics randomised), each backend, at batch 1 and at the CPU's auto batch,
float32 forced everywhere (many CPUs have no native bf16).

- torch: the network as the scan prepares it (eval, batch norm folded, channels_last), in inference mode;
- onnxruntime / openvino: the graph ``pneumotriage export`` writes, in the session the scan builds;
- int8 (onnxruntime / openvino): that graph quantized as ``pneumotriage quantize`` does it, calibrated on
  synthetic phantoms read as the scan reads them.

Every figure is ms per batch (median of ``--runs``), its speed against torch in the same run, and how far each
graph's probabilities are from torch's on phantom images (max |Δp|; for int8 the mean too). Untrained weights
have no accuracy to lose: ``pneumotriage quantize`` reports AUC and Dice on labelled images.

    python benchmarks/backends.py
    python benchmarks/backends.py --runs 9 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumotriage.deploy import quantize_graph
from pneumotriage.models import LoadedModel, ModelSpec, build_model
from pneumotriage.models.backends import cpu_name
from pneumotriage.models.exported import OnnxNet, export_graph, installed, output_names, runtime_version
from pneumotriage.runtime import cpu_has_bf16, usable_cores
from pneumotriage.scan import cpu_batch, model_inputs, prepare_models
from pneumotriage.synth import write_study

SPECS = [
    ModelSpec("classifier", "densenet121", input_size=256),
    ModelSpec("segmenter", "unet", "resnet34", input_size=512),
]


def _loaded(spec: ModelSpec) -> LoadedModel:
    torch.manual_seed(0)
    net = build_model(spec).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return LoadedModel(net, spec, dict(net.thresholds), {}, None, "0" * 64, spec.title)


def _ms(net: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.inference_mode():
        net(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _probs(net: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = net(torch.from_numpy(inputs[:, None]).contiguous(memory_format=torch.channels_last))
    out = out["mask"] if isinstance(out, dict) else out
    return torch.sigmoid(out.float()).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (the median counts)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="threads (default: usable cores)")
    parser.add_argument("--calibration", type=int, default=8, help="phantoms to calibrate int8 on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runtimes = [r for r in ("onnxruntime", "openvino") if installed(r)]
    print(
        f"{cpu_name()}; {args.threads} threads of {usable_cores()} usable cores; native bf16: {cpu_has_bf16()} "
        f"(not used: float32 forced); torch {torch.__version__}; {', '.join(runtime_version(r) for r in runtimes)}"
    )
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="pneumotriage-backends-") as scratch:
        study = write_study(Path(scratch) / "phantoms", args.calibration, size=(1024, 1024), seed=4, positive_rate=0.5)
        files = sorted(study.out.rglob("*.dcm"))
        for spec in SPECS:
            loaded = _loaded(spec)
            [prepared] = prepare_models(cpu, loaded)
            assert prepared is not None
            inputs = np.stack([x for _, x, _ in model_inputs(files, spec.input_key)])
            graph = export_graph(loaded)
            int8 = quantize_graph(graph, inputs)
            names = output_names(loaded.model, spec.kind)
            nets: dict[str, torch.nn.Module] = {"torch": prepared.model}
            for r in runtimes:
                nets[r] = OnnxNet(graph, spec.kind, names, r, args.threads)
            for r in runtimes:
                nets[f"{r} int8"] = OnnxNet(int8, spec.kind, names, r, args.threads)
            reference = _probs(nets["torch"], inputs)
            batches = sorted({1, cpu_batch(spec.input_size)})
            print(f"\n{spec.title} @{spec.input_size} px")
            for batch in batches:
                x = torch.rand(batch, 1, spec.input_size, spec.input_size).contiguous(memory_format=torch.channels_last)
                base = _ms(nets["torch"], x, args.runs)
                for name, net in nets.items():
                    ms = _ms(net, x, args.runs) if name != "torch" else base
                    gap = np.abs(_probs(net, inputs) - reference)
                    change = f"max |Δp| {gap.max():.1e}" + (f", mean {gap.mean():.1e}" if "int8" in name else "")
                    print(
                        f"  batch {batch:2d}  {name:17s} {ms:8.1f} ms  {ms / batch:7.1f} ms/img  "
                        f"{base / ms:5.2f}x torch   {change}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What runs a model's network on a CPU: torch (the prepared network), ONNX Runtime or OpenVINO (its exported
graph, :mod:`pneumotriage.models.exported`), by ``--backend``.

``auto`` keeps torch on a GPU. On a CPU it times each installed backend on this model at the scan's batch and
threads, once per model, machine and runtime versions, and keeps the fastest; the choice and its figures are
cached (``backends.json`` in the weights cache) so later scans start at once. A model whose network takes under
:data:`SMALL_MS` an image in torch stays there without exporting anything: the runtimes cannot win back the export.
The exported graphs are cached beside the weights too, keyed by the checkpoint's sha256 and the exporter's
version; a graph is used only after its outputs matched torch's within :data:`PARITY` on a random batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes, atomic_write_text
from pneumotriage.models.exported import (
    BF16_HINT,
    BF16_RUNTIMES,
    OPSET,
    RUNTIMES,
    OnnxNet,
    cpuinfo,
    describe,
    export_graph,
    installed,
    output_names,
    require,
    runtime_version,
    spec_outputs,
    with_metadata,
)
from pneumotriage.models.spec import LoadedModel

BACKENDS = ("auto", "torch", *RUNTIMES)
#: Under this many milliseconds an image in torch, ``auto`` keeps torch without measuring the runtimes: a few ms
#: saved an image would take thousands of images to pay for the export (a second or two, once).
SMALL_MS = 10.0
#: Largest difference in probability allowed between an exported graph and torch on the same input.
PARITY = 1e-4
#: Timed runs per backend (after one warm-up), the median kept.
RUNS = 3
#: What a backend's version says when it computes in bf16 (``--precision bf16``).
_BF16_NOTE = " (bf16)"


@dataclass
class BackendChoice:
    """The backend a model runs on, why, and what was measured to choose it (ms a batch)."""

    backend: str
    version: str
    why: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_backend(name: str, device: torch.device, bf16: bool = False) -> None:
    """Raise a UsageError for a backend that is unknown, missing, asked for off the CPU, or asked for bf16 that
    it cannot compute in."""
    if name not in BACKENDS:
        raise UsageError(f"--backend {name!r}: choose {', '.join(BACKENDS)}")
    if name in RUNTIMES:
        require(name)
        if device.type != "cpu":
            raise UsageError(f"--backend {name} runs on the CPU: add --device cpu, or use --backend torch on a GPU")
        if bf16 and name not in BF16_RUNTIMES:
            raise UsageError(
                f"--backend {name} with --precision bf16: {RUNTIMES[name][2]} computes in float32 on a CPU",
                hint=BF16_HINT,
            )


def cpu_name() -> str:
    """This machine's CPU model, as the OS names it."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def graph_for(loaded: LoadedModel, home: Path | None) -> bytes:
    """The exported graph of one model (not an ensemble), from the cache under ``home`` when it was exported
    before by this torch, else exported now (and kept there when ``home`` is given)."""
    source = _graph_source(loaded, home)
    return source.read_bytes() if isinstance(source, Path) else source


def _graph_source(loaded: LoadedModel, home: Path | None) -> bytes | Path:
    """:func:`graph_for`'s graph, as the file in the cache under ``home`` that holds it where there is one (a
    runtime then reads it itself), else as bytes."""
    graph = _graph_of(loaded)
    if graph is not None:
        return graph.graph
    # Only a model read from a file is known by its sha256 (one made in memory may carry any placeholder).
    path = home / "exported" / f"{model_key(loaded)}-opset{OPSET}.onnx" if home and loaded.path else None
    if path is not None and path.is_file():
        return path
    names = output_names(loaded.model, loaded.spec.kind)
    exported = with_metadata(export_graph(loaded), describe(loaded, names))
    if path is None:
        return exported
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, exported)
    return path


def model_key(loaded: LoadedModel) -> str:
    """What identifies a model's network for the caches: its checkpoint's sha256 (an ensemble's: its members'),
    what it is, and the torch that exports it."""
    text = f"{loaded.sha256}|{loaded.spec}|{[m.sha256 for m in loaded.members]}|torch {torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def runtime_net(
    loaded: LoadedModel, runtime: str, threads: int, home: Path | None, precision: str = "fp32"
) -> nn.Module:
    """``loaded``'s network run by ``runtime`` in ``precision`` (an ensemble: each member's graph, averaged as
    before). The same model asked for again (a node scanning batch after batch) gets the network made before,
    session and all."""
    kept = _RUNTIME_NETS.setdefault(loaded, {})
    key = (runtime, threads, str(home), precision)
    if key not in kept:
        kept[key] = _runtime_net(loaded, runtime, threads, home, precision)
    return kept[key]


#: Networks made for a runtime, by the loaded model (forgotten with it).
_RUNTIME_NETS: weakref.WeakKeyDictionary[LoadedModel, dict[tuple[str, int, str, str], nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def _graph_of(loaded: LoadedModel) -> OnnxNet | None:
    """``loaded``'s network where it is an exported graph (read from an ONNX file), else None. A network not
    built yet is a torch network (graphs are never deferred), and is left unbuilt."""
    if not loaded.built:
        return None
    net = loaded.model
    return net if isinstance(net, OnnxNet) else None


def _runtime_net(loaded: LoadedModel, runtime: str, threads: int, home: Path | None, precision: str) -> nn.Module:
    from pneumotriage.models.ensemble import EnsembleNet

    if loaded.members:
        members = [runtime_net(m, runtime, threads, home, precision) for m in loaded.members]
        return EnsembleNet(members, [m.spec.input_size for m in loaded.members], loaded.spec.kind)
    graph = _graph_of(loaded)
    if graph is not None:
        return graph.on(runtime, threads, precision)
    names = spec_outputs(loaded.spec)
    return OnnxNet(_graph_source(loaded, home), loaded.spec.kind, names, runtime, threads, precision)


def probabilities(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sigmoid of a network's output for ``x``: a classifier's ``(B,)``, a segmenter's maps ``(B, 1, S, S)``."""
    with torch.inference_mode():
        out = net(x)
    out = out["mask"] if isinstance(out, dict) else out
    return torch.sigmoid(out.float())


def _time_ms(net: nn.Module, x: torch.Tensor, bf16: bool = False) -> float:
    """A network's median time for ``x``, in ms; with ``bf16`` under bf16 autocast, as the scan runs torch then."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        probabilities(net, x)  # warm-up: a runtime builds its session, torch its kernels' plans
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            probabilities(net, x)
            times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def parity(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> float:
    """The largest difference in probability between two networks' outputs for ``x``."""
    return float((probabilities(reference, x) - probabilities(candidate, x)).abs().max())


def _load_choices(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is measured again
    return data if isinstance(data, dict) else {}


def choose(
    loaded: LoadedModel,
    prepared: nn.Module | LoadedModel,
    backend: str,
    device: torch.device,
    *,
    batch: int,
    threads: int,
    home: Path | None,
    bf16: bool = False,
) -> tuple[nn.Module, BackendChoice]:
    """The network to run ``loaded`` with (``prepared``: its torch network made ready for ``device``, or a
    :class:`LoadedModel` that builds it when first asked) and the choice made. See the module docstring for
    ``auto``. With ``bf16`` (``--precision bf16``; torch runs under bf16 autocast) a runtime computes in bf16 too,
    and ``auto`` weighs only those that can.

    The torch network is built only where torch runs, is measured, or is exported: a choice remembered for this
    model and machine, whose graph was exported before, never builds it."""
    check_backend(backend, device, bf16)
    precision, note = ("bf16", _BF16_NOTE) if bf16 else ("fp32", "")
    if not isinstance(prepared, LoadedModel):
        prepared = loaded.with_model(prepared)
    is_graph = _graph_of(loaded) is not None or any(_graph_of(m) is not None for m in loaded.members)
    if backend == "torch" and is_graph:
        raise UsageError(
            f"{loaded.path or loaded.name}: an ONNX model runs in ONNX Runtime or OpenVINO, not torch",
            hint="--backend auto, onnxruntime or openvino",
        )
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        why = "asked for" if backend == "torch" else f"{device.type}: torch"
        return prepared.model, BackendChoice("torch", f"torch {torch.__version__}{note}", why)
    if backend in RUNTIMES:
        net = runtime_net(loaded, backend, threads, home, precision)
        return net, BackendChoice(backend, f"{runtime_version(backend)}{note}", "asked for")
    # auto on a CPU
    candidates = [r for r in RUNTIMES if installed(r) and (not bf16 or r in BF16_RUNTIMES)]
    if not candidates and is_graph:
        require(BF16_RUNTIMES[0] if bf16 else "onnxruntime")
    versions = [runtime_version(r) for r in candidates]
    key = "|".join([model_key(loaded), cpu_name(), f"threads {threads}", f"batch {batch}", *versions])
    key += "|bf16" if bf16 else ""  # float32's choices keep their keys
    from_files = loaded.path is not None or bool(loaded.members and all(m.path for m in loaded.members))
    if not from_files and not is_graph:
        # Built in memory: no file to key a measurement or an exported graph by, and a choice measured afresh in
        # every process could differ between two scans of the same folder.
        why = "auto: a model not read from a file"
        return prepared.model, BackendChoice("torch", f"torch {torch.__version__}{note}", why)
    cache = home / "backends.json" if home is not None else None
    with _measuring(cache):  # processes started together (torchrun ranks) measure once, and agree
        return _auto(
            loaded, prepared, candidates, is_graph, key, cache, batch=batch, threads=threads, home=home, bf16=bf16
        )


@contextlib.contextmanager
def _measuring(cache: Path | None) -> Iterator[None]:
    """An exclusive lock beside the choices' cache (where the platform has ``flock``) while one is made."""
    if cache is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: each process measures for itself
        yield
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _auto(
    loaded: LoadedModel,
    prepared: LoadedModel,
    candidates: list[str],
    is_graph: bool,
    key: str,
    cache: Path | None,
    *,
    batch: int,
    threads: int,
    home: Path | None,
    bf16: bool,
) -> tuple[nn.Module, BackendChoice]:
    precision = "bf16" if bf16 else "fp32"
    known = _load_choices(cache).get(key)
    if isinstance(known, dict) and known.get("backend") in ("torch", *candidates):
        chosen = BackendChoice(**known)
        chosen.why = f"fastest when measured on this machine before ({chosen.why})"
        return _net_for(chosen.backend, loaded, prepared, threads, home, precision), chosen
    chosen = _measure(loaded, prepared, candidates, is_graph, batch=batch, threads=threads, home=home, bf16=bf16)
    if cache is not None:  # whatever was chosen, small model included: every later process agrees
        saved = _load_choices(cache)
        saved[key] = chosen.as_dict()
        atomic_write_text(cache, json.dumps(saved, indent=1, sort_keys=True))
    return _net_for(chosen.backend, loaded, prepared, threads, home, precision), chosen


def _net_for(
    backend: str, loaded: LoadedModel, prepared: LoadedModel, threads: int, home: Path | None, precision: str
) -> nn.Module:
    return prepared.model if backend == "torch" else runtime_net(loaded, backend, threads, home, precision)


def _measure(
    loaded: LoadedModel,
    prepared: LoadedModel,
    candidates: list[str],
    is_graph: bool,
    *,
    batch: int,
    threads: int,
    home: Path | None,
    bf16: bool = False,
) -> BackendChoice:
    size = loaded.spec.input_size
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    timings: dict[str, float] = {}
    nets: dict[str, nn.Module] = {}
    notes: list[str] = []
    note = _BF16_NOTE if bf16 else ""
    if not is_graph:
        timings["torch"] = _time_ms(prepared.model, x.contiguous(memory_format=torch.channels_last), bf16)
        nets["torch"] = prepared.model
        if not candidates or timings["torch"] < SMALL_MS * batch:
            small = f"under {SMALL_MS:g} ms an image: not worth exporting"
            why = f"no ONNX runtime installed{' that computes in bf16' if bf16 else ''}" if not candidates else small
            return BackendChoice("torch", f"torch {torch.__version__}{note}", f"auto: {why}", timings)
    for runtime in candidates:
        try:
            net = runtime_net(loaded, runtime, threads, home)
        except UsageError as exc:  # a network the exporter cannot write: torch runs it
            timings[f"{runtime} (not exportable: {exc.message})"] = float("nan")
            continue
        if not is_graph:
            # The graph is checked in float32, where it must give torch's answers; bf16 moves them, as it does
            # torch's own under autocast.
            gap = parity(prepared.model, net, x)
            if gap > PARITY:  # never run a graph that does not give torch's answers
                timings[f"{runtime} (refused: differs by {gap:.1e})"] = float("nan")
                continue
        if bf16:
            float32, net = net, runtime_net(loaded, runtime, threads, home, "bf16")
            notes.append(f"{runtime} in bf16 differs from its float32 by up to {parity(float32, net, x):.1e}")
        timings[runtime] = _time_ms(net, x)
        nets[runtime] = net
    refused = [name for name in timings if name not in nets]
    best = min((t, name) for name, t in timings.items() if name in nets)[1]
    figures = ", ".join(f"{name} {t:g} ms" for name, t in timings.items() if name in nets)
    precision = ", bf16" if bf16 else ""
    return BackendChoice(
        best,
        (f"torch {torch.__version__}" if best == "torch" else runtime_version(best)) + note,
        f"auto: fastest at batch {batch}, {threads} threads{precision} ({figures})"
        + "".join(f"; {r}" for r in (*refused, *notes)),
        {k: v for k, v in timings.items() if k in nets},
    )

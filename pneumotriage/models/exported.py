"""A model of the tool as an ONNX graph: written by ``pneumotriage export`` (and ``quantize``), cached beside the
weights for ``--backend onnxruntime|openvino``, and read back as a model like any other.

The graph takes what the network takes, ``(B, 1, S, S)`` float32 made by the model's input pipeline (the batch
dynamic), with the normalisation inside, and gives the network's outputs by name: ``logit`` ``(B,)`` for a
classifier, ``mask`` ``(B, 1, S, S)`` logits (and ``present`` ``(B,)`` where the segmenter has an image-level
head) for a segmenter. Its metadata (``pneumotriage`` in the model's properties, JSON) makes the file
self-describing: what to build it from no longer matters, but its kind, size, input pipeline, operating thresholds,
provenance, the checkpoint it came from (sha256), the parity measured at export and, for an int8 model, its
accuracy before and after quantization, do.

Two runtimes run such a graph on a CPU (:data:`RUNTIMES`): ONNX Runtime (the ``onnx`` extra) and OpenVINO (the
``openvino`` extra). Neither is imported until a graph runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.io import sha256_file
from pneumotriage.models.spec import DEFAULT_THRESHOLDS, LoadedModel, ModelSpec, describe_module
from pneumotriage.version import __version__
from pneumotriage.weights import WeightError

ONNX_FORMAT = "pneumotriage-onnx"
ONNX_FORMAT_VERSION = 1
#: The metadata property holding the file's description.
METADATA_KEY = "pneumotriage"
#: The ONNX operator set written: ONNX Runtime >= 1.12 and OpenVINO >= 2022.1 run it.
OPSET = 17
#: runtime name -> (module, extra that installs it, what it is called).
RUNTIMES = {
    "onnxruntime": ("onnxruntime", "onnx", "ONNX Runtime"),
    "openvino": ("openvino", "openvino", "OpenVINO"),
}
#: The runtimes that compute in bf16 on a CPU (ONNX Runtime's CPU provider has no bf16 convolutions).
BF16_RUNTIMES = ("openvino",)
#: What to do instead when bf16 is asked of a runtime that computes in float32 only.
BF16_HINT = f"--precision fp32, or --backend {' or '.join((*BF16_RUNTIMES, 'torch'))} for bf16"


@functools.cache
def installed(runtime: str) -> bool:
    """Whether ``runtime`` can be imported (asked once a process: a package installed later is seen by the next
    one, as its version would be)."""
    return importlib.util.find_spec(RUNTIMES[runtime][0]) is not None


def require(runtime: str) -> None:
    """Raise a UsageError saying how to install ``runtime`` where it is missing."""
    module, extra, title = RUNTIMES[runtime]
    if not installed(runtime):
        raise UsageError(f"--backend {runtime}: {title} is not installed", hint=f"pip install 'pneumotriage[{extra}]'")


@functools.cache
def runtime_version(runtime: str) -> str:
    """``runtime`` and its installed version, e.g. ``onnxruntime 1.32.0``: read once a process (reading a
    package's metadata took ~2 ms a runtime, at every scan of a node's batches)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{runtime} {version(runtime)}"
    except PackageNotFoundError:
        return f"{runtime} (not installed)"


def output_names(model: nn.Module, kind: str) -> list[str]:
    """The graph's outputs for ``model``: ``logit``, or ``mask`` and (with an image-level head) ``present``."""
    return _outputs(kind, bool(getattr(getattr(model, "spec", None), "empty_head", False)))


def spec_outputs(spec: ModelSpec) -> list[str]:
    """The graph's outputs for a network built from ``spec``, as :func:`output_names` names them, with no
    network at hand."""
    return _outputs(spec.kind, spec.empty_head)


def _outputs(kind: str, empty_head: bool) -> list[str]:
    if kind == "classifier":
        return ["logit"]
    return ["mask", "present"] if empty_head else ["mask"]


class _Outputs(nn.Module):
    """The network with its outputs as a tuple in :func:`output_names` order (ONNX has no dicts)."""

    def __init__(self, net: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out[name] for name in self.names)


def export_graph(loaded: LoadedModel) -> bytes:
    """One model (not an ensemble: its members are exported one by one) as ONNX bytes, float32, batch dynamic.
    Raises UsageError where the exporter cannot express the network."""
    from pneumotriage.models.foreign import ForeignProgram

    if loaded.members:
        raise UsageError("an ensemble is exported member by member (export_members)")
    if isinstance(loaded.model, ForeignProgram | OnnxNet):
        raise UsageError(
            f"{loaded.name or loaded.spec.title} is a program already ({loaded.spec.arch}): it runs in its own "
            "runtime and has no network to export"
        )
    names = output_names(loaded.model, loaded.spec.kind)
    net = _Outputs(loaded.model, names).eval().to("cpu").float()
    size = loaded.spec.input_size
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in ["image", *names]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter (torch's dynamo exporter needs onnxscript, and gains nothing here).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (example,),
                buffer,  # type: ignore[arg-type]  # a file object is accepted as well as a path
                dynamo=False,
                input_names=["image"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
    except ModuleNotFoundError as exc:
        hint = "pip install 'pneumotriage[onnx]'"
        raise UsageError(f"exporting to ONNX needs the {exc.name} package", hint=hint) from None
    except Exception as exc:  # whatever the exporter raises: this network cannot be written as ONNX here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"{loaded.spec.title} could not be exported to ONNX: {first}") from None
    return buffer.getvalue()


def describe(loaded: LoadedModel, names: list[str], **extra: Any) -> dict[str, Any]:
    """The metadata an exported graph carries (see the module docstring)."""
    meta = {k: v for k, v in loaded.meta.items() if k not in ("state_dict", "onnx")}
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "spec": asdict(loaded.spec),
        "thresholds": dict(loaded.thresholds),
        "outputs": names,
        "meta": json.loads(json.dumps(meta, default=str)),
        "source": {
            "name": loaded.name,
            "path": str(loaded.path) if loaded.path else None,
            "sha256": loaded.sha256,
        },
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "opset": OPSET,
        **extra,
    }


def with_metadata(graph: bytes, info: dict[str, Any]) -> bytes:
    """``graph`` with ``info`` as its :data:`METADATA_KEY` property (replacing any before)."""
    import onnx

    proto = onnx.load_from_string(graph)
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info, sort_keys=True)
    proto.producer_name, proto.producer_version = "pneumotriage", __version__
    return bytes(proto.SerializeToString())


def read_metadata(graph: bytes, path: Path | None = None) -> dict[str, Any] | None:
    """The :data:`METADATA_KEY` description of ``graph``, None where it has none (an ONNX file from elsewhere).
    Raises WeightError where the bytes are not an ONNX model."""
    try:
        import onnx

        proto = onnx.load_from_string(graph)
        props = {p.key: p.value for p in proto.metadata_props}
    except ModuleNotFoundError:  # ONNX Runtime reads it too
        props = _metadata_by_runtime(graph)
    except Exception as exc:  # a protobuf parse error of any kind
        raise WeightError(f"not an ONNX model: {str(exc).splitlines()[0][:200]}", path=path) from None
    text = props.get(METADATA_KEY)
    if text is None:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        raise WeightError(f"its {METADATA_KEY} metadata is not JSON", path=path) from None
    if not isinstance(info, dict) or info.get("format") != ONNX_FORMAT:
        return None
    return info


def _metadata_by_runtime(graph: bytes) -> dict[str, str]:
    if not installed("onnxruntime"):
        raise UsageError("reading an exported model's description needs the onnx package", hint="pip install onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


class OnnxNet(nn.Module):
    """An exported graph run by ONNX Runtime or OpenVINO on the CPU, behind the project's model contract: a
    classifier's logit ``(B,)``, a segmenter's ``{"mask": ..., ["present": ...]}``. The session is built on the
    first batch and never copied (a copy builds its own).

    ``precision`` is what the runtime computes in: ``fp32`` (forced: OpenVINO's default on a CPU with native bf16
    is bf16), or ``bf16``, OpenVINO's only (:data:`BF16_RUNTIMES`), asked for with ``--precision bf16``.

    ``graph``: the ONNX bytes, or the file holding them, written once and never changed (the exported graphs'
    cache, named by what they are). From a file the bytes are read only when asked for, and OpenVINO compiles
    through its own cache of compiled models beside it (:data:`OPENVINO_CACHE`): a later process skips parsing
    and compiling the graph (~0.3 s for ResNet50 at 512 px on a 2-core CPU)."""

    def __init__(
        self,
        graph: bytes | Path,
        kind: str,
        names: list[str],
        runtime: str = "onnxruntime",
        threads: int = 0,
        precision: str = "fp32",
    ):
        super().__init__()
        if runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        if precision == "bf16" and runtime not in BF16_RUNTIMES:
            raise UsageError(
                f"{RUNTIMES[runtime][2]} computes in float32 on a CPU",
                hint=BF16_HINT,
            )
        self._graph, self.kind, self.names = graph, kind, list(names)
        self.runtime, self.threads, self.precision = runtime, threads, precision
        self._session: Any = None

    @property
    def graph(self) -> bytes:
        """The ONNX bytes."""
        if isinstance(self._graph, Path):
            return self._graph.read_bytes()
        return self._graph

    def on(self, runtime: str, threads: int, precision: str = "fp32") -> OnnxNet:
        """The same graph for ``runtime`` with ``threads`` (0: the runtime's own choice), in ``precision``."""
        net = OnnxNet(self._graph, self.kind, self.names, runtime, threads, precision)
        for key in ("spec", "thresholds", "meta"):
            if hasattr(self, key):
                setattr(net, key, getattr(self, key))
        return net

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxNet:
        return self.on(self.runtime, self.threads, self.precision)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def _run(self, data: np.ndarray) -> list[np.ndarray]:
        with _signal_stack_kept():
            if self._session is None:
                self._session = _session(self._graph, self.runtime, self.threads, self.precision)
            if self.runtime == "onnxruntime":
                return [np.asarray(a) for a in self._session.run(self.names, {"image": data})]
            result = self._session.infer({0: data})
            return [np.asarray(result[self._session.model_outputs[i]]) for i in range(len(self.names))]

    def forward(self, x: torch.Tensor) -> Any:
        data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        outs = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in self._run(data)]
        if self.kind == "classifier":
            return outs[0].reshape(len(data))
        return dict(zip(self.names, outs, strict=True))


class _AltStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack as it was before a runtime ran. OpenVINO's CPU plugin leaves
    one of its own (11 KB) on the thread that runs it; Python's signal handlers run on that stack, and a signal
    delivered there later (the alarm that times a file's decoding with ``--workers 0``) corrupted the process's
    memory and crashed it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = _AltStack()
        kept = libc.sigaltstack(None, ctypes.byref(before)) == 0
    except (OSError, AttributeError):  # no C library to ask (Windows): no signal stacks either
        kept = False
    try:
        yield
    finally:
        if kept:
            now = _AltStack()
            if libc.sigaltstack(None, ctypes.byref(now)) == 0 and (now.ss_sp, now.ss_flags) != (
                before.ss_sp,
                before.ss_flags,
            ):
                libc.sigaltstack(ctypes.byref(before), None)


class _OpenVinoRequest:
    """One OpenVINO infer request with the compiled model's outputs at hand, and the precision it computes in."""

    def __init__(self, compiled: Any) -> None:
        self.request = compiled.create_infer_request()
        self.model_outputs = list(compiled.outputs)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"

    def infer(self, inputs: dict[int, np.ndarray]) -> Any:
        return self.request.infer(inputs)


#: Where OpenVINO keeps the models it compiled from an exported graph's file, beside that file.
OPENVINO_CACHE = "openvino-compiled"
#: Where ONNX Runtime's optimised graphs of an exported graph's file are kept, beside that file.
ONNXRUNTIME_CACHE = "onnxruntime-optimised"


def cpuinfo() -> dict[str, str]:
    """The fields of Linux's ``/proc/cpuinfo`` (``model name``, ``flags``, ...), each as it first appears; empty
    elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features() -> str | None:
    """The CPU's model name and instruction-set flags as Linux reports them; None where they cannot be read. An
    optimised graph made for one set of flags is never run on another (a VM can hide AVX-512 from a CPU whose
    name says it has it)."""
    fields = cpuinfo()
    flags = fields.get("flags") or fields.get("Features")
    return f"{fields.get('model name', '')}|{flags}" if flags else None


def _onnxruntime_optimised(graph: Path) -> Path | None:
    """Where ONNX Runtime's optimised form of the graph file ``graph`` is kept for this ONNX Runtime and this CPU
    (its layout optimisations are specific to the instruction set), or None where the CPU cannot be told."""
    import onnxruntime as ort

    features = cpu_features()
    if features is None:
        return None
    key = hashlib.sha256(f"{ort.__version__}|{features}".encode()).hexdigest()[:16]
    return graph.parent / ONNXRUNTIME_CACHE / f"{graph.stem}-{key}.onnx"


def _session(graph: bytes | Path, runtime: str, threads: int, precision: str = "fp32") -> Any:
    require(runtime)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The decoding workers share the cores: threads that spin while waiting take time from them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        # A graph file of the cache: ONNX Runtime's optimised form of it is kept beside it, for this ONNX Runtime
        # and CPU. Optimising ResNet50 took ~0.25 s of every scan's start on a 2-core CPU; the optimised form
        # loads in ~0.05 s and gives the same outputs, bit for bit.
        optimised = _onnxruntime_optimised(graph) if isinstance(graph, Path) else None
        if optimised is None:
            return ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, options, providers=providers)
        if optimised.is_file():
            return ort.InferenceSession(str(optimised), options, providers=providers)
        optimised.parent.mkdir(parents=True, exist_ok=True)
        partial = optimised.with_name(f".{optimised.name}.{os.getpid()}.partial")
        options.optimized_model_filepath = str(partial)
        options.log_severity_level = 3  # its warning that the file suits this machine only: it is kept so
        try:
            session = ort.InferenceSession(str(graph), options, providers=providers)
            with contextlib.suppress(OSError):  # a cache that cannot be written: optimised again next time
                os.replace(partial, optimised)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        return session
    import openvino as ov

    core = ov.Core()
    # f32 unless bf16 was asked for: on a CPU with native bf16 OpenVINO's default precision is bf16, which moves
    # probabilities.
    hint = "bf16" if precision == "bf16" else "f32"
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if isinstance(graph, Path):
        # Compiled from the file through OpenVINO's cache, keyed by the file's path, size and time, the
        # configuration and OpenVINO's version: the graphs' files are written once, by rename, and never changed.
        config["CACHE_DIR"] = str(graph.parent / OPENVINO_CACHE)
        return _OpenVinoRequest(core.compile_model(str(graph), "CPU", config))
    return _OpenVinoRequest(core.compile_model(core.read_model(graph), "CPU", config))


def load_onnx(path: Path) -> LoadedModel:
    """A graph written by ``pneumotriage export`` or ``quantize`` as a model (run by ONNX Runtime until a backend
    says otherwise). An ONNX file without the tool's metadata comes through the generic door instead."""
    graph = path.read_bytes()
    info = read_metadata(graph, path)
    if info is None:
        raise WeightError(
            "an ONNX file without pneumotriage's metadata: its input contract is unknown",
            path=path,
            hint="bring it through the generic door: pneumotriage convert FILE --format onnx --kind ... "
            "--input-size ... --pipeline ... --normalisation ...",
        )
    version = info.get("format_version")
    if not isinstance(version, int) or version > ONNX_FORMAT_VERSION:
        raise WeightError(f"ONNX format {version!r} is newer than this pneumotriage reads", path=path)
    try:
        spec = ModelSpec(**info["spec"])
        names = [str(n) for n in info["outputs"]]
    except (KeyError, TypeError, UsageError) as exc:
        raise WeightError(f"its pneumotriage metadata is damaged: {exc}", path=path) from None
    thresholds = {**DEFAULT_THRESHOLDS[spec.kind], **info.get("thresholds", {})}
    meta = dict(info.get("meta") or {})
    meta["onnx"] = {k: v for k, v in info.items() if k not in ("meta", "spec", "thresholds")}
    runtime = "onnxruntime" if installed("onnxruntime") or not installed("openvino") else "openvino"
    net = OnnxNet(graph, spec.kind, names, runtime)
    describe_module(net, spec, thresholds, meta)
    return LoadedModel(net, spec, thresholds, meta, path, sha256_file(path), None)

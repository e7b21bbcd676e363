"""``pneumotriage convert``: a public checkpoint, or a TorchScript/ONNX program through the generic door,
written as a self-describing pneumotriage checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.imports.formats import FORMATS
from pneumotriage.imports.sources import (
    SMP_CONFIG,
    check_smp_config,
    detect,
    fit_problem,
    read_source,
    smp_encoder,
    source_sha256,
    source_state,
)
from pneumotriage.io import sha256_file
from pneumotriage.models import (
    CHECKPOINT_FORMAT,
    DEFAULT_THRESHOLDS,
    ModelSpec,
    build_model,
    describe_module,
    save_checkpoint,
)
from pneumotriage.pipelines import PIPELINES
from pneumotriage.weights import WeightError, error_line


@dataclass(frozen=True)
class Converted:
    """What ``convert`` wrote: the checkpoint, its spec, and what it records of its source."""

    path: Path
    spec: ModelSpec
    imported: dict[str, Any]
    #: A classifier's probability gate; None for a segmenter.
    gate: float | None


def convert(
    source: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    crops: str | None = None,
    gate: float | None = None,
    input_size: int | None = None,
    normalisation: str | None = None,
    pipeline: str | None = None,
    kind: str | None = None,
    output_index: int | None = None,
    activation: str | None = None,
    label: str | None = None,
) -> Converted:
    """Turn a public checkpoint (a file, or an smp ``save_pretrained`` folder) into a pneumotriage checkpoint at
    ``out`` (atomically).

    A classifier's pipeline is its publisher's; ``crops`` chooses other test-time crops (``"centre"``, CheXNet's
    single-crop option) and ``gate`` the probability gate (default the publisher's operating point where one is
    published, else 0.5). A segmenter was trained by whoever saved it: ``input_size`` (default 512),
    ``normalisation`` (default ImageNet's, as smp's encoders are trained) and ``pipeline`` (default ``png8-square``)
    say how; its thresholds are the tool's defaults until ``pneumotriage tune`` chooses them on validation data.
    A TorchScript program or an ONNX graph goes through the generic door (:func:`convert_program`), where ``kind``,
    ``output_index``, ``activation`` and ``label`` complete the contract."""
    path = Path(source)
    if format is not None and format not in FORMATS and format not in GENERIC_FORMATS:
        raise UsageError(f"unknown format {format!r}; valid: {', '.join([*FORMATS, *GENERIC_FORMATS])}")
    runtime = format if format in GENERIC_FORMATS else program_format(path) if format is None else None
    if runtime is not None:
        return convert_program(
            path,
            out,
            runtime=runtime,
            kind=kind,
            input_size=input_size,
            pipeline=pipeline,
            normalisation=normalisation,
            output_index=output_index if output_index is not None else 0,
            activation=activation or "logit",
            label=label or "Pneumothorax",
            gate=gate,
        )
    if any(v is not None for v in (kind, output_index, activation, label)):
        raise UsageError("--kind, --output-index, --outputs and --label are for the generic door (torchscript, onnx)")
    obj = read_source(path)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        raise UsageError("already a pneumotriage checkpoint: scan takes it as it is", path=path)
    name = format or detect(obj)
    if name is None:
        raise UsageError(
            "cannot tell this file's format from its contents",
            path=path,
            hint=f"pass --format, one of {', '.join(FORMATS)}",
        )
    fmt = FORMATS[name]
    state = source_state(obj, fmt, path)
    if fmt.kind == "classifier":
        if input_size is not None or normalisation is not None or pipeline is not None:
            raise UsageError(
                f"{fmt.title}: its input is its publisher's pipeline ({fmt.pipeline} at {fmt.input_size} px); "
                "--input-size, --normalisation and --pipeline are for segmenters trained by others"
            )
        spec = ModelSpec(
            kind="classifier",
            arch=fmt.arch,
            input_size=fmt.input_size,
            normalisation=fmt.normalisation,
            outputs=len(fmt.labels),
            output_index=fmt.output_index,
            pipeline=fmt.pipeline,
            crops=crops or fmt.crops,
            crop_size=fmt.crop_size or (224 if crops and crops != "none" else 0),
        )
        target = build_model(spec)
        loads_into = target.get_submodule("backbone")
    else:
        if crops is not None or gate is not None:
            raise UsageError("--crops and --gate are for classifiers; tune a segmenter's thresholds with `tune`")
        if SMP_CONFIG in obj:
            arch, encoder = check_smp_config(obj[SMP_CONFIG], path)
        else:
            arch, encoder = fmt.arch, smp_encoder(state, fmt.arch, path)
        spec = ModelSpec(
            kind="segmenter",
            arch=arch,
            encoder=encoder,
            input_size=input_size or fmt.input_size,
            normalisation=normalisation or fmt.normalisation,
            pipeline=pipeline or fmt.pipeline,
        )
        target = build_model(spec)
        loads_into = target
    problem = fit_problem(loads_into.state_dict(), state)
    if problem:
        raise WeightError(
            f"its weights do not fit {fmt.title}: {problem}",
            path=path,
            hint=f"check --format (read as {name}; known: {', '.join(FORMATS)})",
        )
    loads_into.load_state_dict(state)
    thresholds = dict(DEFAULT_THRESHOLDS[fmt.kind])
    chosen = float(gate) if gate is not None else fmt.operating_point if fmt.operating_point is not None else 0.5
    if fmt.kind == "classifier":
        thresholds = {"gate": chosen}
    evaluation = fmt.evaluation
    if spec.crops != fmt.crops:
        evaluation += f"; here: {'one centre crop' if spec.crops == 'centre' else spec.crops} instead"
    imported = {
        "format": fmt.name,
        "title": fmt.title,
        "publisher": fmt.publisher,
        "licence": fmt.licence,
        "file": path.name,
        "sha256": source_sha256(path),
        "output_index": fmt.output_index,
        "output_label": fmt.labels[fmt.output_index],
        "outputs": list(fmt.labels),
        "pipeline": spec.pipeline,
        "pipeline_steps": PIPELINES[spec.pipeline],
        "input_size": spec.input_size,
        "normalisation": spec.normalisation,
        "evaluation": evaluation,
        "gate_from": "given" if gate is not None else "publisher" if fmt.operating_point is not None else "default",
        "trained_by": "a third party, on real chest radiographs" if fmt.kind == "classifier" else "a third party",
        "validated_here": False,
    }
    note = (
        f"imported from {fmt.title}; trained by a third party, not validated by pneumotriage: "
        "clinical use is your decision"
    )
    written = save_checkpoint(
        out, target, thresholds=thresholds, extra={"imported": imported, "note": note, "licence": fmt.licence}
    )
    return Converted(written, spec, imported, chosen if fmt.kind == "classifier" else None)


#: The generic door's formats: a program whose input contract the user gives (:mod:`pneumotriage.models.foreign`).
GENERIC_FORMATS = {
    "torchscript": "a TorchScript program (torch.jit.save)",
    "onnx": "an ONNX graph",
}


def program_format(path: Path) -> str | None:
    """``torchscript`` for a TorchScript archive (a zip holding ``code/``), ``onnx`` for a ``.onnx`` file, else
    None (an ONNX file of another name cannot be told from a protobuf of anything else: ``--format onnx``)."""
    import zipfile

    if path.is_dir():
        return None
    if path.suffix.lower() == ".onnx":
        return "onnx"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return "torchscript" if any("/code/" in n or n.startswith("code/") for n in names) else None


def convert_program(
    source: str | Path,
    out: str | Path,
    *,
    runtime: str,
    kind: str | None,
    input_size: int | None,
    pipeline: str | None,
    normalisation: str | None,
    output_index: int = 0,
    activation: str = "logit",
    label: str = "Pneumothorax",
    gate: float | None = None,
) -> Converted:
    """The generic door: a TorchScript program or an ONNX graph, with its input contract given (``kind``,
    ``input_size``, ``pipeline``, ``normalisation``: none can be told from the file), run once on the declared
    input to check its output fits, and kept with its bytes in a pneumotriage checkpoint at ``out``."""
    from pneumotriage.models.foreign import (
        ACTIVATIONS,
        ForeignProgram,
        check_contract,
        outputs_of,
        run_once,
        runtime_version,
    )

    path = Path(source)
    title = GENERIC_FORMATS[runtime]
    missing = [
        flag
        for flag, value in (
            ("--kind", kind),
            ("--input-size", input_size),
            ("--pipeline", pipeline),
            ("--normalisation", normalisation),
        )
        if value is None
    ]
    if missing:
        raise UsageError(
            f"{title} does not say how its input is made: give {', '.join(missing)}",
            path=path,
            hint="e.g. --kind classifier --input-size 224 --pipeline png8 --normalisation imagenet-rgb",
        )
    assert kind is not None and input_size is not None and pipeline is not None and normalisation is not None
    if kind not in ("classifier", "segmenter"):
        raise UsageError(f"--kind {kind!r}: choose classifier or segmenter")
    if activation not in ACTIVATIONS:
        raise UsageError(f"--outputs {activation!r}: choose {' or '.join(ACTIVATIONS)}")
    if gate is not None and kind != "classifier":
        raise UsageError("--gate is for classifiers; tune a segmenter's thresholds with `tune`")
    if gate is not None and not (math.isfinite(gate) and 0.0 <= gate <= 1.0):
        raise UsageError(f"--gate {gate!r}: give a probability from 0 to 1")
    try:
        program = path.read_bytes()
    except FileNotFoundError:
        raise WeightError("no such file", path=path) from None
    except OSError as exc:
        raise WeightError(f"cannot be read ({error_line(exc)})", path=path) from None
    spec_fields = {"kind": kind, "arch": runtime, "input_size": input_size, "normalisation": normalisation}
    spec_fields |= {"pipeline": pipeline, "output_index": output_index, "activation": activation}
    try:
        model = ForeignProgram(
            runtime,
            kind,
            normalisation=normalisation,
            output_index=output_index,
            activation=activation,
            program=program,
        )
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    try:
        raw, given = run_once(model, input_size)
    except ValueError as exc:
        raise UsageError(
            f"{title} {exc}".replace(" it does not run", " does not run", 1),
            path=path,
            hint="check --input-size and --normalisation (one channel or three)",
        ) from None
    spec = ModelSpec(outputs=outputs_of(model, raw), **spec_fields)  # type: ignore[arg-type]
    try:
        checked = check_contract(model, raw, input_size, given)
    except ValueError as exc:
        raise UsageError(f"{title} does not keep the contract given: {exc}", path=path) from None
    describe_module(model, spec)
    labels = [label if i == output_index else f"output {i}" for i in range(spec.outputs)]
    chosen = float(gate) if gate is not None else 0.5
    thresholds = {"gate": chosen} if kind == "classifier" else dict(DEFAULT_THRESHOLDS["segmenter"])
    imported = {
        "format": runtime,
        "title": f"{title}, its input contract given at convert",
        "publisher": "unknown to pneumotriage (given by whoever brought the file)",
        "licence": "unknown: that of whoever made the file; ask them",
        "file": path.name,
        "sha256": sha256_file(path),
        "output_index": output_index,
        "output_label": label,
        "outputs": labels,
        "output_activation": activation,
        "pipeline": pipeline,
        "pipeline_steps": PIPELINES[pipeline],
        "input_size": input_size,
        "normalisation": normalisation,
        "evaluation": f"one {input_size} px view, as given; checked at convert: {checked}",
        "runtime": runtime_version(runtime),
        "gate_from": "given" if gate is not None else "default",
        "trained_by": "a third party (unknown to pneumotriage)",
        "validated_here": False,
    }
    note = (
        f"imported as {title} with a contract given at convert; trained by a third party, not validated by "
        "pneumotriage: clinical use is your decision"
    )
    written = save_checkpoint(out, model, thresholds=thresholds, extra={"imported": imported, "note": note})
    return Converted(written, spec, imported, chosen if kind == "classifier" else None)

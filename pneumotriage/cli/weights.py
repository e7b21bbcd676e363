"""`pneumotriage weights`: the registry and the local cache (list, fetch, verify, import, path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from pneumotriage.cli.console import (
    err,
    out,
    plain_table,
    print_table,
    reports_errors,
    shown,
)
from pneumotriage.cli.help import PlainCommand
from pneumotriage.cli.options import (
    PrecisionOpt,
)
from pneumotriage.errors import ExitCode, PneumotriageError, UsageError

if TYPE_CHECKING:
    from pneumotriage.weights import WeightCache, WeightSpec

weights_app = typer.Typer(
    help="The weights registry (weights.toml) and the local cache: list, fetch, verify, import, path.",
    no_args_is_help=True,
)

_STATUS_STYLE = {"verified": "green", "cached": "yellow", "missing": "dim", "corrupt": "bold red"}


def _cache() -> WeightCache:
    from pneumotriage.weights import WeightCache, load_registry

    return WeightCache(load_registry())


def _specs(cache: WeightCache, names: list[str] | None) -> list[WeightSpec]:
    return [cache.registry.get_spec(n) for n in names] if names else list(cache.registry.values())


@weights_app.command("list", cls=PlainCommand)
@reports_errors
def weights_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout instead of a table.")] = False,
    rehash: Annotated[bool, typer.Option("--verify", help="Re-hash cached files (slow for big files).")] = False,
) -> None:
    """Every weight in the registry with its cache status: verified, cached (not yet checked), missing, corrupt."""
    cache = _cache()
    rows: list[dict[str, Any]] = []  # as JSON shows them
    for spec in cache.registry.values():
        st = cache.status(spec, rehash=rehash)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "arch": spec.arch,
                "encoder": spec.encoder,
                "input_size": spec.input_size,
                "url": spec.url,
                "sha256": spec.sha256,
                "sha256_prefix": spec.sha256_prefix,
                "pinned": spec.pinned,
                "observed_sha256": st.sha256,
                "status": st.status,
                "path": str(st.path),
                "size_mb": spec.size_mb,
                "licence": spec.licence,
                "clinical": spec.clinical,
                "recipe": spec.recipe,
                "bundled": spec.bundled,
                "built_here": st.sha256 is not None and st.sha256 == cache.built_here(spec),
                "description": spec.description,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    # whole paths, never folded at the table's width: a user copies them
    out.print(f"registry: {escape(str(cache.registry.path))}", highlight=False, soft_wrap=True)
    out.print(f"cache:    {escape(str(cache.dir))}", highlight=False, soft_wrap=True)
    table = plain_table()
    table.add_column("name", no_wrap=True)
    for col in ("kind", "model", "size", "sha256", "status"):
        # Whole words ("classifier", never "classifi" over "er"); the model folds at its spaces.
        table.add_column(col, no_wrap=col != "model", min_width=13 if col == "model" else None)
    for row in rows:
        model = row["arch"] + (f" / {row['encoder']}" if row["encoder"] else "") + f" @{row['input_size']}"
        if row["built_here"]:
            sha = "built here"
        elif row["sha256"]:
            sha = row["sha256"][:8] + "…"
        else:
            sha = (row["sha256_prefix"] or "unpinned")[:8] + "…"
        size = f"{row['size_mb']:.0f} MB" if row["size_mb"] else "?"
        style = _STATUS_STYLE[row["status"]]
        table.add_row(row["name"], row["kind"], model, size, sha, f"[{style}]{row['status']}[/]")
    print_table(table)


@weights_app.command("fetch", cls=PlainCommand)
@reports_errors
def weights_fetch(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Registry names (see `weights list`).")],
    mirror: Annotated[
        str | None,
        typer.Option(envvar="PNEUMOTRIAGE_MIRROR", help="Base URL that replaces the publisher's: MIRROR/<file>."),
    ] = None,
    offline: Annotated[
        bool, typer.Option(envvar="PNEUMOTRIAGE_OFFLINE", help="Forbid the network (use `weights import`).")
    ] = False,
    allow_unpinned: Annotated[
        bool, typer.Option(help="Accept a weight with no published hash; record the hash seen.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Download again even if a verified copy is cached.")] = False,
    rebuild: Annotated[
        bool,
        typer.Option(help="Train the demo weights here from their recipe, and compare them with the shipped files."),
    ] = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Download weights into the cache, verifying each file's sha256 before it is kept. Bundled weights (the
    demo's) are copied from the package."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    cache = _cache()
    specs = _specs(cache, names)
    if rebuild:
        _rebuild(cache, specs, precision)
        return
    for spec in specs:
        with Progress(
            "{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task(spec.name, total=None)

            def report(done: int, total: int | None, task: Any = task, progress: Any = progress) -> None:
                progress.update(task, completed=done, total=total)

            path, digest = cache.fetch(
                spec, mirror=mirror, offline=offline, allow_unpinned=allow_unpinned, force=force, progress=report
            )
        note = "" if spec.pinned else " (unpinned: this hash is now recorded and checked from here on)"
        err.print(f"[green]ok[/] {spec.name}: sha256 {digest}{note}", highlight=False)
        out.print(str(path), highlight=False, soft_wrap=True)


def _rebuild(cache: WeightCache, specs: list[WeightSpec], precision: str) -> None:
    """``weights fetch --rebuild``: build the demo weights from their recipe, then say how each compares with the
    shipped file, bytes and validation figures."""
    from rich.progress import Progress

    from pneumotriage.demo import NAMES, against_shipped, build_all

    no_recipe = [spec.name for spec in specs if not spec.recipe]
    if no_recipe:
        raise UsageError(f"--rebuild: {', '.join(no_recipe)} has no build recipe (only the demo weights have one)")
    err.print(
        f"building {' and '.join(NAMES)} together from the recipe in pneumotriage/demo.py "
        "(the segmenter's thresholds are tuned with the classifier)",
        highlight=False,
    )
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"training {NAMES[-1]}", total=None)

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "epoch_start":
                bar.update(task, total=event["epochs"], completed=event["epoch"])

        built = build_all(cache, progress=on_event, precision=precision)
    for name, (path, digest) in zip(NAMES, built, strict=True):
        compare = against_shipped(cache.registry.get_spec(name), path, digest)
        err.print(f"[green]built[/] {name}: sha256 {digest}: {compare}", highlight=False)
        out.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("verify", cls=PlainCommand)
@reports_errors
def weights_verify(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="[NAME...]", help="Registry names; default every cached weight.")
    ] = None,
) -> None:
    """Re-hash cached weights. Exit 1 if any named weight is missing or any cached file does not match."""
    cache = _cache()
    failed = 0
    for spec in _specs(cache, names):
        st = cache.status(spec, rehash=True)
        if st.status == "missing" and not names:
            continue
        if st.status == "verified":
            err.print(f"[green]verified[/] {spec.name}: {st.sha256}", highlight=False)
            continue
        failed += 1
        try:
            cache.verify(spec)
        except PneumotriageError as exc:
            err.print(f"[bold red]error:[/] {st.status}: {shown(exc)}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(ExitCode.ERROR)


@weights_app.command("import", cls=PlainCommand)
@reports_errors
def weights_import(
    name: Annotated[str, typer.Argument(help="Registry name.")],
    file: Annotated[Path, typer.Argument(help="The file, copied by hand (USB, internal share).")],
    allow_unpinned: Annotated[
        bool, typer.Option(help="Accept a weight whose publisher gives no hash, and record this file's hash.")
    ] = False,
) -> None:
    """Side-load a weight file into the cache after checking its sha256."""
    cache = _cache()
    path, digest = cache.import_file(cache.registry.get_spec(name), file, allow_unpinned=allow_unpinned)
    err.print(f"[green]ok[/] {name}: sha256 {digest}", highlight=False)
    out.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("path", cls=PlainCommand)
@reports_errors
def weights_path(name: Annotated[str, typer.Argument(help="Registry name.")]) -> None:
    """Print the cached file of a weight (exit 3 with the commands that get it if it is missing)."""
    cache = _cache()
    out.print(str(cache.require(cache.registry.get_spec(name))), highlight=False, soft_wrap=True)


#: The formats `convert` knows (pneumotriage.imports.FORMATS; named here so that --help imports no torch).
CONVERT_FORMATS = (
    "xrv-densenet121",
    "xrv-resnet50",
    "chexnet",
    "chexnet-jrzech",
    "chexnet-keras",
    "smp-unet",
    "smp-unet-2019",
    "smp-unetplusplus",
    "smp-pretrained",
)
#: The generic door's formats (pneumotriage.imports.GENERIC_FORMATS): their input contract comes from the options.
GENERIC_FORMATS = ("torchscript", "onnx")


@reports_errors
def convert(
    file: Annotated[
        Path, typer.Argument(help="A public checkpoint (TorchXRayVision, CheXNet, CheXNet-Keras, smp...).")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="The pneumotriage checkpoint to write.")],
    source_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="The file's format where it cannot be told from the file: "
            + ", ".join(CONVERT_FORMATS + GENERIC_FORMATS),
        ),
    ] = None,
    crops: Annotated[
        str | None,
        typer.Option(help="Test-time crops other than the publisher's: centre (one crop) or ten (TenCrop)."),
    ] = None,
    gate: Annotated[
        float | None,
        typer.Option(help="A classifier's probability gate; default the publisher's operating point, else 0.5."),
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(help="The input side it was trained at: a segmenter's (default 512), or a program's (needed)."),
    ] = None,
    normalisation: Annotated[
        str | None,
        typer.Option(
            help="Its input scaling: imagenet-rgb (smp's default), unit-rgb (three channels in [0, 1]); for a program "
            "also unit, imagenet, xrv (one channel)."
        ),
    ] = None,
    pipeline: Annotated[
        str | None,
        typer.Option(
            help="How its input is made: png8-square (a segmenter's default), png8, png8-skimage, xrv or pneumotriage."
        ),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="A program's kind: classifier (a logit per image) or segmenter (a map).")
    ] = None,
    output_index: Annotated[
        int | None, typer.Option(help="A program's output (or map channel) that is the finding (default 0).")
    ] = None,
    activation: Annotated[
        str | None,
        typer.Option(
            "--outputs", help="What a program's outputs are: logit (default) or probability (sigmoid inside)."
        ),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="The finding a program's chosen output is (default Pneumothorax).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was recorded as JSON on stdout.")] = False,
) -> None:
    """Turn a model brought from elsewhere into a pneumotriage checkpoint that scan, submit, evaluate and tune
    take: its weights, the output used, its publisher's input pipeline and where it came from. Nothing in a
    checkpoint file runs; a TorchScript program or ONNX graph (the generic door) is a program: its input contract
    comes from --kind, --input-size, --pipeline and --normalisation. The model is not validated by pneumotriage."""
    from pneumotriage.imports import convert as convert_file

    if crops is not None and crops not in ("none", "centre", "ten"):
        raise UsageError(f"--crops {crops!r}: choose none, centre or ten")
    done = convert_file(
        file,
        out_path,
        format=source_format,
        crops=crops,
        gate=gate,
        input_size=input_size,
        normalisation=normalisation,
        pipeline=pipeline,
        kind=kind,
        output_index=output_index,
        activation=activation,
        label=label,
    )
    if as_json:
        print(json.dumps({"checkpoint": str(done.path), "gate": done.gate, **done.imported}, indent=2))
        return
    info = done.imported
    lines = [
        f"[green]converted[/] {escape(info['title'])}",
        f"  source:   {escape(info['file'])} (sha256 {info['sha256']}); {escape(info['publisher'])}",
        f"  licence:  {escape(info['licence'])}",
        f"  output:   {escape(info['output_label'])} (output {info['output_index']} of {len(info['outputs'])}"
        + (", a probability: its sigmoid is inside)" if info.get("output_activation") == "probability" else ")"),
        f"  input:    {info['input_size']} px, {info['normalisation']}",
        f"  pipeline: {info['pipeline']}: {escape(info['pipeline_steps'])}",
        f"  views:    {escape(info['evaluation'])}",
        f"  gate:     {done.gate:g} ({info['gate_from']})"
        if done.gate is not None
        else "  thresholds: the tool's defaults; choose them on your validation data with `pneumotriage tune`",
        f"  [yellow]trained by {escape(info['trained_by'])}; not validated by pneumotriage: clinical use is your "
        "decision[/]",
    ]
    for line in lines:
        err.print(line, highlight=False, soft_wrap=True)
    out.print(escape(str(done.path)), highlight=False, soft_wrap=True)

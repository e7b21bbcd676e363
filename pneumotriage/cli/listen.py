"""``pneumotriage listen``: the DICOM node a hospital runs beside its PACS."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from pneumotriage.cli.console import err, reports_errors, shown
from pneumotriage.cli.options import (
    AcceptOpt,
    BackendOpt,
    ClassifierOpt,
    Device,
    PrecisionOpt,
    SegmenterOpt,
    Tta,
    default_list,
    scan_options,
)
from pneumotriage.errors import UsageError


@reports_errors
def listen(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the inbox, the studies and the worklist.")] = Path(
        "listen-out"
    ),
    ae_title: Annotated[str, typer.Option(help="This node's AE title.")] = "PNEUMOTRIAGE",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DICOM port to listen on (0: any free one).")] = 11112,
    allow: Annotated[list[str] | None, typer.Option(help="Calling AE title allowed to send (repeat); default any.")] = (
        None
    ),
    allow_host: Annotated[
        list[str] | None, typer.Option(help="Peer IP address allowed to send (repeat); default any.")
    ] = None,
    max_associations: Annotated[int, typer.Option(help="Simultaneous associations at most.")] = 10,
    min_free_mb: Annotated[
        int, typer.Option("--min-free-mb", help="Refuse associations while free disk space is under this.")
    ] = 1024,
    idle: Annotated[float, typer.Option(help="Seconds without a new image after which a study is complete.")] = 5.0,
    kos: Annotated[
        bool, typer.Option("--kos", help="Also send a Key Object Selection marking each study's urgent images.")
    ] = False,
    max_wait: Annotated[
        float | None, typer.Option(help="Minutes after which a waiting study moves up within its tier.")
    ] = None,
    send_to: Annotated[
        str | None, typer.Option(metavar="AE@HOST:PORT", help="Send each study's SR and SEG there by C-STORE.")
    ] = None,
    stow: Annotated[
        str | None, typer.Option(metavar="URL", help="Store each study's SR and SEG on this DICOMweb server.")
    ] = None,
    classifier: ClassifierOpt = None,
    segmenter: SegmenterOpt = None,
    tta: Tta = False,
    device: Device = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    accept: AcceptOpt = None,
) -> None:
    """Receive studies by DICOM C-STORE, triage each once it is complete, and send the results back.

    Every image is on disk before it is acknowledged; a restart triages what was received and sends what was not
    acknowledged. README "At the PACS" shows a configuration and a systemd unit."""
    from pneumotriage.listen import Destination, Listener, ListenOptions, NodeOptions, StowDestination
    from pneumotriage.listen.node import require
    from pneumotriage.models import load_models

    require()
    if not idle >= 0:
        raise UsageError(f"--idle {idle:g}: give 0 or more seconds")
    if min_free_mb < 0:
        raise UsageError(f"--min-free-mb {min_free_mb}: give 0 or more")
    node = NodeOptions(
        ae_title=ae_title,
        host=host,
        port=port,
        allow=tuple(allow or ()),
        allow_hosts=tuple(allow_host or ()),
        max_associations=max_associations,
        min_free=min_free_mb << 20,
    )
    node.check()
    if send_to and stow:
        raise UsageError("give --send-to or --stow, not both")
    destination = Destination.parse(send_to) if send_to else StowDestination.parse(stow) if stow else None
    if max_wait is not None and not max_wait > 0:
        raise UsageError(f"--max-wait {max_wait:g}: give minutes above 0")
    options = ListenOptions(
        idle_s=idle, send_to=destination, kos=kos, max_wait_s=None if max_wait is None else max_wait * 60
    )
    loaded_cls = load_models(default_list(classifier, "classifier"), "classifier")
    loaded_seg = load_models(default_list(segmenter, "segmenter"), "segmenter")
    if loaded_cls is None and loaded_seg is None:
        raise UsageError("give --classifier and/or --segmenter (registry names or checkpoint files)")
    scan = scan_options(
        "auto", "auto", tta=tta, device=device, precision=precision, backend=backend, accept=tuple(accept or ())
    )

    def log(line: str) -> None:
        err.print(shown(line), highlight=False, soft_wrap=True)

    listener = Listener(
        out_dir, classifier=loaded_cls, segmenter=loaded_seg, scan_options=scan, node=node, options=options, log=log
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    where = f" results to {options.send_to}" if options.send_to else " results kept under --out"
    err.print(
        f"listening as {shown(ae_title)} on {shown(host)}:{listener.node.port};{where}; the worklist in "
        f"{shown(out_dir)} (Ctrl-C stops)",
        highlight=False,
        soft_wrap=True,
    )
    try:
        listener.serve(stop)
    finally:
        listener.close()
    err.print("stopped: every image received is in the inbox; a restart goes on from there", highlight=False)

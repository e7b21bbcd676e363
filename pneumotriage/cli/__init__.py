"""The command-line layer: argument parsing, console output and exit codes. All work happens in the library.

One module per command group (data, scan, weights, train, evaluate), the options they share (options), console
output (console) and progress bars (progress). This module builds the app from them.

Exit codes: 0 all went well; 1 an error stopped the command; 2 usage error; 3 weights missing;
4 some inputs could not be used (the rest were processed).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import Annotated, Any

import typer
from rich.markup import escape

from pneumotriage.cli import data, deploy, evaluate, listen, scan, train, weights
from pneumotriage.cli.console import err, out
from pneumotriage.cli.help import PlainCommand
from pneumotriage.errors import ExitCode
from pneumotriage.io import printable
from pneumotriage.version import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="pneumotriage",
    help="Triage chest radiographs for pneumothorax from folders of DICOMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"pneumotriage {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Triage chest radiographs for pneumothorax from folders of DICOMs."""


app.command(cls=PlainCommand)(data.inspect)
app.command(cls=PlainCommand)(data.synth)
app.command(cls=PlainCommand)(scan.scan)
app.command(cls=PlainCommand)(scan.merge)
app.command(cls=PlainCommand)(scan.submit)
app.command(cls=PlainCommand)(listen.listen)
app.add_typer(weights.weights_app, name="weights")
app.command(cls=PlainCommand)(weights.convert)
app.add_typer(train.train_app, name="train")
app.command(cls=PlainCommand)(evaluate.evaluate)
app.command(cls=PlainCommand)(evaluate.tune)
app.command(cls=PlainCommand)(deploy.export)
app.command(cls=PlainCommand)(deploy.quantize)
app.command(cls=PlainCommand)(data.demo)


#: The command-line parser's own error type (click's, which typer may vendor): a bad or missing option.
_ParserError: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The console script: every error, the parser's included, is one line starting "error:". The process ends
    when its command has (see :func:`_end`)."""
    try:
        _main()
    except SystemExit as exc:
        _end(exc.code)
        raise


def _main() -> None:
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe that cannot show a character (PYTHONIOENCODING=ascii, a C locale) gets it escaped,
        # never a UnicodeEncodeError in the middle of a worklist.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        code = app(standalone_mode=False)
    except _ParserError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a command group called bare: its help is the answer
            exc.show()
            raise SystemExit(exc.exit_code) from None
        ctx = getattr(exc, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = escape(printable(exc.format_message().rstrip(".")))
        if message.strip():  # a command group called bare has shown its help already: nothing to add
            err.print(f"[bold red]error:[/] {message}{see}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("[yellow]interrupted[/]")
        raise SystemExit(ExitCode.INTERRUPTED) from None
    finally:
        # Everything alive now lives until the process ends: the interpreter's last collection need not walk it.
        # With torch imported that walk took ~0.4 s of a 2-core CPU at every exit, a scan's included.
        gc.freeze()
    raise SystemExit(code if isinstance(code, int) else 0)


def _end(code: object) -> None:
    """End the process now with ``code`` (a SystemExit's), as the interpreter would but without its teardown.

    As at any exit, threads still running are waited for (an idle thread pool's workers are told to stop: OpenVINO
    starts one at its import), the at-exit handlers run and the output is flushed. What is skipped is freeing
    every object and library one by one (torch unregistering its operators: ~0.16 s of a 2-core CPU after a scan);
    the command's files are all written and closed by then. With ``python -i``, or a Python without the
    threading module's shutdown step, the process ends the usual way."""
    threads_done = getattr(threading, "_shutdown", None)  # what the interpreter's exit runs first
    if sys.flags.inspect or threads_done is None:
        return
    if code is None or isinstance(code, int):
        status = code or 0
    else:  # SystemExit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        status = 1
    threads_done()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    main()

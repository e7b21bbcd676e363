"""``--help`` as it reads at 80 columns: click's own layout (every option name whole on its line, descriptions
wrapped by the formatter at the terminal's width, paragraphs reflowed) with plain metavars (``PATH``, ``FLOAT``,
``INT``, ``TEXT``) instead of Python type names, and a usage line in click's form (``PATH...``, ``[DATA]``).

Every command registers with ``cls=PlainCommand``; the app turns Typer's rich panels off (``rich_markup_mode=None``),
whose fixed columns squeezed descriptions to a few words and cut long option names. Parameters are told apart by
click's public attributes (``param_type_name``, ``type.name``), not its classes: Typer may vendor click.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import typer.core

__all__ = ["PlainCommand"]


_PLAIN = {
    "path": "PATH",
    "file": "FILE",
    "float": "FLOAT",
    "integer": "INT",
    "float range": "FLOAT",
    "integer range": "INT",
}


def plain_metavar(param: Any) -> str:
    """What a value of ``param`` (a click parameter) is called in help: its choices, or PATH, FLOAT, INT, TEXT.
    Typer describes a parameter's Python type (``type_descriptor``, Typer 0.2x) or gives it a click type."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:
        kind = param.type
        choices = getattr(kind, "choices", None)
        if choices:
            return "[" + "|".join(str(c) for c in choices) + "]"
        return _PLAIN.get(getattr(kind, "name", ""), "TEXT")
    if getattr(desc, "is_choice", False) and desc.choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    if getattr(desc, "is_path", False) or getattr(desc, "is_file", False):
        return "PATH"
    annotation = desc.annotation
    while typing.get_origin(annotation) in (list, tuple) or typing.get_args(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
        if not args:
            break
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "PATH"
    return "FLOAT" if annotation is float else "INT" if annotation is int else "TEXT"


def _is(param: Any, kind: str) -> bool:
    return getattr(param, "param_type_name", None) == kind


def _argument_name(param: Any) -> str:
    """An argument as the usage line and the Arguments section show it: its metavar as given (``[DATA]``,
    ``NAME...``), else its name in capitals, in brackets when optional, with ``...`` when it repeats."""
    if param.metavar:
        return str(param.metavar)
    name = (param.name or "arg").upper()
    if not param.required:
        name = f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


class PlainCommand(typer.core.TyperCommand):
    """A Typer command whose help reads as click writes it, with plain metavars (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            option: Any = param
            if _is(option, "option") and not option.is_flag and not option.count and option.metavar is None:
                option.metavar = plain_metavar(option)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_name(p) for p in self.get_params(ctx) if _is(p, "argument")]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments = []
        for param in self.get_params(ctx):
            if _is(param, "argument") and not getattr(param, "hidden", False):
                extra = "  [required]" if param.required else ""
                arguments.append((_argument_name(param), (getattr(param, "help", None) or "") + extra))
        options = [record for p in self.get_params(ctx) if _is(p, "option") if (record := p.get_help_record(ctx))]
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)

"""The registry (``weights.toml``): each weight's source, hash and what the network behind it is; and the
errors a weight can raise.
"""

from __future__ import annotations

import importlib.resources
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pneumotriage.errors import ExitCode, PneumotriageError, UsageError
from pneumotriage.normalisations import known, names
from pneumotriage.pipelines import NATIVE, PIPELINES

KINDS = ("backbone", "classifier", "segmenter")
Status = Literal["missing", "cached", "verified", "corrupt"]
ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes received so far, total bytes or None) while a download runs."""


# --------------------------------------------------------------------------------------------------------------
# errors


class WeightError(PneumotriageError):
    """A weight could not be fetched, verified, imported or loaded."""


class WeightMissingError(WeightError):
    """The weight is not in the cache: the message gives the exact commands that get it."""

    exit_code = ExitCode.NO_WEIGHT


class WeightHashError(WeightError):
    """A file's sha256 is not the one the registry (or the first fetch) recorded."""


class WeightFetchError(WeightError):
    """The download failed: server down, truncated transfer, offline mode. The weight cannot be had: exit 3, as
    for a missing one."""

    exit_code = ExitCode.NO_WEIGHT


class UnsafeWeightsError(WeightError):
    """The file holds pickled objects that weights-only loading refuses (it could run code)."""


# --------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class WeightSpec:
    """One table of ``weights.toml``."""

    name: str
    kind: str
    arch: str
    url: str
    file: str
    input_size: int
    normalisation: str
    encoder: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    hash_note: str | None = None
    size_mb: float | None = None
    licence: str = ""
    source: str = ""
    description: str = ""
    outputs: int | None = None
    output_index: int | None = None
    output_label: str | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    clinical: bool = True
    default: bool = False
    recipe: str | None = None
    bundled: bool = False
    pipeline: str = NATIVE

    @property
    def pinned(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix)

    @property
    def expected_hash(self) -> str:
        """The hash as the registry states it, for messages: full, ``prefix…``, or ``unpinned``."""
        if self.sha256:
            return self.sha256
        if self.sha256_prefix:
            return f"{self.sha256_prefix}…"
        return "unpinned"


_REQUIRED = ("kind", "arch", "url", "file", "input_size", "normalisation")
_FIELDS = frozenset(WeightSpec.__dataclass_fields__) - {"name"}


def default_registry_path() -> Path:
    """``$PNEUMOTRIAGE_REGISTRY``; else the copy of ``weights.toml`` that the wheel build puts inside the package
    (an installed tool); else the ``weights.toml`` at the top of the source tree (a checkout, an editable install).

    The repository keeps one file, at its top; only a built wheel holds the packaged copy, so a checkout can never
    read a stale one."""
    env = os.environ.get("PNEUMOTRIAGE_REGISTRY")
    if env:
        return Path(env)
    packaged = importlib.resources.files("pneumotriage").joinpath("weights.toml")
    if isinstance(packaged, Path) and packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "weights.toml"


def _spec_from(name: str, table: Mapping[str, Any], path: Path) -> WeightSpec:
    def bad(what: str) -> WeightError:
        return WeightError(f"entry [{name}] {what}", path=path, hint="fix weights.toml")

    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise bad(f"has unknown fields {', '.join(unknown)}; valid: {', '.join(sorted(_FIELDS))}")
    if table["kind"] not in KINDS:
        raise bad(f"has kind {table['kind']!r}; valid: {', '.join(KINDS)}")
    if not known(table["normalisation"]):
        raise bad(f"has normalisation {table['normalisation']!r}; valid: {', '.join(names())}")
    if table.get("pipeline", NATIVE) not in PIPELINES:
        raise bad(f"has pipeline {table['pipeline']!r}; valid: {', '.join(PIPELINES)}")
    for key, length in (("sha256", 64), ("sha256_prefix", None)):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or any(c not in "0123456789abcdef" for c in value):
            raise bad(f"has a {key} that is not lower-case hex")
        if length and len(value) != length:
            raise bad(f"has a {key} of {len(value)} digits, not {length}")
    if not table["url"] and not table.get("recipe") and not table.get("bundled"):
        raise bad("has no url, no build recipe and no bundled file")
    if table.get("bundled") and len(table.get("sha256") or "") != 64:
        raise bad("is bundled but has no full sha256 to check its file against")
    if "/" in table["file"] or table["file"] in ("", ".", ".."):
        raise bad(f"has a file name with a path in it: {table['file']!r}")
    thresholds = {str(k): float(v) for k, v in dict(table.get("thresholds", {})).items()}
    return WeightSpec(name=name, **{**table, "thresholds": thresholds})


class Registry(dict[str, WeightSpec]):
    """Weight specs by name, read from one ``weights.toml``."""

    def __init__(self, specs: Mapping[str, WeightSpec], path: Path) -> None:
        super().__init__(specs)
        self.path = path

    def default_for(self, kind: str) -> str | None:
        """The registry's default model of a kind (``default = true`` and meant for patients), if any."""
        return next((s.name for s in self.values() if s.kind == kind and s.default and s.clinical), None)

    def get_spec(self, name: str) -> WeightSpec:
        try:
            return self[name]
        except KeyError:
            raise UsageError(
                f"no weight named {name!r} in the registry; valid names: {', '.join(self) or '(none)'}",
                path=self.path,
            ) from None


def load_registry(path: str | Path | None = None) -> Registry:
    path = Path(path) if path is not None else default_registry_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightError("weights registry not found", path=path, hint="set PNEUMOTRIAGE_REGISTRY") from None
    except tomllib.TOMLDecodeError as exc:
        raise WeightError(f"weights registry is not valid TOML: {exc}", path=path) from None
    specs = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise WeightError(f"top-level key {name!r} is not a table", path=path, hint="fix weights.toml")
        specs[name] = _spec_from(name, table, path)
    return Registry(specs, path)

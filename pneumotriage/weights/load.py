"""Resolving what the user names (a registry name or a file) and loading a weight file safely
(``torch.load(..., weights_only=True)``: a weight file cannot run code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.weights.cache import WeightCache
from pneumotriage.weights.registry import Registry, UnsafeWeightsError, WeightError, WeightSpec, load_registry

# --------------------------------------------------------------------------------------------------------------
# resolving and loading


def looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin"))


def resolve(
    name_or_path: str | Path, *, registry: Registry | None = None, home: str | Path | None = None
) -> tuple[Path, WeightSpec | None]:
    """A ``--classifier`` / ``--segmenter`` value: an existing file, or a registry name whose cached file is verified.

    Returns the file and, for a registry name, its spec. A name not in the cache raises
    :class:`WeightMissingError` (exit code 3) with the commands that get it.
    """
    path, spec, _ = resolve_verified(name_or_path, registry=registry, home=home)
    return path, spec


def resolve_verified(
    name_or_path: str | Path, *, registry: Registry | None = None, home: str | Path | None = None
) -> tuple[Path, WeightSpec | None, str | None]:
    """:func:`resolve`, with the sha256 the cache checked a registry weight's file against (from its stamp while the
    file's size and time are the stamp's, so not hashed again); None for a file given by path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if isinstance(name_or_path, Path) or candidate.is_file() or looks_like_path(text):
        if not candidate.is_file():
            raise UsageError("no such weight file", path=candidate, hint="give a file path or a registry name")
        return candidate, None, None
    registry = registry if registry is not None else load_registry()
    spec = registry.get_spec(text)
    path, digest = WeightCache(registry, home).require_verified(spec)
    return path, spec, digest


#: What torch.load raises on a file that is not a checkpoint at all (a text file, a truncated or damaged one): the
#: pickle machinery fails wherever the bytes lead it.
READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError)


def error_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name where it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_state_dict(path: str | Path, *, mapped: bool = False) -> dict[str, Any]:
    """Load a weight file with ``weights_only=True``; a file with pickled code in it is refused, not run.

    ``mapped``: its tensors are mapped from the file, read only when used (``torch.load(mmap=True)``, where the
    file's format allows it): for a network that may never be built (a scan that runs its kept exported graph
    reads none of its weights: ~0.05 s of ResNet50's 94 MB)."""
    import pickle

    import torch

    path = Path(path)
    if mapped:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 (an older format, or a damaged file: read whole below, which says which)
            pass
        else:
            if isinstance(obj, dict):
                return obj
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightError("weight file not found", path=path) from None
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else "")
        raise UnsafeWeightsError(
            f"refused to load: the file holds pickled objects that weights-only loading does not allow: {first}",
            path=path,
            hint="use a plain state dict; never load files of unknown origin with weights_only=False",
        ) from None
    except READ_ERRORS as exc:
        raise WeightError(f"not a readable weight file: {error_line(exc)}", path=path) from None
    if not isinstance(obj, dict):
        raise WeightError(f"holds a {type(obj).__name__}, not a state dict or checkpoint", path=path)
    return obj

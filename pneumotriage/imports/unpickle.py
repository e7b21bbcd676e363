"""Whole-module pickles read without running code from the file: torch's weights-only unpickler with each
class the formats contain mapped onto an inert stand-in (:class:`StandIn`); any other global is refused.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from pneumotriage.imports.formats import PICKLED_CLASSES
from pneumotriage.weights import READ_ERRORS, UnsafeWeightsError, WeightError, error_line


class StandIn:
    """An inert object in place of a pickled module: it keeps the attributes the pickle gives it and nothing
    else (no ``forward``, no hooks, no code of the file's classes)."""

    pickled_as = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from copyreg
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors, named as ``nn.Module.state_dict`` names them (non-persistent buffers left out)."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.__dict__.get("_non_persistent_buffers_set") or ())
        for group in ("_parameters", "_buffers"):
            for name, value in (self.__dict__.get(group) or {}).items():
                if isinstance(value, torch.Tensor) and name not in skip:
                    out[prefix + name] = value.detach()
        for name, child in (self.__dict__.get("_modules") or {}).items():
            if isinstance(child, StandIn):
                out.update(child.state_dict(f"{prefix}{name}."))
        return out


def _stand_ins() -> list[tuple[type, str]]:
    made = []
    for path in PICKLED_CLASSES:
        cls = type(path.rsplit(".", 1)[1], (StandIn,), {"pickled_as": path})
        made.append((cls, path))
    return made


#: Callables a legacy whole-module pickle may name besides its classes: torch's tensor and parameter rebuilders
#: and the containers of a module's state (storages are resolved by torch before this list is asked).
_LEGACY_CALLABLES = {
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "collections.OrderedDict",
    "builtins.set",
    "torch.Size",
}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that admits the known formats' classes as stand-ins and a few torch rebuilders, and
    refuses every other global before it is looked up (so nothing of it is imported, let alone called)."""

    _classes = {path: cls for cls, path in _stand_ins()}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 writes Python 2's name for the builtins module
        path = f"{'builtins' if module == '__builtin__' else module}.{name}"
        if path in self._classes:
            return self._classes[path]
        if path in _LEGACY_CALLABLES:
            return super().find_class(*path.rsplit(".", 1))
        raise _Refused(f"GLOBAL {path}")


class _RestrictedPickle:
    """What ``torch.load(pickle_module=...)`` uses: this module's unpickler for the legacy format's records."""

    __name__ = "pneumotriage.imports.restricted"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _pickle_problem(exc: Exception) -> str:
    """The line of torch's weights-only error that says what was wrong (it wraps it in paragraphs of advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    found = next((ln for ln in lines if "error:" in ln.lower() or "load key" in ln), lines[0] if lines else "")
    return found.split("error:", 1)[-1].strip() or type(exc).__name__


def _refused(path: Path, message: str) -> UnsafeWeightsError:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    what = f"names {found.group(1)}" if found else "holds objects"
    return UnsafeWeightsError(
        f"refused: its pickle {what}, which no checkpoint of the known formats contains; nothing from it ran",
        path=path,
        hint="convert only files from their publishers; --format lists the known ones",
    )


def load_restricted(path: Path) -> Any:
    """A checkpoint file read without running code from it: torch's weights-only unpickler, with the known
    formats' module classes as :class:`StandIn` objects; a whole model pickled in torch's legacy format (its
    classes recorded as sources, which the weights-only reader does not take) by :class:`_RestrictedUnpickler`.
    A file naming any other global is refused with :class:`~pneumotriage.weights.UnsafeWeightsError`."""
    try:
        try:
            with torch.serialization.safe_globals(_stand_ins()):  # type: ignore[arg-type]
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "GLOBAL" in str(exc):
                raise _refused(path, str(exc)) from None
            if "persistent_load" not in str(exc):
                raise WeightError(f"not a readable PyTorch checkpoint ({_pickle_problem(exc)})", path=path) from None
        with warnings.catch_warnings():
            # torch warns when a pickled class's recorded source differs from the class it loads (a stand-in)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except _Refused as exc:
        raise _refused(path, str(exc)) from None
    except FileNotFoundError:
        raise WeightError("no such file", path=path) from None
    except IsADirectoryError:
        raise WeightError("is a folder, not a checkpoint file", path=path) from None
    except (pickle.UnpicklingError, *READ_ERRORS) as exc:
        raise WeightError(f"not a readable PyTorch checkpoint ({error_line(exc)})", path=path) from None

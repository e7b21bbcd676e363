"""Ensembles: several classifiers (or several segmenters) run as one model, their probabilities averaged.

The SIIM-ACR winners averaged a model per fold. Here an ensemble is an ordinary :class:`LoadedModel` whose network
(:class:`EnsembleNet`) runs each member and averages its probabilities at one size, so the scan, ``submit``,
``evaluate`` and ``tune`` take it wherever they take a model:

- from the command line, by repeating ``--classifier`` or ``--segmenter`` (the thresholds are then the first
  member's), or
- from an **ensemble file** (JSON, written by ``tune`` for an ensemble, or by hand) that lists its members by
  registry name or by path (relative to the file) with each one's sha256, and the thresholds to run them at::

      {"format": "pneumotriage-ensemble", "format_version": 1, "kind": "segmenter",
       "members": [{"path": "fold0/best.pt", "sha256": "..."}, {"path": "fold1/best.pt", "sha256": "..."}],
       "thresholds": {"top_score": 0.75, "min_area": 2000, "bottom_score": 0.3, "min_component": 0}}

Members may have different input sizes: the ensemble takes the largest, and each member gets the batch resized to
its own size (antialiased bilinear); a segmenter member's map is resized back to the largest size before
averaging. Classifier probabilities and segmenter maps are averaged as probabilities (the network returns the
logit of the mean, so whatever applies a sigmoid downstream gets the mean back).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes
from pneumotriage.models.spec import Deferred, LoadedModel, describe_module
from pneumotriage.pipelines import NATIVE
from pneumotriage.weights import WeightError

ENSEMBLE_FORMAT = "pneumotriage-ensemble"
ENSEMBLE_VERSION = 1
#: Probabilities are kept this far from 0 and 1 before their logit is taken (a logit of 1 is infinite).
_EPS = 1e-6


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class EnsembleNet(nn.Module):
    """Members of one kind run on the same batch (at each one's ``sizes`` entry), probabilities averaged."""

    def __init__(self, members: Sequence[nn.Module], sizes: Sequence[int], kind: str) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sizes = list(sizes)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        size = x.shape[-1]
        if self.kind == "classifier":
            probs = [torch.sigmoid(m(_resized(x, s)).float()) for m, s in zip(self.members, self.sizes, strict=True)]
            return _logit(torch.stack(probs).mean(0))
        maps, present = [], []
        for m, s in zip(self.members, self.sizes, strict=True):
            out = m(_resized(x, s))
            maps.append(_resized(torch.sigmoid(out["mask"].float()), size))
            if "present" in out:
                present.append(torch.sigmoid(out["present"].float()))
        result = {"mask": _logit(torch.stack(maps).mean(0))}
        if len(present) == len(maps):  # an image-level head only where every member has one
            result["present"] = _logit(torch.stack(present).mean(0))
        return result


def member_info(m: Any) -> dict[str, Any]:
    """What identifies one member in the outputs: its name (registry name or file), architecture, sha256."""
    return {
        "name": m.name or (str(m.path) if m.path else None),
        "model": m.spec.title,
        "input_size": m.spec.input_size,
        "sha256": m.sha256,
        "clinical": bool(m.meta.get("clinical", True)),
    }


def _short(m: LoadedModel) -> str:
    """A member's name in a worklist row: its registry name, or its file with the folder it is in."""
    if m.name:
        return str(m.name)
    if m.path is not None:
        return "/".join(Path(m.path).parts[-2:])
    return m.spec.title


def ensemble_of(
    members: Sequence[LoadedModel], *, thresholds: dict[str, float] | None = None, name: str | None = None
) -> LoadedModel:
    """One :class:`~pneumotriage.models.LoadedModel` running ``members`` (LoadedModels of one kind) together; a
    single member is returned as it is. Thresholds: ``thresholds``, else the first member's."""

    if len(members) == 1 and thresholds is None:
        return members[0]
    if not members:
        raise UsageError("an ensemble needs at least one member")
    kinds = {m.spec.kind for m in members}
    if len(kinds) > 1:
        raise UsageError(f"an ensemble mixes {' and '.join(sorted(kinds))}s: give models of one kind")
    inputs = {(m.spec.pipeline, m.spec.input_size) for m in members}
    if len({p for p, _ in inputs}) > 1 or (len(inputs) > 1 and any(p != NATIVE for p, _ in inputs)):
        seen = ", ".join(f"{p} at {s} px" for p, s in sorted(inputs))
        raise UsageError(
            f"an ensemble's members see different inputs ({seen}): an imported model's input is its publisher's "
            "pipeline at its own size, which a resize of another member's would not be; ensemble it only with "
            "models of the same pipeline and size"
        )
    first = members[0]
    size = max(m.spec.input_size for m in members)
    info = [member_info(m) for m in members]
    digest = hashlib.sha256("\n".join(str(m.sha256) for m in members).encode()).hexdigest()
    notes = sorted({str(m.meta["note"]) for m in members if m.meta.get("note")})
    meta = {
        "members": info,
        "clinical": all(i["clinical"] for i in info),
        "note": "; ".join(notes) if notes else None,
        "synthetic_share": max(float(m.meta.get("synthetic_share", 0.0) or 0.0) for m in members),
    }
    chosen = dict(thresholds) if thresholds is not None else dict(first.thresholds)
    titles = sorted({m.spec.title for m in members})
    spec = replace(first.spec, input_size=size)
    label = name or f"ensemble of {len(members)} ({', '.join(_short(m) for m in members)})"
    if len(titles) > 1:
        meta["architectures"] = titles

    def build() -> nn.Module:
        net = EnsembleNet([m.model for m in members], [m.spec.input_size for m in members], first.spec.kind)
        describe_module(net, thresholds=chosen, meta=meta)
        return net

    # built when its members are; members whose networks wait (a scan run by exported graphs) keep it waiting
    network = build() if all(m.built for m in members) else Deferred(build)
    return LoadedModel(network, spec, chosen, meta, None, digest, label, list(members))


def is_ensemble_file(path: Path) -> bool:
    """Whether ``path`` is an ensemble file (JSON naming the ensemble format)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.lstrip()[:1] == b"{" and ENSEMBLE_FORMAT.encode() in head


#: The ensemble files being loaded, outermost first: an ensemble that includes itself, or nests deeper than
#: :data:`MAX_NESTING`, is refused in one line (one nesting 100,000 deep ended in a RecursionError).
_LOADING: list[str] = []
MAX_NESTING = 8


def load_ensemble(path: Path, load_member: Callable[[str], LoadedModel]) -> LoadedModel:
    """The ensemble an ensemble file describes; each member is loaded with ``load_member(name_or_path)`` and its
    sha256 checked against the file's."""
    real = os.path.realpath(path)
    if real in _LOADING:
        chain = " -> ".join(Path(p).name for p in [*_LOADING[_LOADING.index(real) :], real])
        raise WeightError(f"an ensemble that includes itself ({chain})", path=path, hint="fix its members")
    if len(_LOADING) >= MAX_NESTING:
        raise WeightError(f"ensembles nested over {MAX_NESTING} deep", path=path, hint="list the models themselves")
    _LOADING.append(real)
    try:
        return _load_ensemble(path, load_member)
    finally:
        _LOADING.pop()


def _load_ensemble(path: Path, load_member: Callable[[str], LoadedModel]) -> LoadedModel:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightError(f"an unreadable ensemble file ({exc})", path=path) from None
    bad = "a damaged ensemble file"
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT:
        raise WeightError(f"{bad}: no 'format': '{ENSEMBLE_FORMAT}'", path=path)
    version = doc.get("format_version")
    if not isinstance(version, int) or version > ENSEMBLE_VERSION:
        raise WeightError(f"ensemble format {version!r} is not one this pneumotriage reads", path=path)
    entries = doc.get("members")
    if not isinstance(entries, list) or not entries:
        raise WeightError(f"{bad}: it lists no members", path=path)
    members = []
    for entry in entries:
        if not isinstance(entry, dict) or not (entry.get("path") or entry.get("name")):
            raise WeightError(f"{bad}: a member without a path or name: {entry!r}", path=path)
        where = str(path.parent / entry["path"]) if entry.get("path") else str(entry["name"])
        member = load_member(where)
        want = entry.get("sha256")
        if want and member.sha256 != want:
            raise WeightError(
                f"member {where} has sha256 {(member.sha256 or 'none')[:12]}..., "
                f"the ensemble file expects {str(want)[:12]}...",
                path=path,
                hint="the member changed since the ensemble was made: rebuild it (`pneumotriage tune`) or fix the file",
            )
        members.append(member)
    thresholds = doc.get("thresholds")
    if thresholds is not None and not isinstance(thresholds, dict):
        raise WeightError(f"{bad}: its thresholds are not a table of names and values", path=path)
    kind = doc.get("kind")
    loaded = ensemble_of(members, thresholds=thresholds or dict(members[0].thresholds), name=path.name)
    if kind is not None and kind != loaded.spec.kind:
        raise WeightError(f"{bad}: it says kind {kind!r} but its members are {loaded.spec.kind}s", path=path)
    if isinstance(doc.get("tuning"), dict):
        # How the thresholds were chosen; the scan takes a tuned gate only with the classifier it was tuned with.
        loaded.meta["tuning"] = doc["tuning"]
    if doc.get("clinical") is False:
        loaded.meta["clinical"] = False
    loaded.path = path
    return loaded


def write_ensemble(path: Path, members: Sequence[LoadedModel], thresholds: dict[str, float], **extra: Any) -> Path:
    """Write an ensemble file naming ``members`` (by path relative to ``path``'s folder where they are files, else
    by registry name) with their sha256 and ``thresholds``; atomically."""
    path = Path(path)
    entries = []
    for m in members:
        if m.path is not None and m.name is None:
            try:  # relative to the file, so that a run folder can be moved whole
                where = Path(os.path.relpath(Path(m.path).resolve(), path.parent.resolve())).as_posix()
            except ValueError:  # another drive
                where = str(Path(m.path).resolve())
            entries.append({"path": where, "sha256": m.sha256})
        else:
            entries.append({"name": m.name, "sha256": m.sha256})
    doc = {
        "format": ENSEMBLE_FORMAT,
        "format_version": ENSEMBLE_VERSION,
        "kind": members[0].spec.kind,
        "members": entries,
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path

"""The weights registry (``weights.toml``) and the local cache: fetch, verify, import, resolve, load safely.

Where a weight comes from, in this order: a file path given by the user → the verified cache → the URL (only when
asked to fetch, never implicitly). A download goes to a temporary file beside its destination, is hashed as it
arrives, and is renamed into place only when its length and hash are right; anything else deletes it.

Bundled weights (``bundled = true``, the synthetic demo's) ship inside the package, in ``pneumotriage/bundled/``:
fetching one copies it into the cache after checking its pinned sha256, so it needs neither the network nor
training. A weight with a build ``recipe`` can instead be rebuilt on this machine (``weights fetch --rebuild``, which
the CLI runs through :mod:`pneumotriage.demo`); training is seeded but not bit-identical across machines, so the
hash of a rebuilt file is recorded in the cache as *built here* and accepted beside the pinned one.

Hashes: ``sha256`` is checked in full; ``sha256_prefix`` (torchvision publishes only 8 hex digits) is checked as a
prefix; an entry with neither is *unpinned*: it is fetched or imported only with ``allow_unpinned=True``, and the
hash seen then is recorded in the cache (``observed.json``) and checked from then on (trust on first use).

Loading always goes through :func:`load_state_dict`, which uses ``torch.load(..., weights_only=True)``: a weight
file cannot run code.

Why one module of ~600 lines: the registry, the cache and the download share the hash rules (pinned, prefix,
unpinned, bundled, built here), which must be read together to be trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.resources
import json
import os
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pneumotriage.errors import ExitCode, PneumotriageError, UsageError
from pneumotriage.io import atomic_write_text, sha256_file
from pneumotriage.normalisations import known, names
from pneumotriage.pipelines import NATIVE, PIPELINES

KINDS = ("backbone", "classifier", "segmenter")
Status = Literal["missing", "cached", "verified", "corrupt"]
ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes received so far, total bytes or None) while a download runs."""

_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


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
    return Path(__file__).resolve().parent.parent / "weights.toml"


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


# --------------------------------------------------------------------------------------------------------------
# the cache


def bundled_path(spec: WeightSpec) -> Path:
    """Where a bundled weight's file lies in the installed package."""
    return Path(__file__).resolve().parent / "bundled" / spec.file


def default_home() -> Path:
    """``$PNEUMOTRIAGE_HOME``, else the platform's user cache folder for pneumotriage."""
    env = os.environ.get("PNEUMOTRIAGE_HOME")
    if env:
        home = Path(env).expanduser()
        for folder in (home, *home.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise UsageError(
                        f"PNEUMOTRIAGE_HOME is {home}, but {folder} is a file",
                        hint="point PNEUMOTRIAGE_HOME at a folder (or unset it)",
                    )
                break
        return home
    import platformdirs

    return Path(platformdirs.user_cache_dir("pneumotriage", appauthor=False))


def offline_from_env() -> bool:
    return os.environ.get("PNEUMOTRIAGE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def mirror_from_env() -> str | None:
    return os.environ.get("PNEUMOTRIAGE_MIRROR") or None


@dataclass(frozen=True)
class CachedStatus:
    name: str
    path: Path
    status: Status
    sha256: str | None = None


class WeightCache:
    """The folder ``HOME/weights`` with the files, a ``.verified`` stamp per file, and ``observed.json``.

    A stamp records the size, modification time and sha256 of a file that passed its check, so listing the cache
    is cheap and still notices a file changed since; ``verify`` always re-hashes.
    """

    def __init__(self, registry: Registry, home: str | Path | None = None) -> None:
        self.registry = registry
        self.home = Path(home) if home is not None else default_home()
        self.dir = self.home / "weights"

    # paths and records

    def path(self, spec: WeightSpec) -> Path:
        return self.dir / spec.file

    def _stamp_path(self, spec: WeightSpec) -> Path:
        return self.dir / f".{spec.file}.verified"

    def _observed_path(self) -> Path:
        return self.dir / "observed.json"

    def observed(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._observed_path().read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _record_observed(self, spec: WeightSpec, digest: str, *, built: bool = False) -> None:
        data = self.observed()
        data[spec.name] = {"sha256": digest, "url": spec.url, "recorded": datetime.now(UTC).isoformat()}
        if built:
            data[spec.name]["origin"] = "built here from its recipe"
        atomic_write_text(self._observed_path(), json.dumps(data, indent=2, sort_keys=True) + "\n")

    def forget_observed(self, spec: WeightSpec) -> None:
        """Drop the hash recorded for an unpinned weight (before it is deliberately rebuilt or replaced)."""
        data = self.observed()
        if data.pop(spec.name, None) is not None:
            atomic_write_text(self._observed_path(), json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _write_stamp(self, spec: WeightSpec, digest: str) -> None:
        st = self.path(spec).stat()
        stamp = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        atomic_write_text(self._stamp_path(spec), json.dumps(stamp) + "\n")

    def _stamp_matches(self, spec: WeightSpec) -> str | None:
        try:
            stamp = json.loads(self._stamp_path(spec).read_text(encoding="utf-8"))
            st = self.path(spec).stat()
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns:
            digest = stamp.get("sha256")
            if isinstance(digest, str) and self.hash_ok(spec, digest):
                return digest
        return None

    def built_here(self, spec: WeightSpec) -> str | None:
        """The sha256 of this weight as last rebuilt on this machine from its recipe, if it was."""
        seen = self.observed().get(spec.name, {})
        return seen.get("sha256") if spec.recipe and seen.get("origin") else None

    def hash_ok(self, spec: WeightSpec, digest: str) -> bool:
        """Whether ``digest`` is what the registry, or for an unpinned weight the first fetch, recorded (or, for a
        weight with a recipe, what its last rebuild here gave)."""
        if digest == self.built_here(spec):
            return True
        if spec.sha256:
            return digest == spec.sha256
        if spec.sha256_prefix:
            return digest.startswith(spec.sha256_prefix)
        seen = self.observed().get(spec.name, {}).get("sha256")
        return seen is not None and digest == seen

    def _expected_for_message(self, spec: WeightSpec) -> str:
        if spec.pinned:
            return spec.expected_hash
        seen = self.observed().get(spec.name, {}).get("sha256")
        return f"{seen} (recorded at first fetch; unpinned)" if seen else "unpinned"

    # status

    def status(self, spec: WeightSpec, *, rehash: bool = False) -> CachedStatus:
        path = self.path(spec)
        if not path.is_file():
            return CachedStatus(spec.name, path, "missing")
        if not rehash:
            digest = self._stamp_matches(spec)
            return CachedStatus(spec.name, path, "verified" if digest else "cached", digest)
        digest = sha256_file(path)
        if self.hash_ok(spec, digest):
            self._write_stamp(spec, digest)
            return CachedStatus(spec.name, path, "verified", digest)
        return CachedStatus(spec.name, path, "corrupt", digest)

    def verify(self, spec: WeightSpec) -> CachedStatus:
        """Re-hash the cached file; raise if it is missing or does not match."""
        result = self.status(spec, rehash=True)
        if result.status == "missing":
            raise self.missing_error(spec)
        if result.status == "corrupt":
            raise WeightHashError(
                f"weight {spec.name!r} does not match: expected sha256 {self._expected_for_message(spec)}, "
                f"got {result.sha256}",
                path=result.path,
                hint=f"delete it and run `pneumotriage weights fetch {spec.name}`",
            )
        return result

    def missing_error(self, spec: WeightSpec) -> WeightMissingError:
        if spec.bundled:
            return WeightMissingError(
                f"weight {spec.name!r} is not in the cache (cache path {self.path(spec)}): run "
                f"`pneumotriage weights fetch {spec.name}`, which copies it from the package"
            )
        if spec.recipe:
            return WeightMissingError(
                f"weight {spec.name!r} is not in the cache (cache path {self.path(spec)}): run "
                f"`pneumotriage weights fetch {spec.name} --rebuild`, which builds it on this machine from its recipe"
            )
        unpinned = "" if spec.pinned else " --allow-unpinned"
        return WeightMissingError(
            f"weight {spec.name!r} is not in the cache (expected sha256 {self._expected_for_message(spec)}, "
            f"cache path {self.path(spec)}): run `pneumotriage weights fetch {spec.name}{unpinned}`, or copy the "
            f"file here by hand and run `pneumotriage weights import {spec.name} FILE{unpinned}`"
        )

    def require(self, spec: WeightSpec) -> Path:
        """The cached file of a weight that passed its check (hashing it once if it has no valid stamp)."""
        if not self.path(spec).is_file():
            raise self.missing_error(spec)
        if self._stamp_matches(spec) is None:
            if spec.bundled and self.status(spec, rehash=True).status == "corrupt":
                # An earlier release's copy of a bundled weight (or a damaged one): the package's own file is the
                # one pinned now, and it is checked against its sha256 on the way in.
                return self.import_file(spec, bundled_path(spec))[0]
            self.verify(spec)
        return self.path(spec)

    # getting files in

    def _accept(
        self, spec: WeightSpec, tmp: Path, digest: str, *, allow_unpinned: bool, origin: str, built: bool = False
    ) -> Path:
        """Move a complete, hashed temporary file into the cache if its hash is right; else delete it. A file
        ``built`` from the weight's recipe is accepted whatever its hash, which is recorded as built here."""
        if built:
            pass
        elif spec.pinned:
            if not self.hash_ok(spec, digest):
                tmp.unlink(missing_ok=True)
                raise WeightHashError(
                    f"{origin} for weight {spec.name!r} has the wrong sha256: expected {spec.expected_hash}, "
                    f"got {digest}; nothing was kept",
                    hint="check the mirror or the file; a wrong hash means a different or damaged file",
                )
        else:
            seen = self.observed().get(spec.name, {}).get("sha256")
            if seen and digest != seen:
                tmp.unlink(missing_ok=True)
                raise WeightHashError(
                    f"{origin} for unpinned weight {spec.name!r} differs from the one recorded at its first fetch: "
                    f"expected {seen}, got {digest}; nothing was kept",
                    hint=f"if the publisher changed it on purpose, delete {self._observed_path()} and fetch again",
                )
            if not seen and not allow_unpinned:
                tmp.unlink(missing_ok=True)
                raise WeightHashError(
                    f"weight {spec.name!r} is unpinned (its publisher gives no hash); got sha256 {digest}; "
                    "nothing was kept",
                    hint="repeat with --allow-unpinned to trust this file and record its hash",
                )
        final = self.path(spec)
        os.replace(tmp, final)
        if built or not spec.pinned:
            self._record_observed(spec, digest, built=built)
        elif self.built_here(spec):
            self.forget_observed(spec)  # the pinned file replaces an earlier rebuild
        self._write_stamp(spec, digest)
        return final

    @contextlib.contextmanager
    def _temp_file(self, spec: WeightSpec) -> Iterator[tuple[Path, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{spec.file}.", suffix=".part", dir=self.dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield tmp, fh
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def fetch(
        self,
        spec: WeightSpec,
        *,
        mirror: str | None = None,
        offline: bool = False,
        allow_unpinned: bool = False,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> tuple[Path, str]:
        """Download a weight into the cache; returns (path, sha256). A verified cached file is kept unless ``force``."""
        if not force:
            current = self.status(spec)
            if current.status == "verified" and current.sha256:
                return current.path, current.sha256
        if spec.bundled:
            return self.import_file(spec, bundled_path(spec))
        if not spec.url:
            raise UsageError(
                f"weight {spec.name!r} has no download; it is built on this machine from its recipe",
                hint=f"run `pneumotriage weights fetch {spec.name} --rebuild`",
            )
        url = mirror_url(spec, mirror) if mirror else spec.url
        if offline:
            raise WeightFetchError(
                f"offline mode: not downloading weight {spec.name!r} from {url}",
                hint=f"copy the file here by hand and run `pneumotriage weights import {spec.name} FILE`, "
                + ("or unset PNEUMOTRIAGE_OFFLINE" if offline_from_env() else "or run it without --offline"),
            )
        if not spec.pinned and not allow_unpinned and spec.name not in self.observed():
            raise WeightHashError(
                f"weight {spec.name!r} is unpinned: its publisher gives no hash to check it against",
                hint=f"run `pneumotriage weights fetch {spec.name} --allow-unpinned` to trust the first download "
                "and record its sha256",
            )
        with self._temp_file(spec) as (tmp, fh):
            digest, received, total = _download(url, fh, progress)
        if total is not None and received != total:
            tmp.unlink(missing_ok=True)
            raise WeightFetchError(
                f"download of weight {spec.name!r} from {url} was truncated: got {received} of {total} bytes; "
                "nothing was kept",
                hint="try again, or use --mirror",
            )
        return self._accept(spec, tmp, digest, allow_unpinned=allow_unpinned, origin=f"download from {url}"), digest

    def import_file(
        self, spec: WeightSpec, source: str | Path, *, allow_unpinned: bool = False, built: bool = False
    ) -> tuple[Path, str]:
        """Copy a file obtained by hand (USB, internal share) into the cache after checking its hash; one ``built``
        from the weight's recipe on this machine is kept whatever its hash (see :meth:`_accept`)."""
        source = Path(source)
        if not source.is_file():
            raise UsageError("no such file to import", path=source)
        digest = hashlib.sha256()
        with self._temp_file(spec) as (tmp, fh), open(source, "rb") as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return self._accept(
            spec, tmp, digest.hexdigest(), allow_unpinned=allow_unpinned, origin=f"file {source}", built=built
        ), digest.hexdigest()


def mirror_url(spec: WeightSpec, mirror: str) -> str:
    """A mirror holds the files under their cached names: ``MIRROR/<file>``."""
    return f"{mirror.rstrip('/')}/{spec.file}"


def _download(url: str, fh: Any, progress: ProgressCallback | None) -> tuple[str, int, int | None]:
    """Stream ``url`` into ``fh``, hashing as it goes; returns (sha256, bytes received, Content-Length)."""
    digest = hashlib.sha256()
    received = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "pneumotriage"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress:
                progress(0, total)
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset connection
                    raise WeightFetchError(
                        f"download from {url} broke off after {received} bytes ({type(exc).__name__}); "
                        "nothing was kept",
                        hint="try again, or use --mirror",
                    ) from None
                if not chunk:
                    break
                digest.update(chunk)
                fh.write(chunk)
                received += len(chunk)
                if progress:
                    progress(received, total)
            fh.flush()
            os.fsync(fh.fileno())
    except urllib.error.HTTPError as exc:
        raise WeightFetchError(
            f"download from {url} failed: HTTP {exc.code} {exc.reason}", hint="check the URL or the mirror"
        ) from None
    except urllib.error.URLError as exc:
        raise WeightFetchError(
            f"cannot reach {url}: {exc.reason}",
            hint="check the network, use --mirror, or copy the file by hand and use `pneumotriage weights import`",
        ) from None
    except (TimeoutError, ConnectionError) as exc:
        raise WeightFetchError(f"download from {url} failed: {exc}", hint="try again, or use --mirror") from None
    return digest.hexdigest(), received, total


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
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if isinstance(name_or_path, Path) or candidate.is_file() or looks_like_path(text):
        if not candidate.is_file():
            raise UsageError("no such weight file", path=candidate, hint="give a file path or a registry name")
        return candidate, None
    registry = registry if registry is not None else load_registry()
    spec = registry.get_spec(text)
    return WeightCache(registry, home).require(spec), spec


#: What torch.load raises on a file that is not a checkpoint at all (a text file, a truncated or damaged one): the
#: pickle machinery fails wherever the bytes lead it.
READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError)


def error_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name where it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a weight file with ``weights_only=True``; a file with pickled code in it is refused, not run."""
    import pickle

    import torch

    path = Path(path)
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

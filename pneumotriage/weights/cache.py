"""The local cache: where weights live, their hash rules (pinned, prefix, unpinned, bundled, built here), and
fetching, importing and verifying them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_text, sha256_file
from pneumotriage.weights.registry import (
    ProgressCallback,
    Registry,
    Status,
    WeightFetchError,
    WeightHashError,
    WeightMissingError,
    WeightSpec,
)

# --------------------------------------------------------------------------------------------------------------
# the cache


_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


def bundled_path(spec: WeightSpec) -> Path:
    """Where a bundled weight's file lies in the installed package."""
    return Path(__file__).resolve().parent.parent / "bundled" / spec.file


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
        return self.require_verified(spec)[0]

    def require_verified(self, spec: WeightSpec) -> tuple[Path, str]:
        """:meth:`require`'s file and the sha256 its check found: its stamp's, or (without a valid one) its bytes'
        hashed now."""
        if not self.path(spec).is_file():
            raise self.missing_error(spec)
        digest = self._stamp_matches(spec)
        if digest is not None:
            return self.path(spec), digest
        if spec.bundled:
            checked = self.status(spec, rehash=True)
            if checked.status == "corrupt":
                # An earlier release's copy of a bundled weight (or a damaged one): the package's own file is the
                # one pinned now, and it is checked against its sha256 on the way in.
                return self.import_file(spec, bundled_path(spec))
        else:
            checked = self.verify(spec)
        assert checked.sha256 is not None  # hashed, and it matched
        return self.path(spec), checked.sha256

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

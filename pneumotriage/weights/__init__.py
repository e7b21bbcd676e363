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

The modules: :mod:`~pneumotriage.weights.registry` (the registry and the errors), :mod:`~pneumotriage.weights.cache`
(the cache and the download: they share the hash rules, pinned, prefix, unpinned, bundled, built here, which must be
read together to be trusted), :mod:`~pneumotriage.weights.load` (resolving a name or path, loading safely).
"""

from pneumotriage.weights.cache import WeightCache, bundled_path, default_home, mirror_from_env, offline_from_env
from pneumotriage.weights.load import READ_ERRORS, error_line, load_state_dict, resolve, resolve_verified
from pneumotriage.weights.registry import (
    UnsafeWeightsError,
    WeightError,
    WeightFetchError,
    WeightHashError,
    WeightMissingError,
    WeightSpec,
    load_registry,
)

__all__ = [
    "READ_ERRORS",
    "UnsafeWeightsError",
    "WeightCache",
    "WeightError",
    "WeightFetchError",
    "WeightHashError",
    "WeightMissingError",
    "WeightSpec",
    "bundled_path",
    "default_home",
    "error_line",
    "load_registry",
    "load_state_dict",
    "mirror_from_env",
    "offline_from_env",
    "resolve",
    "resolve_verified",
]

"""The weights registry and cache, downloading for real from an HTTP server the test starts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.errors import UsageError
from pneumotriage.io import sha256_file
from pneumotriage.weights import (
    UnsafeWeightsError,
    WeightCache,
    WeightError,
    WeightFetchError,
    WeightHashError,
    WeightMissingError,
    load_registry,
    load_state_dict,
    resolve,
    resolve_verified,
)

REPO = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.root`` at ``/<f>`` and ``/mirror/<f>``; ``/truncated/<f>`` promises the full
    length and sends half."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        prefix, _, name = self.path.rpartition("/")
        truncated = prefix == "/truncated"
        path = self.server.root / name  # type: ignore[attr-defined]
        if prefix not in ("", "/mirror", "/truncated") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if truncated else data)
        if truncated:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[http.server.ThreadingHTTPServer]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = root  # type: ignore[attr-defined]
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _base(httpd: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def _weight_file(path: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    torch.save({"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.zeros(4)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def setup(tmp_path: Path, server: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A registry of three weights served by ``server``: pinned in full, pinned by prefix, unpinned."""
    root: Path = server.root  # type: ignore[attr-defined]
    full = _weight_file(root / "full.pt", 1)
    prefix = _weight_file(root / "prefix.pt", 2)
    unpinned = _weight_file(root / "free.pt", 3)
    base = _base(server)
    registry = tmp_path / "weights.toml"
    registry.write_text(
        f"""
[full]
kind = "segmenter"
arch = "unet"
encoder = "resnet34"
input_size = 256
normalisation = "imagenet"
url = "{base}/full.pt"
file = "full.pt"
sha256 = "{full}"

[prefix]
kind = "backbone"
arch = "resnet34"
input_size = 224
normalisation = "imagenet"
url = "{base}/prefix.pt"
file = "prefix.pt"
sha256_prefix = "{prefix[:8]}"

[free]
kind = "classifier"
arch = "resnet50"
input_size = 512
normalisation = "xrv"
url = "{base}/free.pt"
file = "free.pt"
""",
        encoding="utf-8",
    )
    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOTRIAGE_REGISTRY", str(registry))
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    monkeypatch.delenv("PNEUMOTRIAGE_OFFLINE", raising=False)
    monkeypatch.delenv("PNEUMOTRIAGE_MIRROR", raising=False)
    reg = load_registry(registry)
    return {
        "root": root,
        "base": base,
        "hashes": {"full": full, "prefix": prefix, "free": unpinned},
        "home": home,
        "registry": reg,
        "cache": WeightCache(reg, home),
    }


def _leftovers(cache: WeightCache) -> list[str]:
    return sorted(p.name for p in cache.dir.glob("*.part")) if cache.dir.exists() else []


# ----------------------------------------------------------------------------------------------------------------
# the shipped registry


def test_shipped_registry_parses_and_matches_torchvision() -> None:
    import torchvision.models as tvm

    reg = load_registry(REPO / "weights.toml")
    enums = {
        "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2,
        "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
        "efficientnet_b0": tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
        "vgg19_bn": tvm.VGG19_BN_Weights.IMAGENET1K_V1,
    }
    backbones = {s.arch: s for s in reg.values() if s.kind == "backbone"}
    assert set(backbones) == set(enums)
    for arch, enum in enums.items():
        spec = backbones[arch]
        assert spec.url == enum.url
        assert spec.sha256_prefix and spec.url.endswith(f"-{spec.sha256_prefix}.pth")
    xrv = reg["xrv-resnet50-res512-all"]
    assert not xrv.pinned and xrv.output_label == "Pneumothorax" and xrv.output_index == 3 and xrv.outputs == 18
    assert (xrv.pipeline, xrv.normalisation) == ("xrv", "unit") and "Apache" in xrv.licence


_ENTRY = '[x]\nkind = "backbone"\narch = "a"\nurl = "u"\nfile = "f"\ninput_size = 1\nnormalisation = "unit"\n'


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('"backbone"', '"detector"'), "kind 'detector'"),
        (('"f"', '"../f"'), "path in it"),
        (("", 'sha265 = "00"\n'), "unknown fields sha265"),
        (("", 'sha256 = "abc"\n'), "64"),
        (('url = "u"\n', ""), "lacks url"),
    ],
)
def test_registry_rejects_bad_entries(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    bad = tmp_path / "w.toml"
    old, new = change
    bad.write_text(_ENTRY.replace(old, new, 1) if old else _ENTRY + new)
    with pytest.raises(WeightError, match=message):
        load_registry(bad)


# ----------------------------------------------------------------------------------------------------------------
# fetch


def test_fetch_downloads_verifies_and_caches(setup: dict, server: http.server.ThreadingHTTPServer) -> None:
    cache: WeightCache = setup["cache"]
    spec = setup["registry"]["full"]
    seen: list[tuple[int, int | None]] = []
    path, digest = cache.fetch(spec, progress=lambda done, total: seen.append((done, total)))
    assert path == cache.dir / "full.pt" and digest == setup["hashes"]["full"]
    assert path.read_bytes() == (setup["root"] / "full.pt").read_bytes()
    assert seen[-1][0] == seen[-1][1] == path.stat().st_size
    assert cache.status(spec).status == "verified"
    assert _leftovers(cache) == []
    # a second fetch keeps the verified copy and does not download again
    cache.fetch(spec)
    assert server.hits == ["/full.pt"]  # type: ignore[attr-defined]


def test_fetch_by_prefix(setup: dict) -> None:
    path, digest = setup["cache"].fetch(setup["registry"]["prefix"])
    assert digest == setup["hashes"]["prefix"] and path.is_file()


def test_hash_mismatch_leaves_nothing(setup: dict, server: http.server.ThreadingHTTPServer) -> None:
    cache: WeightCache = setup["cache"]
    _weight_file(setup["root"] / "full.pt", 99)  # the server now has a different file
    with pytest.raises(WeightHashError) as err:
        cache.fetch(setup["registry"]["full"])
    assert setup["hashes"]["full"] in str(err.value) and "nothing was kept" in str(err.value)
    assert not (cache.dir / "full.pt").exists() and _leftovers(cache) == []


def test_truncated_transfer_leaves_nothing(setup: dict) -> None:
    cache: WeightCache = setup["cache"]
    with pytest.raises(WeightFetchError, match="truncated|broke off"):
        cache.fetch(setup["registry"]["full"], mirror=setup["base"] + "/truncated")
    assert not (cache.dir / "full.pt").exists() and _leftovers(cache) == []


def test_server_down(setup: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(WeightFetchError, match="cannot reach"):
        setup["cache"].fetch(setup["registry"]["full"], mirror=f"http://127.0.0.1:{port}")
    assert _leftovers(setup["cache"]) == []


def test_http_404(setup: dict) -> None:
    with pytest.raises(WeightFetchError, match="HTTP 404"):
        setup["cache"].fetch(setup["registry"]["full"], mirror=setup["base"] + "/nowhere")


def test_offline_mode_refuses_network(
    setup: dict, server: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PNEUMOTRIAGE_OFFLINE", raising=False)
    with pytest.raises(WeightFetchError, match="offline") as asked:  # --offline: the hint names the option
        setup["cache"].fetch(setup["registry"]["full"], offline=True)
    assert "without --offline" in str(asked.value.hint) and "PNEUMOTRIAGE_OFFLINE" not in str(asked.value.hint)
    monkeypatch.setenv("PNEUMOTRIAGE_OFFLINE", "1")
    with pytest.raises(WeightFetchError, match="offline") as by_env:  # the variable: the hint names it
        setup["cache"].fetch(setup["registry"]["full"], offline=True)
    assert "unset PNEUMOTRIAGE_OFFLINE" in str(by_env.value.hint)
    assert server.hits == []  # type: ignore[attr-defined]


def test_mirror_replaces_base_url(setup: dict, server: http.server.ThreadingHTTPServer) -> None:
    # the same server under another path prefix stands in for a hospital's internal mirror
    path, _ = setup["cache"].fetch(setup["registry"]["full"], mirror=setup["base"] + "/mirror/")
    assert path.is_file() and server.hits == ["/mirror/full.pt"]  # type: ignore[attr-defined]


def test_unpinned_needs_consent_then_is_recorded(setup: dict) -> None:
    cache: WeightCache = setup["cache"]
    spec = setup["registry"]["free"]
    with pytest.raises(WeightHashError, match="unpinned"):
        cache.fetch(spec)
    assert not cache.path(spec).exists()
    path, digest = cache.fetch(spec, allow_unpinned=True)
    assert digest == setup["hashes"]["free"]
    assert cache.observed()["free"]["sha256"] == digest
    assert cache.verify(spec).status == "verified"
    # the publisher swaps the file: a forced re-fetch no longer matches the hash recorded at first use
    _weight_file(setup["root"] / "free.pt", 42)
    with pytest.raises(WeightHashError, match="differs from the one recorded"):
        cache.fetch(spec, force=True, allow_unpinned=True)
    assert cache.verify(spec).sha256 == digest  # the trusted copy is still there


# ----------------------------------------------------------------------------------------------------------------
# import, verify, resolve, load


def test_import_checks_hash(setup: dict, tmp_path: Path) -> None:
    cache: WeightCache = setup["cache"]
    spec = setup["registry"]["full"]
    wrong = tmp_path / "wrong.pt"
    _weight_file(wrong, 7)
    with pytest.raises(WeightHashError):
        cache.import_file(spec, wrong)
    assert not cache.path(spec).exists() and _leftovers(cache) == []
    path, digest = cache.import_file(spec, setup["root"] / "full.pt")
    assert digest == setup["hashes"]["full"] and cache.status(spec).status == "verified"


def test_verify_finds_corrupted_cache_file(setup: dict) -> None:
    cache: WeightCache = setup["cache"]
    spec = setup["registry"]["full"]
    path, _ = cache.fetch(spec)
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\xff\x00\xff")
    assert cache.status(spec).status == "cached"  # the stamp no longer matches the file
    with pytest.raises(WeightHashError, match="does not match"):
        cache.verify(spec)
    with pytest.raises(WeightHashError):
        resolve("full", registry=setup["registry"], home=setup["home"])


def test_resolve_name_or_path(setup: dict, tmp_path: Path) -> None:
    reg, home = setup["registry"], setup["home"]
    with pytest.raises(WeightMissingError) as err:
        resolve("full", registry=reg, home=home)
    assert err.value.exit_code == 3
    msg = str(err.value)
    assert "weights fetch full" in msg and "weights import full" in msg and setup["hashes"]["full"] in msg
    setup["cache"].fetch(reg["full"])
    path, spec = resolve("full", registry=reg, home=home)
    assert spec is not None and spec.arch == "unet" and path.is_file()
    own = tmp_path / "mine.pt"
    _weight_file(own)
    assert resolve(str(own), registry=reg, home=home) == (own, None)
    with pytest.raises(UsageError, match="no such weight file"):
        resolve(str(tmp_path / "absent.pt"), registry=reg, home=home)
    with pytest.raises(UsageError, match="valid names: full, prefix, free"):
        resolve("fulll", registry=reg, home=home)


def test_a_registry_weight_is_hashed_once_not_at_every_load(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_verified gives the sha256 the cache checked; while the file is its stamp's, nothing hashes it again,
    and a model loaded by name carries that sha256 (its exported graphs' caches are keyed by it)."""
    import pneumotriage.models
    import pneumotriage.weights.cache

    reg, home = setup["registry"], setup["home"]
    setup["cache"].fetch(reg["full"])
    path, spec, digest = resolve_verified("full", registry=reg, home=home)
    assert spec is reg["full"] and digest == setup["hashes"]["full"] == sha256_file(path)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(pneumotriage.weights.cache, "sha256_file", no_hashing)
    monkeypatch.setattr(pneumotriage.models, "sha256_file", no_hashing)
    assert resolve_verified("full", registry=reg, home=home) == (path, spec, digest)
    own = setup["root"] / "full.pt"
    assert resolve_verified(str(own), registry=reg, home=home) == (own, None, None)  # a file given: the caller hashes
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    monkeypatch.setattr("pneumotriage.weights.load.load_registry", lambda: reg)
    assert pneumotriage.models.load_model("full", deferred=True).sha256 == digest
    # A file changed since its stamp is hashed again (and refused here: it no longer matches its pin).
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    with pytest.raises(AssertionError, match="hashed"):
        resolve_verified("full", registry=reg, home=home)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state": _Payload(marker)}, fh, protocol=2)
    with pytest.raises(UnsafeWeightsError, match="refused"):
        load_state_dict(evil)
    assert not marker.exists()
    evil2 = tmp_path / "evil2.pt"
    torch.save({"state": _Payload(marker)}, evil2)
    with pytest.raises(UnsafeWeightsError):
        load_state_dict(evil2)
    assert not marker.exists()
    for mapped in (False, True):  # mapped or read whole, the same refusal
        with pytest.raises(UnsafeWeightsError):
            load_state_dict(evil2, mapped=mapped)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    _weight_file(good)
    assert set(load_state_dict(good)) == {"conv.weight", "conv.bias"}


def _file_backed(tensor: torch.Tensor, path: Path) -> bool:
    """Whether ``tensor``'s memory is a mapping of ``path`` (Linux: /proc/self/maps)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if low <= address < high:
            return len(parts) > 5 and parts[5] == str(path.resolve())
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc to see the mappings")
def test_a_mapped_load_reads_the_weights_only_when_used(tmp_path: Path) -> None:
    """load_state_dict(mapped=True) maps the tensors from the file (a deferred network that is never built reads
    none of them); a file of torch's older format, which cannot be mapped, is read whole; the values are the same."""
    torch.manual_seed(0)
    weights = {"w": torch.randn(100_000)}
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    torch.save(weights, new)
    torch.save(weights, old, _use_new_zipfile_serialization=False)
    assert _file_backed(load_state_dict(new, mapped=True)["w"], new)
    assert not _file_backed(load_state_dict(new)["w"], new)
    assert not _file_backed(load_state_dict(old, mapped=True)["w"], old)
    for path in (new, old):
        assert torch.equal(load_state_dict(path, mapped=True)["w"], weights["w"])


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_list_fetch_verify_path_import(setup: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["full", "prefix", "free"]
    assert all({"name", "kind", "url", "sha256", "status"} <= set(r) for r in rows)
    assert {r["status"] for r in rows} == {"missing"}

    result = runner.invoke(app, ["weights", "path", "full"])
    assert result.exit_code == 3 and "weights fetch full" in result.output

    result = runner.invoke(app, ["weights", "fetch", "full", "prefix"])
    assert result.exit_code == 0, result.output
    assert "free" not in result.stdout
    result = runner.invoke(app, ["weights", "fetch", "free"])
    assert result.exit_code == 1 and "--allow-unpinned" in result.output
    result = runner.invoke(app, ["weights", "fetch", "free", "--allow-unpinned"])
    assert result.exit_code == 0 and setup["hashes"]["free"] in result.output

    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0 and "verified" in result.stdout and "missing" not in result.stdout

    result = runner.invoke(app, ["weights", "path", "full"])
    assert result.exit_code == 0 and result.stdout.strip() == str(setup["home"] / "weights" / "full.pt")

    result = runner.invoke(app, ["weights", "verify"])
    assert result.exit_code == 0 and result.output.count("verified") == 3
    (setup["home"] / "weights" / "prefix.pt").write_bytes(b"not the file")
    result = runner.invoke(app, ["weights", "verify", "prefix"])
    assert result.exit_code == 1 and result.output.startswith("error: corrupt: "), result.output

    result = runner.invoke(app, ["weights", "import", "prefix", str(setup["root"] / "prefix.pt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["weights", "verify", "prefix"])
    assert result.exit_code == 0


def test_cli_offline_and_mirror_from_environment(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("PNEUMOTRIAGE_OFFLINE", "1")
    result = runner.invoke(app, ["weights", "fetch", "full"])
    assert result.exit_code == 3 and "offline" in result.output and "Traceback" not in result.output
    monkeypatch.delenv("PNEUMOTRIAGE_OFFLINE")
    monkeypatch.setenv("PNEUMOTRIAGE_MIRROR", setup["base"] + "/mirror")
    result = runner.invoke(app, ["weights", "fetch", "full"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------------------------
# bundled weights (the synthetic demo's)


def test_shipped_demo_weights_are_bundled_small_pinned_and_load(tmp_path: Path) -> None:
    """The demo weights ship in the package, a few MB in all, and match the sha256 the registry pins; a fresh
    cache gets them by copying, and they load into float32 models that run."""
    from pneumotriage.io import sha256_file
    from pneumotriage.models import load_model
    from pneumotriage.weights import bundled_path

    reg = load_registry(REPO / "weights.toml")
    demo = [reg["demo-classifier"], reg["demo-segmenter"]]
    assert all(spec.bundled and spec.recipe == "demo" and not spec.clinical for spec in demo)
    files = [bundled_path(spec) for spec in demo]
    assert sum(f.stat().st_size for f in files) < 6_000_000
    assert [sha256_file(f) for f in files] == [spec.sha256 for spec in demo]
    cache = WeightCache(reg, tmp_path / "home")
    for spec in demo:
        assert cache.status(spec).status == "missing"
        path, digest = cache.fetch(spec, offline=True)  # a copy from the package: no network needed
        assert digest == spec.sha256 and cache.status(spec).status == "verified"
        model = load_model(str(path))
        assert next(model.model.parameters()).dtype == torch.float32
        with torch.inference_mode():
            out = model(torch.rand(1, 1, 128, 128))
        logits = out if spec.kind == "classifier" else out["mask"]
        assert torch.isfinite(logits).all()


@pytest.fixture
def bundled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A registry with one bundled weight whose package file lies in ``tmp_path/package``."""
    package = tmp_path / "package"
    package.mkdir()
    digest = _weight_file(package / "b.pt", 4)
    registry = tmp_path / "weights.toml"
    registry.write_text(
        f'[b]\nkind = "classifier"\narch = "densenet_mini"\ninput_size = 128\nnormalisation = "imagenet"\nurl = ""\n'
        f'file = "b.pt"\nsha256 = "{digest}"\nbundled = true\nrecipe = "demo"\n',
        encoding="utf-8",
    )
    monkeypatch.setattr("pneumotriage.weights.cache.bundled_path", lambda spec: package / spec.file)
    reg = load_registry(registry)
    return {"package": package, "digest": digest, "spec": reg["b"], "cache": WeightCache(reg, tmp_path / "home")}


def test_bundled_weight_is_copied_only_when_its_hash_matches(bundled: dict) -> None:
    cache: WeightCache = bundled["cache"]
    spec = bundled["spec"]
    good = (bundled["package"] / "b.pt").read_bytes()
    (bundled["package"] / "b.pt").write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(WeightHashError, match="wrong sha256"):
        cache.fetch(spec)
    assert not cache.path(spec).exists() and _leftovers(cache) == []
    assert "weights fetch b`, which copies it from the package" in str(cache.missing_error(spec))
    (bundled["package"] / "b.pt").write_bytes(good)
    path, digest = cache.fetch(spec)
    assert digest == bundled["digest"] and path.read_bytes() == good


def test_a_rebuilt_weight_is_kept_as_built_here_until_the_shipped_one_returns(bundled: dict, tmp_path: Path) -> None:
    """A file built from the recipe on this machine may differ from the shipped bytes: it is accepted and its hash
    recorded as built here (and checked from then on); fetching with --force brings the shipped file back."""
    cache: WeightCache = bundled["cache"]
    spec = bundled["spec"]
    rebuilt = tmp_path / "rebuilt.pt"
    other = _weight_file(rebuilt, 5)
    with pytest.raises(WeightHashError):
        cache.import_file(spec, rebuilt)  # not as a build: the pin holds
    path, digest = cache.import_file(spec, rebuilt, built=True)
    assert digest == other and cache.built_here(spec) == other
    assert cache.verify(spec).status == "verified"
    assert cache.fetch(spec) == (path, other)  # a verified copy is kept
    path.write_bytes(b"tampered")
    assert cache.status(spec, rehash=True).status == "corrupt"
    path, digest = cache.fetch(spec, force=True)
    assert digest == bundled["digest"] and cache.built_here(spec) is None and cache.verify(spec).status == "verified"


def test_bundled_entry_needs_a_full_sha256(tmp_path: Path) -> None:
    bad = tmp_path / "w.toml"
    bad.write_text(_ENTRY.replace('url = "u"', 'url = ""\nbundled = true'))
    with pytest.raises(WeightError, match="no full sha256"):
        load_registry(bad)


def test_pack_gives_the_same_bytes_for_the_same_training(tmp_path: Path) -> None:
    """pack() drops what differs between two runs of the same training (creation time, temporary paths) and
    halves the floats, so a seeded rebuild on the same machine gives the shipped bytes."""
    import time

    from pneumotriage.demo import pack
    from pneumotriage.models import ModelSpec, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelSpec(kind="classifier", arch="densenet_mini", input_size=128))
    first = save_checkpoint(tmp_path / "a.pt", model, config={"data": str(tmp_path / "x"), "epochs": 3})
    time.sleep(1.1)  # a later creation time
    second = save_checkpoint(tmp_path / "b.pt", model, config={"data": str(tmp_path / "y"), "epochs": 3})
    assert first.read_bytes() != second.read_bytes()
    a, b = pack(first, tmp_path / "a.packed"), pack(second, tmp_path / "b.packed")
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size < first.stat().st_size * 0.6
    data = torch.load(a, weights_only=True)
    assert data["config"] == {"epochs": 3} and "created" not in data
    assert {v.dtype for v in data["state_dict"].values() if v.is_floating_point()} == {torch.float16}

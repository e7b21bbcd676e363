"""The tool as a user outside this checkout gets it: the sdist and wheel built from the source tree, the wheel
installed into a fresh virtual environment (no editable install, no source tree on the path), run from another
folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_the_wheel_installed_elsewhere_has_its_registry_and_runs_the_demo(tmp_path: Path) -> None:
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("hatchling") is None:
        pytest.skip("needs the dev tools 'build' and 'hatchling' (make test installs them)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PNEUMOTRIAGE_", "PYTHON"))}
    env["PNEUMOTRIAGE_HOME"] = str(tmp_path / "home")

    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)], tmp_path, env, 300
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (sdist,) = dist.glob("pneumotriage-*.tar.gz")
    (wheel,) = dist.glob("pneumotriage-*.whl")
    registry = (REPO / "weights.toml").read_bytes()
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        member = tar.extractfile(f"{top}/weights.toml")
        assert member is not None and member.read() == registry
        assert f"{top}/pneumotriage/bundled/demo-classifier.pt" in names
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("pneumotriage/weights.toml") == registry  # the repository's one file, copied by the build
        assert {"pneumotriage/bundled/demo-classifier.pt", "pneumotriage/bundled/demo-segmenter.pt"} <= set(
            zf.namelist()
        )
        assert not any(n.startswith(("tests/", "benchmarks/")) for n in zf.namelist())
        templates = {f"pneumotriage/scan/templates/report.{ext}" for ext in ("html.j2", "css", "js")}
        assert templates <= set(zf.namelist()), "the report's templates are package data"

    # A fresh environment, the wheel installed into it by pip without its dependencies; those (torch and the rest)
    # are read from this environment's site-packages through a path file, so nothing downloads. A plain path line
    # in a .pth file is not scanned for .pth files itself, so this checkout's editable install stays invisible.
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env, 120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env, 60
        ).stdout.strip()
    )
    (site / "_deps_from_the_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
        env,
        300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import pneumotriage; print(pneumotriage.__file__)"], elsewhere, env, 120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout

    cli = venv / "bin" / "pneumotriage"
    listing = _run([str(cli), "weights", "list"], elsewhere, env, 120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert f"registry: {site / 'pneumotriage' / 'weights.toml'}\n" in listing.stdout, listing.stdout
    assert "demo-classifier" in listing.stdout and "xrv-resnet50-res512-all" in listing.stdout

    demo = _run([str(cli), "demo", "--out", "demo", "--workers", "0", "--precision", "fp32"], elsewhere, env, 300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "copied from the package" in demo.stdout + demo.stderr
    assert (elsewhere / "demo" / "scan" / "worklist.csv").is_file()
    assert "Pneumothorax triage worklist" in (elsewhere / "demo" / "scan" / "report.html").read_text()
    assert not (REPO / "demo").exists()


def test_the_repository_tracks_no_large_or_scratch_file() -> None:
    """What git tracks is source, docs and small fixtures: no model, graph or a library's scratch output (ONNX
    Runtime's shape inference once left a 98 MB external-data file in the working folder, and it was committed)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (an sdist or an installed copy)")
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
        .stdout.decode()
        .split("\0")
    )
    # The demo's two small models ship in the wheel on purpose (``make demo`` runs without a download).
    tracked = [REPO / name for name in listed if name and not name.startswith("pneumotriage/bundled/")]
    large = [
        f"{p.relative_to(REPO)} ({p.stat().st_size} bytes)"
        for p in tracked
        if p.is_file() and p.stat().st_size > 512_000
    ]
    scratch = [str(p.relative_to(REPO)) for p in tracked if p.suffix in {".onnx", ".pt", ".pth", ".data", ".bin"}]
    assert not large, f"large files tracked: {large}"
    assert not scratch, f"models or graphs tracked: {scratch}"

"""Sharded scans: torchrun ranks (gloo on the CPU) and ``--shard K/N`` job-array tasks give the worklist,
submission and masks of a single-process scan byte for byte; a killed shard resumes to the same; merge names the
missing shards (exit 4) and refuses a shard scanned with other options.

Images go through the models one at a time (``--batch-size 1``, what a CPU runs at 384 px and more): a network's
output for an image can differ in its last float digits with the other images of its batch (oneDNN and cuDNN pick
kernels by batch size), and shards batch different images together.

Every child process runs under a timeout, so a hung rank fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.distributed import Ranks
from pneumotriage.models import ModelSpec, build_model, save_checkpoint
from pneumotriage.scan.shards import Shard
from pneumotriage.scan.torchrun import Relay
from pneumotriage.synth import write_study

TIMEOUT_S = 240
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
#: The files that must be equal, byte for byte, to a single-process scan's.
COMPARED = ("worklist.csv", "submission.csv", "skipped.csv")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic study of 28 images (two folders, a file name shared by two images, a text file) and untrained
    64 px models, and the reference: a single-process scan of it."""
    root = tmp_path_factory.mktemp("shards")
    study = write_study(root / "study", 28, positive_rate=0.5, size=(128, 128), seed=5)
    first = sorted(study.out.rglob("*.dcm"))[0]
    (root / "study" / "extra").mkdir()
    shutil.copy(first, root / "study" / "extra" / first.name)  # the same image id as another file: two names
    torch.manual_seed(0)
    # Untrained ResNet34s at 64 px give each image its own probability; these thresholds make about half of the
    # images outlined (with mask and overlay; so large that they are flagged implausible and tiered review) and
    # the rest routine.
    clf = save_checkpoint(
        root / "clf.pt", build_model(ModelSpec("classifier", "resnet34", input_size=64)), thresholds={"gate": 0.65}
    )
    seg = save_checkpoint(
        root / "seg.pt",
        build_model(ModelSpec("segmenter", "unet", "resnet34", input_size=64)),
        thresholds={"top_score": 0.45, "bottom_score": 0.45, "min_area": 2000},
    )
    paths = {"study": root / "study", "classifier": clf, "segmenter": seg, "single": root / "single"}
    done = _run(_scan_args(paths, paths["single"]))
    assert done.returncode == 0, done.stderr
    # The reference for torchrun's ranks, which each get one core (so one torch thread): on some CPUs (seen on a
    # 2-core Xeon) oneDNN's sums depend on the thread count in the 6th decimal of a probability.
    paths["single-one-core"] = root / "single-one-core"
    done = _run(_scan_args(paths, paths["single-one-core"]), one_core=True)
    assert done.returncode == 0, done.stderr
    return paths


def _scan_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "scan",
        str(paths["study"]),
        "--out",
        str(out),
        "--classifier",
        str(paths["classifier"]),
        "--segmenter",
        str(paths["segmenter"]),
        "--workers",
        "0",
        "--batch-size",
        "1",
        # byte for byte needs one backend: auto measures in each process's cache, and may choose another
        "--backend",
        "torch",
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(
    args: list[str], *, launcher: list[str] | None = None, one_core: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [*(launcher or [sys.executable]), "-m", "pneumotriage", *args]
    first = min(os.sched_getaffinity(0)) if one_core and hasattr(os, "sched_setaffinity") else None
    pin = (lambda: os.sched_setaffinity(0, {first})) if first is not None else None
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=pin)


def _torchrun(*flags: str) -> list[str]:
    return [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), *flags]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worklist_rows(out: Path) -> list[dict[str, Any]]:
    return list(json.loads((out / "worklist.json").read_text())["worklist"])


def _assert_same_as_single(out: Path, single: Path) -> None:
    for name in COMPARED:
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    rows = _worklist_rows(out)
    assert rows == _worklist_rows(single)
    # A ranking with something to order: outlined images (with their files) and routine ones.
    assert any(r["mask_file"] for r in rows) and {r["tier"] for r in rows} >= {"review", "routine"}
    for sub in ("masks", "overlays"):
        ours = sorted(p.name for p in (out / sub).iterdir())
        assert ours == sorted(p.name for p in (single / sub).iterdir()) and ours, sub
        for name in ours:
            assert (out / sub / name).read_bytes() == (single / sub / name).read_bytes(), name


# --------------------------------------------------------------------------------------------------------------
# the shard assignment and the progress relay


def test_shard_parse_and_every_file_in_exactly_one_shard() -> None:
    assert Shard.parse("1/4") == Shard(1, 4) and Shard.parse(" 0 / 1 ").label == "0/1"
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0", "1/2/3"):
        with pytest.raises(Exception, match="--shard"):
            Shard.parse(bad)
    paths = [f"/data/study-{i}/image-{i}.dcm" for i in range(2000)] + ["/data/caf\udce9.dcm"]
    owners = [[k for k in range(4) if Shard(k, 4).owns(p)] for p in paths]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [k] for o in owners) for k in range(4)]
    assert min(sizes) > 400, sizes  # a hash spreads them: no shard is left idle


def test_relay_sums_every_rank_counts() -> None:
    class Store:
        def __init__(self) -> None:
            self.values: dict[str, int] = {}

        def add(self, key: str, n: int) -> int:
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]

    store = Store()
    ranks = [Ranks(k, 2, k, 2, 0, torch.device("cpu"), store) for k in range(2)]
    relays = [Relay(r, every=0.0) for r in ranks]
    relays[0].report({"decoded": 3, "classified": 3, "segmented": 1, "errors": 0})
    relays[1].report({"decoded": 2, "classified": 2, "segmented": 2, "errors": 1})
    relays[0].report({"decoded": 5, "classified": 5, "segmented": 1, "errors": 0})  # running totals, not deltas
    job = relays[0].job(found=12, walk_done=True)
    assert job == {
        "event": "batch",
        "discovered": 12,
        "walk_done": True,
        "decoded": 7,
        "classified": 7,
        "segmented": 3,
        "errors": 1,
        "skipped": 0,
        "resumed": 0,
    }
    relays[0].finished()
    assert not relays[0].all_finished()
    relays[1].finished()
    assert relays[0].all_finished()


# --------------------------------------------------------------------------------------------------------------
# the same outputs as one process


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_torchrun_two_ranks_equal_a_single_process_scan(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run([*_scan_args(setup, out), "--json"], launcher=_torchrun())
    assert done.returncode == 0, done.stderr
    _assert_same_as_single(out, setup["single-one-core"])
    # rank 0 prints the merged worklist once; the other rank stays quiet
    assert [r["image_id"] for r in json.loads(done.stdout)["worklist"]] == [
        r["image_id"] for r in _worklist_rows(setup["single-one-core"])
    ]
    assert done.stderr.count("images:") == 1 and "report:" in done.stderr
    shards = sorted(p.name for p in (out / ".scan" / "shards").iterdir())
    assert shards == ["0-of-2", "1-of-2"]
    assert all((out / ".scan" / "shards" / s / "done.json").exists() for s in shards)


def test_shards_then_merge_equal_a_single_process_scan(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run(_scan_args(setup, out, "--shard", "0/2"))
    assert first.returncode == 0, first.stderr
    assert not (out / "worklist.csv").exists() and "pneumotriage merge" in " ".join(first.stderr.split())

    partial = _run(["merge", str(out)])
    assert partial.returncode == 4
    error = [line for line in partial.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "1/2" in error[0] and "Traceback" not in partial.stderr
    assert "incomplete" in json.loads((out / "worklist.json").read_text())["notes"][-1]

    second = _run(_scan_args(setup, out, "--shard", "1/2"))
    assert second.returncode == 0, second.stderr
    merged = _run(["merge", str(out)])
    assert merged.returncode == 0, merged.stderr
    _assert_same_as_single(out, setup["single"])
    assert not any("incomplete" in n for n in json.loads((out / "worklist.json").read_text())["notes"])


def _kill_when_journaled(proc: subprocess.Popen[bytes], journal: Path, lines: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (journal.exists() and len(journal.read_text().splitlines()) >= lines):
        assert proc.poll() is None, "the scan ended before it could be killed"
        assert time.monotonic() < deadline, "the scan journaled nothing in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)


def test_a_killed_shard_resumed_gives_the_same_outputs(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pneumotriage", *_scan_args(setup, out, "--shard", "0/2")]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".scan" / "shards" / "0-of-2" / "journal.jsonl"
    try:
        _kill_when_journaled(proc, journal, 2)
    finally:
        proc.kill()
    assert not (out / ".scan" / "shards" / "0-of-2" / "done.json").exists()
    assert _run(_scan_args(setup, out, "--shard", "1/2")).returncode == 0
    missing = _run(["merge", str(out)])
    assert missing.returncode == 4 and "0/2 (not finished)" in " ".join(missing.stderr.split())

    resumed = _run([*args[3:], "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert _run(["merge", str(out)]).returncode == 0
    _assert_same_as_single(out, setup["single"])


def _rank_pids(launcher_pid: int) -> Iterator[tuple[int, int]]:
    """(pid, local rank) of each worker torchrun started."""
    for pid in map(
        int, subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    ):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in env:
            if entry.startswith(b"LOCAL_RANK="):
                yield pid, int(entry.split(b"=")[1])


@pytest.mark.skipif(not Path("/proc/self/environ").exists() or not shutil.which("pgrep"), reason="needs /proc, pgrep")
def test_torchrun_max_restarts_after_a_rank_is_killed(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [*_torchrun("--max-restarts", "1"), "-m", "pneumotriage", *_scan_args(setup, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        journal = out / ".scan" / "shards" / "1-of-2" / "journal.jsonl"
        deadline = time.monotonic() + TIMEOUT_S
        while not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 ended or stalled before the kill"
            time.sleep(0.005)
        killed = [pid for pid, rank in _rank_pids(proc.pid) if rank == 1]
        assert killed, "rank 1's process not found"
        os.kill(killed[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()
    assert b"done before the resume" in b" ".join(stderr.split())
    _assert_same_as_single(out, setup["single-one-core"])


# --------------------------------------------------------------------------------------------------------------
# what merge and the layouts refuse


def test_merge_refuses_a_shard_scanned_with_other_options(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, _scan_args(setup, out, "--shard", "0/2")).exit_code == 0
    assert runner.invoke(app, _scan_args(setup, out, "--shard", "1/2", "--min-area", "10")).exit_code == 0
    result = runner.invoke(app, ["merge", str(out)])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "shard 1/2 was scanned with other thresholds than shard 0/2" in " ".join(result.output.split())
    assert not (out / "worklist.csv").exists()


def test_layouts_do_not_mix(setup: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    sharded = tmp_path / "sharded"
    assert runner.invoke(app, _scan_args(setup, sharded, "--shard", "0/3")).exit_code == 0
    cases = {
        "plain into sharded": (_scan_args(setup, sharded, "--resume"), "holds a scan in 3 shards"),
        "other count": (_scan_args(setup, sharded, "--shard", "0/2"), "in 3 shards, not 2"),
        "shard again": (_scan_args(setup, sharded, "--shard", "0/3"), "--resume"),
        "plain merged": (["merge", str(setup["single"])], "no sharded scan"),
        "bad shard": (_scan_args(setup, tmp_path / "x", "--shard", "2/2"), "--shard 2/2"),
        "shard into plain": (_scan_args(setup, setup["single"], "--shard", "0/2"), "by one process"),
    }
    for name, (args, expected) in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert expected in " ".join(result.output.split()), (name, result.output)
    missing = runner.invoke(app, ["merge", str(sharded)])
    assert missing.exit_code == 4 and "1/3 (not started), 2/3 (not started)" in " ".join(missing.output.split())

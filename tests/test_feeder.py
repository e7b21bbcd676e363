"""The scan's feeding process hands work on in bulk: the segmenter's maps as windows, tasks to the workers a few
files or images at a time. Each must give exactly what the one-at-a-time path gave."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from helpers import within
from torch import nn

from pneumotriage.models import LoadedModel, ModelSpec
from pneumotriage.postprocess import Outline, outline
from pneumotriage.scan import ScanOptions, run
from pneumotriage.scan.decode import turned
from pneumotriage.scan.infer import MapWindows, segment
from pneumotriage.scan.workers import Part, Workers
from pneumotriage.synth import StudySummary


class _Given(nn.Module):
    """A segmenter that answers with the logits it is given (and, with ``present``, an image-level head)."""

    def __init__(
        self, logits: torch.Tensor, present: torch.Tensor | None = None, mirrored: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.logits, self.present, self.mirrored = logits, present, mirrored

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # A mirrored input (TTA) gets other logits: the mirror of these, shifted, so the mean is not trivial.
        mirrored = bool((x[:, :, :, 0] < 0).all())
        # (or, with ``mirrored``, those logits as the mirrored input's).
        other = torch.flip(self.logits, dims=[-1]) + 0.5 if self.mirrored is None else self.mirrored
        out = {"mask": other if mirrored else self.logits}
        if self.present is not None:
            out["present"] = self.present
        return out


def _model(
    logits: torch.Tensor, present: torch.Tensor | None = None, mirrored: torch.Tensor | None = None
) -> LoadedModel:
    spec = ModelSpec("segmenter", "unet", "resnet34", input_size=int(logits.shape[-1]))
    return LoadedModel(_Given(logits, present, mirrored), spec, {}, {"clinical": True}, None, "0" * 64, "given")


def _logits(n: int, side: int, seed: int) -> torch.Tensor:
    """Smooth random logits: blobs of every size, some maps nearly empty, some nearly full."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(size=(n, 1, 6, 6)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    shift = torch.from_numpy(rng.uniform(-6, 3, size=(n, 1, 1, 1)).astype(np.float32))
    return smooth * 4 + shift


def _same(a: Outline | None, b: Outline | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.top, a.left, a.shape) == (b.top, b.left, b.shape) and np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize(
    "thresholds",
    [
        {"top_score": 0.75, "min_area": 2000.0, "bottom_score": 0.3, "min_component": 0.0},
        {"top_score": 0.5, "min_area": 10.0, "bottom_score": 0.6, "min_component": 800.0},  # top under bottom
        {"top_score": 0.9, "min_area": 0.0, "bottom_score": 0.0, "min_component": 0.0},  # the whole map is hot
    ],
)
def test_an_outline_from_a_window_is_the_outline_from_the_whole_map(thresholds: dict[str, float]) -> None:
    """The slot holds only the window of each map; rebuilt with zeros around it, the map gives the outline the
    whole map gives, bit for bit, at any image size and turned back or not."""
    side, n = 64, 21  # more maps than are made at once, and not a multiple of it
    logits = _logits(n, side, seed=int(thresholds["min_component"]) + 1)
    model = _model(logits)
    images = torch.zeros(n, 1, side, side)
    expected, _ = segment(model, images, torch.device("cpu"), False)
    floor = min(thresholds["top_score"], thresholds["bottom_score"])
    places = [np.full(side * side, np.nan, dtype=np.float32) for _ in range(n)]
    windows = MapWindows(model, torch.device("cpu"), tta=False, floor=floor)
    _, _, found = windows.run(images, places)
    outlined = 0
    for j in range(n):
        whole = expected[j].numpy()
        window = found[j]
        if window is None:
            assert not (whole > floor).any()
            rebuilt = None
        else:
            rebuilt = window.rebuild(places[j], np.empty((side, side), dtype=np.float32))
        for shape in ((1024, 1024), (1955, 1841), (48, 40)):
            for flip in ((False, False), (True, True)):
                mine = outline(turned(rebuilt, flip).copy(), shape, **thresholds) if rebuilt is not None else None
                theirs = outline(turned(whole, flip).copy(), shape, **thresholds)
                assert _same(mine, theirs), (j, shape, flip)
                outlined += theirs is not None
    assert outlined > 10, "too few outlines to tell"


def test_map_windows_give_segments_scores_and_maps_with_tta_a_head_and_nans() -> None:
    side, n = 32, 11
    logits = _logits(n, side, seed=7)
    logits[3, 0, 5, 7] = float("nan")  # a damaged map: its maximum says so
    head = torch.linspace(-3, 3, n)
    images = -torch.ones(n, 1, side, side)  # mirrored by TTA: the model tells the two apart
    images[..., 1:] = 1.0
    for present in (None, head):
        model = _model(logits, present)
        maps, scores = segment(model, images, torch.device("cpu"), True)
        places = [np.zeros(side * side, dtype=np.float32) for _ in range(n)]
        got, peak, windows = MapWindows(model, torch.device("cpu"), tta=True, floor=0.3).run(images, places)
        np.testing.assert_array_equal(got, scores.numpy())
        assert np.isnan(peak[3]) and np.isfinite(np.delete(peak, 3)).all()
        np.testing.assert_array_equal(np.delete(peak, 3), np.delete(maps.flatten(1).amax(1).numpy(), 3))
        for j, window in enumerate(windows):
            if window is None:
                continue
            part = places[j][: window.height * window.width].reshape(window.height, window.width)
            inside = maps[j, window.top : window.top + window.height, window.left : window.left + window.width]
            np.testing.assert_array_equal(part, inside.numpy())
        # A GPU's batch: the windows found from the maps where they were made, the parts read from their copy
        # on the CPU (here both on the CPU, the copy a second tensor): the same windows and parts.
        copied = [np.zeros(side * side, dtype=np.float32) for _ in range(n)]
        from_copy: list[Any] = []
        gpu_way = MapWindows(model, torch.device("cpu"), tta=True, floor=0.3)
        gpu_way._hand_on(maps, copied, from_copy, host=maps.clone())
        assert from_copy == windows
        for j, window in enumerate(windows):
            if window is not None:
                size = window.height * window.width
                np.testing.assert_array_equal(copied[j][:size], places[j][:size])


def _hostile_logits(n: int, side: int, seed: int) -> torch.Tensor:
    """Logits that test a window and a maximum found on the logits: noise with many near ties, saturated and
    infinite values, maps far below any floor (probabilities under float32's normal range), constant maps."""
    rng = np.random.default_rng(seed)
    base = _logits(n, side, seed).numpy()
    noise = rng.normal(size=base.shape).astype(np.float32)
    out = base + noise * rng.uniform(0, 3, size=(n, 1, 1, 1)).astype(np.float32)
    out[0] = 0.0  # a constant map: every value ties
    out[1] = -90.0 + noise[1]  # sigmoid under 1e-38
    out[2] = 17.0 + noise[2]  # saturated: many values round to 1
    out[3, 0, 5:9, 3:30] = np.inf
    out[4] = -np.inf
    out[4, 0, 40, 41] = -3.0
    out[5] = np.float32(-0.8473) + noise[5] * 1e-6  # on a floor of 0.3, to the last bits
    out[6] = -10.0  # with TTA, the largest logit's mean is not the largest mean: the mirror's logit there is low
    out[6, 0, 10, 10], out[6, 0, 50, 60] = 2.0, 1.5
    return torch.from_numpy(out)


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windows_and_maxima_found_on_the_logits_are_those_of_the_whole_map(tta: bool, dtype: torch.dtype) -> None:
    """On a CPU the sigmoid is computed only in boxes found on the logits: every window, every value in it and
    every map's maximum are the whole map's, bit for bit, on hostile maps and floors (none, the whole map, on the
    edge of float32, above every probability)."""
    side, n = 96, 11
    logits = _hostile_logits(n, side, seed=5 + tta).to(dtype)
    mirrored = torch.flip(_hostile_logits(n, side, seed=9), dims=[-1]).roll(1, dims=0).to(dtype)
    mirrored[6] = torch.flip(logits[6], dims=[-1])
    mirrored[6, 0, 10, side - 1 - 10] = -10.0
    images = -torch.ones(n, 1, side, side)  # mirrored by TTA: the model tells the two apart
    images[..., 1:] = 1.0
    model = _model(logits, mirrored=mirrored)
    maps, _ = segment(model, images, torch.device("cpu"), tta)
    empty = found = 0
    for floor in (0.3, 0.0, 1e-30, 0.5, float(np.nextafter(np.float32(1), np.float32(0))), 1.0, 1.5):
        places = [np.full(side * side, np.nan, dtype=np.float32) for _ in range(n)]
        _, peak, windows = MapWindows(model, torch.device("cpu"), tta=tta, floor=floor).run(images, places)
        expected_places = [np.full(side * side, np.nan, dtype=np.float32) for _ in range(n)]
        expected_windows: list[Any] = []
        whole_way = MapWindows(model, torch.device("cpu"), tta=tta, floor=floor)
        expected_peak = whole_way._hand_on(maps, expected_places, expected_windows).numpy()
        np.testing.assert_array_equal(peak, expected_peak)
        assert windows == expected_windows, floor
        for j, window in enumerate(windows):
            if window is not None:
                size = window.height * window.width
                np.testing.assert_array_equal(places[j][:size], expected_places[j][:size])
        empty, found = empty + windows.count(None), found + n - windows.count(None)
    assert empty > 10 and found > 10, "both ways to a maximum, in the window and without one"


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("count", [0, 1])
def test_tasks_handed_over_a_few_at_a_time_answer_in_order(count: int) -> None:
    with Workers(count, slots=1, keys=[], map_size=None) as pool:
        parts: list[Part[Any]] = pool.submit_each(_square, [(i,) for i in range(10)], chunk=3)
        assert [p.result() for p in parts] == [i * i for i in range(10)]
        assert len({id(p.future) for p in parts}) == 4  # one task for each three


def _frozen_here() -> int:
    import gc

    return gc.get_freeze_count()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_workers_are_forked_with_what_lives_frozen() -> None:
    """A worker's garbage collections never walk the objects it inherited (each walk writes to every page the
    fork shares): they are frozen when the workers are forked, and unfrozen in the scan's process after."""
    import gc

    gc.unfreeze()  # whatever an earlier test froze in this process
    with Workers(1, slots=1, keys=[], map_size=None) as pool:
        assert gc.get_freeze_count() == 0
        assert pool.submit(_frozen_here).result() > 1000


class _OneRegion(nn.Module):
    """A segmenter that outlines one confident region of every image, a little lower in each next batch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        self.calls += 1
        logits = torch.full((b, 1, h, w), -10.0)
        top = h // 4 + self.calls % 8
        logits[:, :, top : top + 12, w // 4 : w // 4 + 10] = 10.0
        return {"mask": logits}


def test_images_whose_finishing_worker_dies_are_finished_here(
    study: StudySummary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while it finishes a task of several images (the OOM killer): each of them is finished in
    the scan's process from its slot, and the rows and files are those of a scan that had no worker."""
    import os
    import signal
    import sys

    from pneumotriage.scan import workers as scan_workers

    if not sys.platform.startswith("linux"):
        pytest.skip("the workers are forked only on Linux: the stand-in for the OOM killer reaches them that way")
    main, original = os.getpid(), scan_workers.finish
    victim = sorted(p.stem for p in study.out.rglob("*.dcm"))[5]

    def finish(job: Any, probs: Any, display: Any) -> Any:
        if os.getpid() != main and job.name == victim:
            (tmp_path / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(job, probs, display)

    monkeypatch.setattr(scan_workers, "finish", finish)
    spec = ModelSpec("segmenter", "unet", "resnet34", input_size=64)
    rows = {}
    for workers in (1, 0):
        seg = LoadedModel(_OneRegion(), spec, {}, {"clinical": True}, None, "0" * 64, "one region")
        options = ScanOptions.of(workers=workers, batch_size=8, segment_all=True, finish_in_workers=True)
        summary = within(
            120, run, [study.out], tmp_path / str(workers), classifier=None, segmenter=seg, options=options
        )
        rows[workers] = [{k: v for k, v in asdict(r).items() if k != "key"} for r in summary.results]
        assert sum(1 for r in summary.results if r.mask_file) == 12
    assert (tmp_path / "killed").exists(), "no worker was killed"
    assert rows[1] == rows[0]
    for r in rows[0]:
        assert (tmp_path / "1" / r["mask_file"]).read_bytes() == (tmp_path / "0" / r["mask_file"]).read_bytes()


def test_cpu_batches_are_the_arenas_rows_with_no_copy_and_a_copy_after_a_bad_file(
    study: StudySummary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU a batch whose rows follow one another is the arena's own memory, with no gather; a bad file
    shifts the rows, so that a batch wraps around the ring's end and is copied instead. Either way each batch
    holds the input the scan makes of each of its files, still after the workers have decoded the next files
    (a row is not handed out again while its batch is in use)."""
    import time

    from pneumotriage.pipelines import InputKey
    from pneumotriage.scan import Execution, decoded_batches, model_inputs, plan_for
    from pneumotriage.scan.decode import SlotArena

    gathers: list[int] = []
    gather = SlotArena.batch

    def counted(self: SlotArena, rows: list[int], key: InputKey, out: torch.Tensor | None = None) -> torch.Tensor:
        gathers.append(len(rows))
        return gather(self, rows, key, out)

    monkeypatch.setattr(SlotArena, "batch", counted)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a DICOM file")
    paths = [study.out / img.path for img in study.images]
    files = [(p, p.stem) for p in paths[:5]] + [(bad, "bad")] + [(p, p.stem) for p in paths[5:] * 3]
    key = InputKey(64)
    expected = {i: x for i, x, _ in model_inputs([p for p, _ in files], key)}
    assert 5 not in expected and len(expected) == len(files) - 1
    plan = plan_for(Execution(batch_size=4, workers=1), torch.device("cpu"), 64)
    batches_seen, seen = 0, []
    with decoded_batches(files, [key], plan, torch.device("cpu")) as batches:
        for index, batch in batches:
            if not index:
                continue
            batches_seen += 1
            time.sleep(0.2)  # the worker decodes the files after this batch meanwhile, into other rows
            x = batch.inputs[key]
            for j, i in enumerate(index):
                np.testing.assert_array_equal(x[j, 0].numpy(), expected[i])
            seen += index
    assert seen == sorted(expected)
    # 26 files in batches of 4 (the last of 2), rows in a ring of 12: after the bad sixth file, two batches of
    # each three are copied (one spans its hole, one wraps around); the rest are the arena's own memory.
    assert batches_seen == 7
    assert 2 <= len(gathers) <= 4 and len(gathers) < batches_seen


@pytest.mark.parametrize("inherited", [True, False], ids=["fork: anonymous map", "spawn: named block"])
def test_an_arena_closes_while_a_batch_of_its_rows_is_still_held(inherited: bool) -> None:
    """A batch is a view of the arena: the scan may end (and close the arena) while one is still referenced."""
    from pneumotriage.pipelines import InputKey
    from pneumotriage.scan.decode import SlotArena

    key = InputKey(32)
    arena = SlotArena(2, [key], 32, rows=4, inherited=inherited)
    batch = arena.view([1, 2], key)
    assert batch is not None and arena.view([2, 1], key) is None  # rows out of order: no view
    batch[:] = 1.0
    assert float(arena.image(2, key).sum()) == 32 * 32  # the same memory
    name = arena.name
    arena.close()
    assert float(batch.sum()) == 2 * 32 * 32  # still readable
    if name is not None:
        from multiprocessing import shared_memory

        with pytest.raises(FileNotFoundError):  # the name is gone at once
            shared_memory.SharedMemory(name=name)
        from pneumotriage.scan import decode

        lingering = [block for block in decode._LINGERING if block.name == name]
        assert lingering
        del batch  # its memory goes when the next arena closes
        SlotArena(1, [key], None, inherited=False).close()
        assert all(block.name != name for block in decode._LINGERING)

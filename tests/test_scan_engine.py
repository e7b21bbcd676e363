"""The scan engine's stages: streaming discovery, sizes from the pixel data, the window-only post-processing, the
mask PNG writer, the models' inference set-up, and JPEG decoding on the device's code path."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from PIL import Image

from pneumotriage.dicom import MAX_SIDE, jpeg_frame_size, read_dicom
from pneumotriage.errors import CorruptPixelDataError, UsageError
from pneumotriage.models import LoadedModel, ModelSpec, build_model
from pneumotriage.postprocess import outline, resize_full, resize_window
from pneumotriage.scan import Execution, ScanOptions, run
from pneumotriage.scan.decode import decode_jpegs_on_device
from pneumotriage.scan.discover import Found, found_files
from pneumotriage.scan.infer import FixedBatch, prepare_models
from pneumotriage.scan.options import JPEG_WORKERS_OVER_DEVICE, plan_for
from pneumotriage.scan.png import mask_png
from pneumotriage.scan.read import read
from pneumotriage.synth import StudySummary


def _loaded(spec: ModelSpec) -> LoadedModel:
    torch.manual_seed(0)
    model = build_model(spec).eval()
    return LoadedModel(model, spec, {}, {"clinical": True}, None, "0" * 64, spec.title)


@pytest.fixture(scope="module")
def tiny_models() -> tuple[LoadedModel, LoadedModel]:
    return (
        _loaded(ModelSpec("classifier", "resnet34", input_size=64)),
        _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=64)),
    )


def _dicoms(study: StudySummary) -> list[Path]:
    return sorted(study.out.rglob("*.dcm"))


# --------------------------------------------------------------------------------------------------------------
# sizes come from the pixel data; oversized headers are refused before any allocation


def test_header_that_disagrees_with_its_jpeg_is_refused(study: StudySummary, tmp_path: Path) -> None:
    path = tmp_path / "lying.dcm"
    ds = pydicom.dcmread(_dicoms(study)[0])
    ds.Rows, ds.Columns = 96, 80  # the JPEG inside is 128 x 128
    ds.save_as(path)
    with pytest.raises(CorruptPixelDataError, match=r"96 x 80 px but the JPEG pixel data is 128 x 128"):
        read_dicom(path, reduce_to=64)
    with pytest.raises(CorruptPixelDataError, match="96 x 80"):
        read(path, want_jpeg=True)


def test_scan_gives_an_error_row_never_a_mask_of_the_headers_size(
    study: StudySummary, tiny_models: tuple[LoadedModel, LoadedModel], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good, lying = _dicoms(study)[:2]
    shutil.copy(good, folder / "good.dcm")
    ds = pydicom.dcmread(lying)
    ds.Rows = 200
    ds.save_as(folder / "lying.dcm")
    clf, seg = tiny_models
    summary = run(
        [folder], tmp_path / "out", classifier=clf, segmenter=seg, options=ScanOptions.of(workers=0, gate=0.0)
    )
    rows = {Path(r.path).name: r for r in summary.results}
    assert rows["lying.dcm"].status == "error" and "200 x 128 px" in (rows["lying.dcm"].error or "")
    assert rows["lying.dcm"].mask_file is None and rows["lying.dcm"].rle == "-1"
    assert rows["good.dcm"].status == "ok" and (rows["good.dcm"].rows, rows["good.dcm"].columns) == (128, 128)


def test_jpeg_frame_size_reads_the_start_of_frame(study: StudySummary) -> None:
    ds = pydicom.dcmread(_dicoms(study)[0])
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert jpeg_frame_size(frame) == (128, 128)
    assert jpeg_frame_size(b"not a jpeg") is None
    assert jpeg_frame_size(frame[:20]) is None  # cut before its frame header


def test_declared_60000_square_is_refused_without_allocating(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 60000
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = bytes(64)  # a lie: 7.2 GB declared
    path = tmp_path / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptPixelDataError, match=f"60000 x 60000 exceeds the {MAX_SIDE} px"):
            read_dicom(path, reduce_to=512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB allocated"


# --------------------------------------------------------------------------------------------------------------
# streaming: the first batch reaches the models while discovery is still walking


def test_first_batch_is_classified_before_discovery_ends(
    study: StudySummary, tiny_models: tuple[LoadedModel, LoadedModel], tmp_path: Path
) -> None:
    """A discovery that hands over 3 files, then blocks (a slow network share): the scan must classify those
    3 while it waits, and finish all 12 once the walk goes on."""
    released = threading.Event()
    classified_while_blocked: list[int] = []
    files = list(found_files([study.out]))
    files = [f for f in files if f.path.suffix == ".dcm"]

    def slow_walk() -> Iterator[Found]:
        yield from files[:3]
        # Blocks until the scan reports a classified batch (or 60 s, so a broken engine fails, never hangs).
        released.wait(timeout=60)
        yield from files[3:]

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "batch" and not released.is_set() and event["classified"]:
            classified_while_blocked.append(event["classified"])
            released.set()

    clf, seg = tiny_models
    summary = run(
        [study.out],
        tmp_path / "out",
        classifier=clf,
        segmenter=seg,
        options=ScanOptions.of(workers=1, batch_size=4),
        progress=progress,
        files=slow_walk(),
    )
    assert classified_while_blocked and classified_while_blocked[0] <= 3
    assert summary.counts["classified"] == 12 and len(summary.results) == 12


def test_each_file_found_has_its_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's real path (what keys it, and what decides a shard) is os.path.realpath's, found once a folder:
    through a relative root, '..', a link to the folder named as a root, and a link to a file (kept under the
    first path that reached it)."""
    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    (folder / "x.dcm").write_bytes(b"x")
    (folder / "y.dcm").write_bytes(b"y")
    (folder / "l.dcm").symlink_to(folder / "y.dcm")
    (tmp_path / "in" / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path / "in")
    for roots in ([Path("a")], [Path("link")], [Path("a/../a")], [folder / "x.dcm"], [Path("link/l.dcm")]):
        found = list(found_files(roots))
        assert found and all(f.real == os.path.realpath(f.path) for f in found), roots
        assert len({f.real for f in found}) == len(found), roots  # each file once


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_passed_over_without_being_opened(study: StudySummary, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(study.out, folder)
    os.mkfifo(folder / "p.dcm")  # opening it would block for ever
    code = (
        "import sys, pathlib; from pneumotriage.scan.discover import found_files; "
        "found = list(found_files([pathlib.Path(sys.argv[1])])); "
        "print(sum(f.passed is None for f in found)); print([f.passed for f in found if f.passed])"
    )
    # In a child process under a timeout: a discovery that opened the FIFO would block, and fail here, not hang.
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    count, passed = done.stdout.splitlines()
    assert int(count) == sum(1 for p in study.out.rglob("*") if p.is_file())
    assert passed == "['not a regular file (a FIFO): never opened']"  # accounted for: a skipped.csv line


# --------------------------------------------------------------------------------------------------------------
# post-processing inside the window; the mask PNG writer


def test_resize_matches_torch_and_the_window_matches_the_whole() -> None:
    rng = np.random.default_rng(3)
    for (h, w), shape in (((32, 32), (48, 40)), ((64, 64), (1955, 1841)), ((16, 16), (7, 5)), ((8, 8), (8, 8))):
        p = (rng.random((h, w)) ** 4).astype(np.float32)
        full = resize_full(p, shape)
        reference = F.interpolate(torch.from_numpy(p)[None, None], size=shape, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(full, reference[0, 0].numpy(), atol=1e-5)
        window = resize_window(p, shape, 0.8)
        assert window is not None
        wh, ww = window.values.shape
        np.testing.assert_array_equal(window.values, full[window.top : window.top + wh, window.left : window.left + ww])
        outside = np.ones(shape, dtype=bool)
        outside[window.top : window.top + wh, window.left : window.left + ww] = False
        assert not (full[outside] > 0.8).any()
    assert resize_window(np.zeros((8, 8), np.float32), (16, 16), 0.5) is None


def test_outline_is_the_whole_image_rule_in_a_window() -> None:
    from pneumotriage.postprocess import remove_small_components, scaled_area, triplet_keep

    rng = np.random.default_rng(4)
    noise = torch.from_numpy(rng.random((1, 1, 8, 8)).astype(np.float32))
    p = (F.interpolate(noise, size=(64, 64), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1) ** 2).numpy()
    t = {"top_score": 0.5, "min_area": 200.0, "bottom_score": 0.3, "min_component": 3000.0}
    found = outline(p, (100, 90), **t)
    expected = resize_full(p, (100, 90)) > t["bottom_score"]
    expected = remove_small_components(expected, scaled_area(t["min_component"], (100, 90)))
    assert bool(triplet_keep(p[None], top_score=0.5, min_area=200.0)[0])
    assert found is not None
    np.testing.assert_array_equal(found.full(), expected)
    assert outline(p, (100, 90), **{**t, "top_score": 1.0}) is None  # no pixel above 1: the triplet says no


def test_mask_png_decodes_to_the_mask() -> None:
    rng = np.random.default_rng(0)
    for shape in ((1024, 1024), (1955, 1841), (7, 5), (300, 1)):
        h, w = shape
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        crop = rng.random((int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1)))) < 0.5
        expected = np.zeros(shape, np.uint8)
        expected[top : top + crop.shape[0], left : left + crop.shape[1]] = crop * 255
        image = Image.open(io.BytesIO(mask_png(crop, top, left, shape)))
        assert image.mode == "L" and image.size == (w, h)
        np.testing.assert_array_equal(np.asarray(image), expected)
    empty = np.asarray(Image.open(io.BytesIO(mask_png(np.zeros((0, 0), bool), 0, 0, (64, 32)))))
    assert empty.shape == (64, 32) and not empty.any()


# --------------------------------------------------------------------------------------------------------------
# inference set-up; JPEG decoding on the device's code path


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("classifier", "densenet121", input_size=64),
        ModelSpec("classifier", "resnet50", input_size=64, normalisation="xrv", outputs=18, output_index=3),
        ModelSpec("classifier", "efficientnet_b0", input_size=64),
        ModelSpec("segmenter", "unet", "resnet34", input_size=64),
        ModelSpec("segmenter", "unetpp", "vgg19_bn", input_size=64),
        ModelSpec("segmenter", "double_unet", "efficientnet_b0", input_size=64),
    ],
    ids=lambda s: s.title,
)
def test_prepared_models_agree_with_the_originals(spec: ModelSpec) -> None:
    """Batch norm folded into the convolutions and channels_last change nothing but float rounding, and the
    caller's model is left as it was."""
    original = _loaded(spec)
    before = {k: v.clone() for k, v in original.model.state_dict().items()}
    (prepared,) = prepare_models(torch.device("cpu"), original)
    assert prepared is not None and prepared.model is not original.model
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        a, b = original.model(x), prepared.model(x.contiguous(memory_format=torch.channels_last))
    a, b = (a["mask"], b["mask"]) if isinstance(a, dict) else (a, b)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert all(torch.equal(v, before[k]) for k, v in original.model.state_dict().items())


def test_compiled_model_pads_a_short_batch_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile``: the model is compiled for one batch shape; a shorter batch is padded and cut back, so its
    outputs are the eager model's (to float rounding), and a dict of outputs is cut too."""
    seen: list[int] = []

    def recording_compile(net: torch.nn.Module, **options: Any) -> Any:
        assert options == {"dynamic": False}
        return lambda x: (seen.append(x.shape[0]), net(x))[1]

    with monkeypatch.context() as patched:
        patched.setattr(torch, "compile", recording_compile)
        fixed = FixedBatch(torch.nn.Conv2d(1, 1, 1), batch=4)
        with torch.inference_mode():
            sizes = [fixed(torch.rand(n, 1, 8, 8)).shape[0] for n in (4, 3, 1)]
    assert seen == [4, 4, 4] and sizes == [4, 3, 1]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.conv(x)
            return {"mask": y, "present": y.flatten(1).amax(1)}

    torch.manual_seed(0)
    net = Net().eval()
    fixed = FixedBatch(net, batch=4)
    x = torch.rand(3, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, want = fixed(x), net(x)
    assert isinstance(got, dict) and got["mask"].shape == (3, 2, 16, 16) and got["present"].shape == (3,)
    torch.testing.assert_close(got["mask"], want["mask"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["present"], want["present"], rtol=1e-5, atol=1e-5)


def test_gpu_plan_decodes_jpeg_in_the_workers_when_there_are_enough() -> None:
    """On a GPU, ``auto`` decodes JPEG Baseline in the workers from :data:`JPEG_WORKERS_OVER_DEVICE` of them
    (faster on an H100 host with 14), on the GPU with fewer; a CPU always decodes in the workers; the choice
    is said in the plan, and the user's choice wins."""
    cuda = torch.device("cuda")
    many = plan_for(Execution(), cuda, 512, cores=JPEG_WORKERS_OVER_DEVICE + 1)
    few = plan_for(Execution(), cuda, 512, cores=4)
    assert many.workers == JPEG_WORKERS_OVER_DEVICE and not many.jpeg_on_device and "in the workers" in many.why
    assert few.workers == 3 and few.jpeg_on_device and "nvJPEG" in few.why
    assert plan_for(Execution(jpeg_decode="device"), cuda, 512, cores=16).jpeg_on_device
    assert not plan_for(Execution(jpeg_decode="workers"), cuda, 512, cores=4).jpeg_on_device
    assert not plan_for(Execution(), torch.device("cpu"), 512, cores=16).jpeg_on_device
    # How the models run is no part of what a scan writes: a resume may change it.
    assert ScanOptions.of(compile=True).signature() == ScanOptions().signature()


def test_scan_options_are_three_parts_checked_when_made_with_the_journals_flat_signature() -> None:
    """Flat options go to their part; a value that cannot be meant is refused as it is made (so every ScanOptions
    is valid); the signature stays the flat list journals were written with, so they still resume."""
    o = ScanOptions.of(gate=0.3, no_phi=True, workers=0, submission=False)
    assert (o.decide.gate, o.write.no_phi, o.run.workers, o.write.submission) == (0.3, True, 0, False)
    changed = o.but(resume=True, tta=True)
    assert changed.run.resume and changed.decide.tta and changed.decide.gate == 0.3 and not o.run.resume
    for bad in ({"gate": float("nan")}, {"min_area": -1}, {"workers": -1}, {"backend": "tpu"}, {"precision": "fp8"}):
        with pytest.raises(UsageError):
            ScanOptions.of(**bad)
    with pytest.raises(UsageError, match="--compile"):
        ScanOptions.of(compile=True, backend="onnxruntime")
    with pytest.raises(TypeError, match="no option 'gates'"):
        ScanOptions.of(gates=0.5)
    assert list(ScanOptions().signature()) == [
        "gate", "top_score", "min_area", "bottom_score", "min_component", "review", "segment_all", "no_segment",
        "tta", "urgent_probability", "precision", "accept", "rle_relative", "no_phi", "overlays", "dicom_seg",
        "dicom_sr", "report_thumbnails",
    ]  # fmt: skip
    assert ScanOptions.of(**o.signature()).signature() == o.signature()  # a merge rebuilds them from a journal


def test_jpeg_decoded_on_the_device_path_matches_the_workers(study: StudySummary) -> None:
    """The batch decoder for CUDA (nvJPEG there, libjpeg-turbo here) gives the images the workers give, up to
    the codecs' rounding and the resize order."""
    paths = _dicoms(study)[:4]
    sources = [read(p, want_jpeg=True) for p in paths]
    assert all(s.jpeg is not None for s in sources)
    on_device, displays, shapes = decode_jpegs_on_device(
        [s.jpeg or b"" for s in sources], [s.invert for s in sources], [64], torch.device("cpu")
    )
    assert shapes == [(128, 128)] * 4 and on_device[64].shape == (4, 1, 64, 64)
    for i, path in enumerate(paths):
        reference = F.interpolate(
            torch.from_numpy(read_dicom(path).pixels)[None, None], size=(64, 64), mode="bilinear", antialias=True
        )[0, 0]
        assert float((on_device[64][i, 0] - reference).abs().mean()) < 0.01
        assert displays[i].dtype == torch.uint8 and tuple(displays[i].shape) == (128, 128)


@pytest.mark.parametrize("size", [128, 64])
def test_scan_with_jpeg_on_the_device_path_agrees(
    study: StudySummary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """JPEG decoded on the device (libjpeg-turbo here, nvJPEG on CUDA) where the models' inputs are the image's own
    size; where an input is at most half the image's side, training has the codec shrink the image as it decodes,
    so the scan decodes it so too, in the workers: the same pixels as with ``--jpeg-decode workers``."""
    from pneumotriage.scan import stream

    on_device: list[int] = []

    def counted(frames: Any, *args: Any) -> Any:
        on_device.append(len(frames))
        return decode_jpegs_on_device(frames, *args)

    monkeypatch.setattr(stream, "decode_jpegs_on_device", counted)
    clf = _loaded(ModelSpec("classifier", "resnet34", input_size=size))
    seg = _loaded(ModelSpec("segmenter", "unet", "resnet34", input_size=size))
    results = {}
    for where in ("workers", "device"):
        summary = run(
            [study.out],
            tmp_path / where,
            classifier=clf,
            segmenter=seg,
            options=ScanOptions.of(workers=1, jpeg_decode=where, segment_all=True),
        )
        results[where] = {r.image_id: r for r in summary.results}
    assert sum(on_device) == (12 if size == 128 else 0)  # the study's images are 128 px
    assert results["workers"].keys() == results["device"].keys()
    assert sum(r.status == "ok" for r in results["device"].values()) == 12
    for image_id, r in results["workers"].items():
        other = results["device"][image_id]
        assert r.status == other.status  # the label CSV and manifest beside the images: not DICOM either way
        if r.status == "ok" and size == 128:
            assert other.probability == pytest.approx(r.probability, abs=0.05)
        elif r.status == "ok":
            assert other.probability == r.probability


class _OneRegion(torch.nn.Module):
    """A segmenter that outlines one confident 8 x 8 region of every image, after ``delay_s`` (a slow model, so
    that every decoded file is waiting when its map is ready)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(self.delay_s)
        b, _, h, w = x.shape
        logits = torch.full((b, 1, h, w), -10.0)
        logits[:, :, h // 3 : h // 3 + 8, w // 4 : w // 4 + 8] = 10.0
        return {"mask": logits}


def test_finishing_here_or_in_a_worker_gives_the_same_outputs(
    study: StudySummary, tiny_models: tuple[LoadedModel, LoadedModel], tmp_path: Path
) -> None:
    """The engine finishes an outlined image in a worker while the models are busy (a slow segmenter: 10 of 12
    went there when this was written), and in the main process when they would only wait for decoding (no
    workers: all 12): both give the same rows and files, and every outlined image's report thumbnail is cut
    from its overlay (the outline's red shows in it)."""
    clf, _ = tiny_models
    spec = ModelSpec("segmenter", "unet", "resnet34", input_size=64)
    rows: dict[str, list[dict[str, Any]]] = {}
    for label, workers, delay in (("here", 0, 0.0), ("worker", 1, 0.2)):
        seg = LoadedModel(_OneRegion(delay), spec, {}, {"clinical": True}, None, "0" * 64, "one region")
        out = tmp_path / label
        summary = run(
            [study.out],
            out,
            classifier=clf,
            segmenter=seg,
            options=ScanOptions.of(workers=workers, batch_size=1, segment_all=True),
        )
        rows[label] = [{k: v for k, v in asdict(r).items() if k != "key"} for r in summary.results]
        outlined = [r for r in summary.results if r.mask_file]
        assert len(outlined) == 12
        for r in outlined:
            assert r.overlay_file and (out / r.overlay_file).is_file()
            thumb = np.asarray(Image.open(out / ".scan" / "thumbs" / f"{r.file_stem}.jpg").convert("RGB"), int)
            assert ((thumb[..., 0] - thumb[..., 1]) > 100).any(), "no outline in the thumbnail"
    assert rows["here"] == rows["worker"]
    for r in rows["here"]:
        for kind in ("mask_file", "overlay_file"):
            if r[kind]:
                assert (tmp_path / "here" / r[kind]).read_bytes() == (tmp_path / "worker" / r[kind]).read_bytes()


def test_the_scan_package_has_no_import_cycle() -> None:
    """Each stage imports only stages below it: no module of ``pneumotriage.scan`` reaches itself again through
    its imports (function-level imports included)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "pneumotriage" / "scan"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        name = f"pneumotriage.scan.{path.stem}" if path.stem != "__init__" else "pneumotriage.scan"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumotriage.scan."):
                targets.add(node.module)
        graph[name] = targets

    def reaches(start: str, node: str, seen: set[str]) -> bool:
        for nxt in graph.get(node, ()):
            if nxt == start or (nxt not in seen and (seen.add(nxt) or reaches(start, nxt, seen))):
                return True
        return False

    assert len(graph) >= 14
    assert [m for m in graph if reaches(m, m, set())] == []


def test_classifier_only_scan_writes_no_all_empty_submission_unless_asked(
    study: StudySummary, tiny_models: tuple[LoadedModel, LoadedModel], tmp_path: Path
) -> None:
    """With --no-segment every mask is empty: no submission.csv (every row would be -1) unless asked for."""
    clf, seg = tiny_models
    plain = run([study.out], tmp_path / "a", classifier=clf, segmenter=seg, options=ScanOptions.of(no_segment=True))
    assert (plain.out / "worklist.csv").is_file() and not (plain.out / "submission.csv").exists()
    assert not any((plain.out / "masks").iterdir())
    asked = ScanOptions.of(no_segment=True, submission=True)
    wanted = run([study.out], tmp_path / "b", classifier=clf, segmenter=seg, options=asked)
    rows = (wanted.out / "submission.csv").read_text().splitlines()[1:]
    assert len(rows) == 12 and all(r.endswith(",-1") for r in rows)
    with_masks = run([study.out], tmp_path / "c", classifier=clf, segmenter=seg, options=ScanOptions.of(workers=0))
    assert (with_masks.out / "submission.csv").is_file()


@pytest.mark.parametrize(("side", "size"), [(256, 128), (1024, 256), (1024, 512), (300, 128)])
def test_a_scan_feeds_a_model_the_pixels_training_gave_it(tmp_path: Path, side: int, size: int) -> None:
    """A JPEG the codec can shrink to a model's input (training's ``read_dicom(reduce_to=size)``) reaches that
    model in a scan as the same pixels, though the scan also decodes the image at its display size: the demo
    classifier gave a negative 0.72 on the display copy shrunk, 0.21 on training's pixels."""
    from pneumotriage.native import square
    from pneumotriage.pipelines import InputKey
    from pneumotriage.scan.decode import SlotArena, decode_into
    from pneumotriage.synth import write_study

    study = write_study(tmp_path / "s", 1, positive_rate=1.0, size=(side, side), seed=3)
    path = study.out / study.images[0].path
    arena = SlotArena(1, (InputKey(size), InputKey(64)), None, inherited=True)
    decode_into(read(path, want_jpeg=False), arena, 0, 0)
    for s in (size, 64):
        trained_on = square(read_dicom(path, reduce_to=s).pixels, s)[0].numpy()
        np.testing.assert_array_equal(arena.image(0, InputKey(s)), trained_on)


def test_a_model_prepared_again_is_the_copy_made_before_until_its_weights_change() -> None:
    """A node scans study after study with the same models: their inference copies (batch norm folded) are made
    once; an in-place change to a weight (a training step) makes a new one, never a stale one."""
    from pneumotriage.models import LoadedModel, ModelSpec, build_model
    from pneumotriage.scan.infer import prepare_models

    spec = ModelSpec(kind="classifier", arch="densenet_mini", input_size=64)
    model = LoadedModel(spec=spec, model=build_model(spec).eval(), thresholds={})
    device = torch.device("cpu")
    first = prepare_models(device, model)[0]
    again = prepare_models(device, model)[0]
    assert first is not None and again is not None and again.model is first.model
    with torch.no_grad():
        next(model.model.parameters()).add_(1.0)
    changed = prepare_models(device, model)[0]
    assert changed is not None and changed.model is not first.model
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(changed.model(x), model.model(x), atol=1e-4)

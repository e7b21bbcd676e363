from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pneumotriage import discover, read_dicom, read_header
from pneumotriage.dicom import SkippedFile, image_id_for
from pneumotriage.errors import (
    CorruptPixelDataError,
    DicomError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedTransferSyntaxError,
)
from pneumotriage.synth import StudySummary

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _spine_minus_lungs(pixels: np.ndarray) -> float:
    h, w = pixels.shape
    band = slice(int(0.3 * h), int(0.6 * h))
    spine = pixels[band, int(0.46 * w) : int(0.54 * w)].mean()
    lungs = np.concatenate(
        [
            pixels[band, int(0.22 * w) : int(0.34 * w)].ravel(),
            pixels[band, int(0.66 * w) : int(0.78 * w)].ravel(),
        ]
    ).mean()
    return float(spine - lungs)


# Golden values: normalised grey at (h/4, w/4), (h/2, w/2), (3h/4, w/3); tolerance covers decoder differences.
SIIM_GOLDEN = {
    "1.2.276.0.7230010.3.1.4.8323329.1314.1517875167.222290": (0.2619, 0.8429, 0.7571),
    "1.2.276.0.7230010.3.1.4.8323329.10000.1517875220.938530": (0.5226, 0.8040, 0.7739),
}
OTHER = {
    "cr-chest-j2k-monochrome1-15bit.dcm": ((1955, 1841), "MONOCHROME1", None, (0.3944, 0.9324, 0.9065)),
    "cr-chest-monochrome1-10bit.dcm": ((440, 440), "MONOCHROME1", None, (0.3633, 0.8311, 0.4544)),
    "nih-dx-chest-native.dcm": ((1024, 1024), "MONOCHROME2", None, (0.5833, 0.9430, 0.9123)),
}


def _spots(pixels: np.ndarray) -> tuple[float, ...]:
    h, w = pixels.shape
    return tuple(float(pixels[y, x]) for y, x in ((h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, w // 3)))


@pytest.mark.realdata
def test_siim_samples_decode(real_data: Path) -> None:
    files = sorted((real_data / "siim-sample").glob("*.dcm"))
    assert len(files) == 10
    spacings = set()
    for path in files:
        image = read_dicom(path)
        assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
        assert image.original_shape == (1024, 1024)
        assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
        assert image.transfer_syntax == "1.2.840.10008.1.2.4.50"
        assert image.photometric == "MONOCHROME2" and image.modality == "CR"
        assert image.image_id == image.sop_instance_uid == path.name[:-4]
        assert image.patient_id and image.study_instance_uid
        assert image.study_datetime is not None and image.study_datetime.year == 1901
        assert image.view_position in ("PA", "AP")
        assert _spine_minus_lungs(image.pixels) > 0.05, path.name
        assert image.pixel_spacing_mm is not None
        spacings.add(round(image.pixel_spacing_mm[0], 6))
        if image.image_id in SIIM_GOLDEN:
            np.testing.assert_allclose(_spots(image.pixels), SIIM_GOLDEN[image.image_id], atol=0.02)
    assert spacings == {0.139, 0.143, 0.168, 0.194311}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(OTHER))
def test_other_radiographs_decode_bone_bright(real_data: Path, name: str) -> None:
    shape, photometric, spacing, golden = OTHER[name]
    image = read_dicom(real_data / "cxr-other" / name)
    assert image.pixels.shape == shape and image.photometric == photometric
    assert image.pixel_spacing_mm == spacing  # the J2K file's 0\0 spacing is unusable, so None
    assert _spine_minus_lungs(image.pixels) > 0.2
    np.testing.assert_allclose(_spots(image.pixels), golden, atol=0.02)


@pytest.mark.realdata
def test_header_matches_full_read(real_data: Path) -> None:
    for path in sorted((real_data / "cxr-other").glob("*.dcm")):
        header = read_header(path)
        image = read_dicom(path)
        assert header.usable and header.shape == image.original_shape
        assert header.pixel_spacing_mm == image.pixel_spacing_mm


# What each of pydicom's bundled files must give: an image of this shape, or this error type. Files not
# listed must still give an image or a DicomError; none may crash.
EXPECTED: dict[str, tuple[int, int] | type[DicomError]] = {
    "CT_small.dcm": (128, 128),
    "MR_small.dcm": (64, 64),
    "MR_small_bigendian.dcm": (64, 64),
    "MR_small_RLE.dcm": (64, 64),
    "MR_small_implicit.dcm": (64, 64),
    "MR_small_jp2klossless.dcm": (64, 64),
    "JPEG2000.dcm": (1024, 256),
    "image_dfl.dcm": (512, 512),
    "liver_expb_1frame.dcm": (512, 512),
    "SC_rgb_jpeg_dcmtk.dcm": (100, 100),
    "SC_ybr_full_422_uncompressed.dcm": (100, 100),
    "examples_palette.dcm": (350, 800),
    "examples_ybr_color.dcm": (240, 320),
    "rtdose.dcm": (10, 10),
    "MR_truncated.dcm": CorruptPixelDataError,
    "rtplan.dcm": NoPixelDataError,
    "test-SR.dcm": NoPixelDataError,
    "meta_missing_tsyntax.dcm": CorruptPixelDataError,  # only Pixel Data: no Rows, Columns, ...
    "ExplVR_BigEndNoMeta.dcm": NoPixelDataError,
}
HAVE_JPEG_LS = importlib.util.find_spec("jpeg_ls") is not None  # the `codecs` extra
if HAVE_JPEG_LS:
    EXPECTED["JPEGLSNearLossless_16.dcm"] = (50, 10)
    EXPECTED["MR_small_jpeg_ls_lossless.dcm"] = (64, 64)
else:
    EXPECTED["JPEGLSNearLossless_16.dcm"] = UnsupportedTransferSyntaxError
    EXPECTED["MR_small_jpeg_ls_lossless.dcm"] = UnsupportedTransferSyntaxError
if importlib.util.find_spec("libjpeg") is None:  # the `codecs-gpl` extra
    EXPECTED["JPGExtended.dcm"] = UnsupportedTransferSyntaxError
    EXPECTED["SC_rgb_jpeg_gdcm.dcm"] = UnsupportedTransferSyntaxError


@pytest.mark.parametrize("path", sorted(PYDICOM_FILES.glob("*.dcm")), ids=lambda p: p.name)
def test_pydicom_test_files_give_image_or_typed_error(path: Path) -> None:
    expected = EXPECTED.get(path.name)
    try:
        image = read_dicom(path)
    except DicomError as err:
        message = str(err)
        assert str(path) in message and "\n" not in message
        if expected is not None:
            assert isinstance(expected, type) and isinstance(err, expected), message
        return
    assert not isinstance(expected, type), f"expected {expected}"
    if expected is not None:
        assert image.pixels.shape == expected
    assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all()
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def test_same_image_through_different_encodings_agrees() -> None:
    reference = read_dicom(PYDICOM_FILES / "MR_small.dcm").pixels
    names = ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm"]
    if HAVE_JPEG_LS:
        names.append("MR_small_jpeg_ls_lossless.dcm")
    for name in names:
        np.testing.assert_allclose(read_dicom(PYDICOM_FILES / name).pixels, reference, atol=1e-6, err_msg=name)


def test_colour_and_multiframe_warn() -> None:
    colour = read_dicom(PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    assert any("converted to grey" in w for w in colour.warnings)
    multi = read_dicom(PYDICOM_FILES / "examples_ybr_color.dcm")
    assert any("30 frames; using the first" in w for w in multi.warnings)


def test_unsupported_syntax_names_the_extra() -> None:
    if HAVE_JPEG_LS:
        pytest.skip("pyjpegls is installed here, so JPEG-LS decodes")
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"JPEG-LS.*pneumotriage\[codecs\]"):
        read_dicom(PYDICOM_FILES / "JPEGLSNearLossless_16.dcm")
    header = read_header(PYDICOM_FILES / "JPEGLSNearLossless_16.dcm")
    assert not header.usable and "codecs" in (header.problem or "")


def _synthetic_dataset(photometric: str = "MONOCHROME2", spacing: object = "0.2\\0.2") -> Dataset:
    from pneumotriage.synth import Anatomy, make_phantom
    from pneumotriage.synth.study import _dataset

    rng = np.random.default_rng(0)
    phantom = make_phantom((96, 80), positive=False, rng=rng, anatomy=Anatomy.sample(rng))
    ds = _dataset(
        phantom.image,
        photometric=photometric,
        bits=12,
        uids={"study": "1.2.3", "series": "1.2.3.4", "sop": "1.2.3.4.5"},
        patient={"id": "p", "sex": "F", "age": "040Y"},
        spacing=0.2,
        study_day=__import__("datetime").date(2020, 1, 2),
        index=0,
        view="PA",
    )
    ds.PixelSpacing = spacing
    return ds


def _save(ds: Dataset, path: Path, *, preamble: bool = True) -> Path:
    buf = io.BytesIO()
    if preamble:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(
    ("spacing", "expected"), [("0\\0", None), ("abc", None), ("-1\\2", None), ("0.3\\0.25", (0.3, 0.25))]
)
def test_pixel_spacing_parsing(tmp_path: Path, spacing: str, expected: object) -> None:
    ds = _synthetic_dataset()
    ds.PixelSpacing = None
    del ds.PixelSpacing
    ds.add_new(0x00280030, "DS", spacing) if expected is not None else ds.add_new(0x00280030, "LO", spacing)
    path = _save(ds, tmp_path / "s.dcm")
    assert read_header(path).pixel_spacing_mm == expected
    assert read_dicom(path).pixel_spacing_mm == expected


def test_monochrome1_matches_monochrome2(tmp_path: Path) -> None:
    mono2 = read_dicom(_save(_synthetic_dataset("MONOCHROME2"), tmp_path / "m2.dcm")).pixels
    ds = _synthetic_dataset("MONOCHROME1")
    mono1 = read_dicom(_save(ds, tmp_path / "m1.dcm")).pixels
    np.testing.assert_allclose(mono1, mono2, atol=1e-3)


def test_file_without_preamble_reads_with_warning(tmp_path: Path) -> None:
    path = _save(_synthetic_dataset(), tmp_path / "raw", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_dicom(path)
    assert image.pixels.shape == (96, 80) and image.image_id == "raw"
    assert any("no DICOM preamble" in w for w in image.warnings)


def test_not_dicom_and_truncated(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n" * 20)
    with pytest.raises(NotDicomError, match="notes.txt: not a DICOM file"):
        read_dicom(text)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(NotDicomError):
        read_header(empty)
    # A file that cannot be opened may well be a DICOM (removed or made unreadable since it was found): an error,
    # never "not DICOM", which a scan would pass over into skipped.csv.
    with pytest.raises(DicomError, match="cannot be read") as raised:
        read_dicom(tmp_path / "missing.dcm")
    assert not isinstance(raised.value, NotDicomError)
    good = _save(_synthetic_dataset(), tmp_path / "good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(CorruptPixelDataError, match="cut.dcm: pixel data does not decode"):
        read_dicom(cut)


def test_truncated_jpeg_is_corrupt(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = study.out / study.images[0].path
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    with pytest.raises(DicomError) as info:
        read_dicom(cut)
    assert "cut.dcm" in str(info.value) and "\n" not in str(info.value)


def test_image_id_strips_only_dicom_suffixes() -> None:
    assert image_id_for("a/ID_0011fe81e.dcm") == "ID_0011fe81e"
    assert image_id_for("1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027") == (
        "1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027"
    )
    assert image_id_for("x/IMG.DICOM") == "IMG"


def test_discovery_is_header_only_and_walks_any_layout(study, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "tree"
    shutil.copytree(study.out, root / "nested")
    flat = root / "flat"
    flat.mkdir()
    first = study.out / study.images[0].path
    shutil.copy(first, flat / "no_extension")
    (flat / "junk.bin").write_bytes(b"\x00" * 300)
    (flat / ".DS_Store").write_bytes(b"hidden")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("discovery decoded pixels")

    monkeypatch.setattr("pneumotriage.dicom.pixels.pixel_array", boom)
    monkeypatch.setattr(Dataset, "pixel_array", property(boom))
    found = list(discover(root))
    headers = [f for f in found if not isinstance(f, SkippedFile)]
    skipped = sorted(f.path.name for f in found if isinstance(f, SkippedFile))
    assert len(headers) == 13 and all(h.usable for h in headers)
    assert skipped == ["junk.bin", "manifest.json", "sample_submission.csv", "train-rle.csv"]
    assert any(h.image_id == "no_extension" for h in headers)
    assert [f.path for f in found] == [f.path for f in discover(root)]  # a stable order


def test_reduced_jpeg_decode_matches_full_decode(study: StudySummary) -> None:
    """JPEG Baseline decoded at 1/2 scale by DCT scaling: smaller pixels, the true original size, and the same
    picture as a full decode shrunk to that size (to within JPEG's rounding)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    path = study.out / study.images[0].path
    full = read_dicom(path)
    half = read_dicom(path, reduce_to=64)
    assert full.pixels.shape == (128, 128) and half.pixels.shape == (64, 64)
    assert half.original_shape == full.original_shape == (128, 128)
    shrunk = F.interpolate(torch.from_numpy(full.pixels)[None, None], size=(64, 64), mode="area")[0, 0].numpy()
    assert float(np.abs(shrunk - half.pixels).mean()) < 0.02
    # not worth it (or not possible) below twice the target: decoded in full
    assert read_dicom(path, reduce_to=100).pixels.shape == (128, 128)


def test_reduced_decode_leaves_other_encodings_alone(tmp_path: Path) -> None:
    from pneumotriage.synth import write_study

    summary = write_study(tmp_path / "s", 1, positive_rate=0.0, size=(128, 128), seed=2, bits=16)
    image = read_dicom(summary.out / summary.images[0].path, reduce_to=32)
    assert image.pixels.shape == (128, 128) and image.transfer_syntax != "1.2.840.10008.1.2.4.50"

"""A SIIM-style study written from phantoms: JPEG Baseline DICOMs, the RLE label CSV, a sample submission and
a manifest, rendered in worker processes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pneumotriage.dicom import SYNTHETIC_MARK
from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes, atomic_write_text
from pneumotriage.labels import SIIM_SHAPE, read_rle_csv
from pneumotriage.rle import rle_decode, rle_encode
from pneumotriage.runtime import usable_cores
from pneumotriage.synth.phantom import Anatomy, lung_masks, make_phantom
from pneumotriage.version import __version__


@dataclass(frozen=True)
class StudyImage:
    image_id: str
    path: str  # relative to the study folder
    patient_id: str
    positive: bool
    side: str | None
    site: str | None
    mask_area: int
    confounders: list[str]


@dataclass
class StudySummary:
    out: Path
    labels_csv: Path
    images: list[StudyImage]

    @property
    def n_positive(self) -> int:
        return sum(i.positive for i in self.images)


def _patient_id(seed: int, index: int) -> str:
    """A UUID-shaped patient id, as SIIM's anonymised ids are, derived from the seed."""
    digest = hashlib.sha256(f"pneumotriage-synth:{seed}:{index}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def parse_size(text: str | int) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"880x1024"`` -> 880 rows by 1024 columns."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"size {text!r} is not N or ROWSxCOLS", hint="e.g. --size 1024 or --size 880x1024") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32 or max(values) > 8192:
        raise UsageError(f"size {text!r} must be N or ROWSxCOLS between 32 and 8192", hint="e.g. --size 256")
    return values[0], values[1]


#: Where the thorax sits in a typical SIIM image (normalised y0, y1, x0, x1): real outlines are mapped from this
#: box onto the phantom's own lungs, then clipped to them, so a real shape lands where a pneumothorax can be.
_SIIM_THORAX = (0.10, 0.86, 0.10, 0.90)


def _sample_shapes(
    path: Path,
) -> tuple[list[str], Callable[[str, Anatomy, tuple[int, int]], list[np.ndarray]]]:
    labels = read_rle_csv(path)
    positives = sorted(i for i, rows in labels.items() if rows)
    if not positives:
        raise UsageError(f"{path} holds no positive mask", hint="give a label file with pneumothorax outlines")

    def rows_for(image_id: str, anat: Anatomy, shape: tuple[int, int]) -> list[np.ndarray]:
        h, w = shape
        y0, y1 = anat.lung_top, anat.lung_bottom
        x0, x1 = anat.cx - anat.gap - anat.lung_width, anat.cx + anat.gap + anat.lung_width
        sy0, sy1, sx0, sx1 = _SIIM_THORAX
        yn = (np.arange(h) + 0.5) / h
        xn = (np.arange(w) + 0.5) / w
        # Nearest-neighbour, pointwise sampling: the OR of the mapped rows equals the mapped union, so the CSV
        # rows and the mask stay consistent.
        ri = np.clip((sy0 + (yn - y0) / (y1 - y0) * (sy1 - sy0)) * SIIM_SHAPE[0], 0, SIIM_SHAPE[0] - 1)
        ci = np.clip((sx0 + (xn - x0) / (x1 - x0) * (sx1 - sx0)) * SIIM_SHAPE[1], 0, SIIM_SHAPE[1] - 1)
        left, right = lung_masks(anat, shape)
        lungs = left | right
        grid = np.ix_(ri.astype(np.int64), ci.astype(np.int64))
        mapped = (rle_decode(r, *SIIM_SHAPE, relative=labels.relative)[grid] & lungs for r in labels[image_id])
        return [m for m in mapped if m.sum() >= 4]

    return positives, rows_for


def _dataset(
    pixels: np.ndarray,
    *,
    photometric: str,
    bits: int,
    uids: dict[str, str],
    patient: dict[str, str],
    spacing: float,
    study_day: date,
    index: int,
    view: str,
) -> Dataset:
    h, w = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(uids["sop"])
    meta.ImplementationVersionName = f"PNEUMOTRIAGE_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyDate = study_day.strftime("%Y%m%d")
    ds.StudyTime = f"{(index * 7) % 24:02d}{(index * 13) % 60:02d}00"
    ds.AccessionNumber = f"SYN{int(uids['sop'].split('.')[-1]) % 10**9:09d}"
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.InstitutionName = "pneumotriage synthetic phantom"
    ds.SeriesDescription = f"view: {view}"
    ds.ImageComments = SYNTHETIC_MARK  # what training reads: a model trained on these is never clinical
    ds.PatientName = patient["id"]
    ds.PatientID = patient["id"]
    ds.PatientSex = patient["sex"]
    ds.PatientAge = patient["age"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = h, w
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    top = (1 << bits) - 1
    stored = np.rint(pixels * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits == 8:
        buf = io.BytesIO()
        Image.fromarray(stored.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=92)
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated = 8
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.BitsAllocated = 16
        ds.WindowCenter = f"{(top + 1) // 2}"
        ds.WindowWidth = f"{top + 1}"
        ds.PixelData = stored.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    return ds


@dataclass
class _Job:
    """Everything one image needs, its random stream included (drawn in order by :func:`write_study`)."""

    index: int
    size: tuple[int, int]
    positive: bool
    rng: np.random.Generator
    anatomy: Anatomy
    region_rows: Sequence[np.ndarray] | None
    ptx_scale: float
    uids: dict[str, str]
    patient: dict[str, str]
    photometric: str
    bits: int


def synth_workers(n: int) -> int:
    """Worker processes worth starting for ``n`` images: the CPUs, at most 4, from 32 images up (fewer images do
    not repay starting the processes)."""
    return min(usable_cores(), 4) if n >= 32 else 1


def _render(job: _Job) -> tuple[Path, bytes, list[str], StudyImage]:
    """One image: the phantom, its DICOM bytes, its label CSV rows and its manifest entry."""
    rng = job.rng
    phantom = make_phantom(
        job.size,
        positive=job.positive,
        rng=rng,
        anatomy=job.anatomy,
        region_rows=job.region_rows,
        ptx_scale=job.ptx_scale,
    )
    uids, patient = job.uids, job.patient
    spacing = float(rng.choice([0.139, 0.143, 0.168, 0.194311])) * SIIM_SHAPE[0] / max(job.size)
    ds = _dataset(
        phantom.image,
        photometric=job.photometric,
        bits=job.bits,
        uids=uids,
        patient=patient,
        spacing=spacing,
        study_day=date(2019, 1, 1) + timedelta(days=int(rng.integers(0, 700))),
        index=job.index,
        view=str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
    )
    rel = Path(uids["study"]) / uids["series"] / f"{uids['sop']}.dcm"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    if phantom.rows:
        # SIIM form: one row per annotated region, a leading space before each run-length string.
        lines = [f"{uids['sop']}, {rle_encode(r)}" for r in phantom.rows]
    else:
        lines = [f"{uids['sop']},-1"]
    image = StudyImage(
        image_id=uids["sop"],
        path=str(rel),
        patient_id=patient["id"],
        positive=bool(phantom.mask.any()),
        side=phantom.side,
        site=phantom.site,
        mask_area=int(phantom.mask.sum()),
        confounders=phantom.confounders,
    )
    return rel, buf.getvalue(), lines, image


def _refuse_a_study_in(out: Path) -> None:
    """Refuse ``out`` when it holds a study already (labels, a manifest, or DICOM files)."""
    if not out.is_dir():
        return
    held = [name for name in ("train-rle.csv", "manifest.json") if (out / name).exists()]
    dicoms = next((p for p in out.rglob("*.dcm")), None)
    if held or dicoms is not None:
        what = ", ".join(held + (["DICOM files"] if dicoms is not None else []))
        raise UsageError(
            f"{out} already holds a study ({what}): a new one there would leave labels for some images only",
            hint="write into a new or empty folder, or remove the old study first",
        )


def write_study(
    out: str | Path,
    n: int,
    *,
    positive_rate: float = 0.3,
    size: tuple[int, int] = SIIM_SHAPE,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    mask_shapes: str | Path | None = None,
    second_image_rate: float = 0.15,
    ptx_scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> StudySummary:
    """Write ``n`` phantom DICOMs as ``OUT/<study>/<series>/<sop>.dcm`` plus ``OUT/train-rle.csv`` (SIIM form).

    With ``workers`` > 1 the images render in that many spawned processes (:func:`synth_workers` suggests a
    number); the files do not depend on it. Spawning re-imports the calling script, so a script that passes
    ``workers`` must guard its entry point with ``if __name__ == "__main__":``; the CLI does.

    Exactly ``round(n * positive_rate)`` images are positive. A ``manifest.json`` records, per image, the
    patient, side, site, area and confounders, for tests and curious users; ``sample_submission.csv`` lists every
    ImageId with ``-1``, as the competition's sample submission does (the ``submit`` walk-through reads it).

    A folder that already holds a study (its label CSV, manifest or any DICOM) is refused: writing another one
    there would leave labels for some of its images only.
    """
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 0.0 <= positive_rate <= 1.0:
        raise UsageError(f"--positive-rate must be within 0..1, got {positive_rate}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UsageError(f"photometric {photometric!r} must be MONOCHROME1 or MONOCHROME2")
    if bits not in (8, 12, 16):
        raise UsageError(f"bits must be 8 (JPEG Baseline), 12 or 16 (native), got {bits}")
    if not 0.25 <= ptx_scale <= 4.0:
        raise UsageError(f"--ptx-scale must be within 0.25..4, got {ptx_scale}")
    out = Path(out)
    _refuse_a_study_in(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = _sample_shapes(Path(mask_shapes)) if mask_shapes is not None else None

    master = np.random.default_rng(seed)
    n_pos = int(round(n * positive_rate))
    positives = np.zeros(n, dtype=bool)
    positives[master.permutation(n)[:n_pos]] = True
    root = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, with deterministic entropy below
    csv_lines = ["ImageId, EncodedPixels"]
    images: list[StudyImage] = []
    patient_index = -1
    anatomy: Anatomy | None = None
    images_of_patient = 0
    patient: dict[str, str] = {}
    jobs: list[_Job] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        new_patient = patient_index < 0 or images_of_patient >= 2 or rng.random() >= second_image_rate
        if new_patient:
            patient_index += 1
            prng = np.random.default_rng([seed, 1_000_000 + patient_index])
            anatomy = Anatomy.sample(prng)
            patient = {
                "id": _patient_id(seed, patient_index),
                "sex": str(prng.choice(["F", "M"])),
                "age": f"{int(prng.integers(18, 90)):03d}Y",
            }
            images_of_patient = 0
            this_anatomy = anatomy
        else:
            assert anatomy is not None
            this_anatomy = anatomy.jitter(rng)
        images_of_patient += 1
        region_rows = None
        if positives[i] and shapes is not None:
            ids, rows_for = shapes
            for _ in range(20):
                region_rows = rows_for(ids[int(rng.integers(len(ids)))], this_anatomy, size)
                if region_rows:
                    break
        uids = {
            key: str(generate_uid(prefix=root, entropy_srcs=[f"{seed}", f"{i}", key]))
            for key in ("study", "series", "sop")
        }
        jobs.append(
            _Job(i, size, bool(positives[i]), rng, this_anatomy, region_rows, ptx_scale, uids, dict(patient),
                 photometric, bits)
        )  # fmt: skip
    # Each image's random stream is its own (its state is carried in the job), so rendering in worker processes
    # gives the same files as rendering here, in the same order.
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        rendered = pool.map(_render, jobs, chunksize=4)
    else:
        pool, rendered = None, map(_render, jobs)
    try:
        for job, (rel, data, lines, image) in zip(jobs, rendered, strict=True):
            atomic_write_bytes(out / rel, data)
            csv_lines.extend(lines)
            images.append(image)
            if progress is not None:
                progress(job.index + 1, n)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    labels_csv = out / "train-rle.csv"
    atomic_write_text(labels_csv, "\n".join(csv_lines) + "\n")
    manifest = {
        "generator": f"pneumotriage {__version__}",
        "seed": seed,
        "size": list(size),
        "photometric": photometric,
        "bits": bits,
        "positive_rate": positive_rate,
        "mask_shapes": str(mask_shapes) if mask_shapes is not None else None,
        "ptx_scale": ptx_scale,
        "note": "synthetic phantoms, not patient images",
        "images": [asdict(im) for im in images],
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    once = dict.fromkeys(im.image_id for im in images)  # an image's id once, in the order written
    atomic_write_text(out / "sample_submission.csv", "ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in once))
    return StudySummary(out=out, labels_csv=labels_csv, images=images)

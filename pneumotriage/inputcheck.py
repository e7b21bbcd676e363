"""Whether an image is what the models were trained on: a frontal chest radiograph, read truly.

A triage tool that ranks a CT head slice urgent, or a test pattern, or a tibia, gives a wrong answer that looks
right. Commercial pneumothorax triage devices check modality, body part and view before they flag anything; so
does the scan, from the header (:func:`check_header`, before any pixel is decoded) and from the decoded pixels
(:func:`check_pixels`). An image that fails a rule is a worklist row **not triaged**, with the rule's reason, never
urgent or routine. ``--accept RULE`` widens a rule for a user who knows their data.

What a header leaves out passes: many real exports carry no BodyPartExamined or ViewPosition (the NIH DX file in
the test data has neither), and refusing those would refuse real radiographs. What a header *says* is believed.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from pydicom.dataset import Dataset

from pneumotriage.dicom import DicomHeader
from pneumotriage.errors import UsageError

#: Each rule a user can widen with ``--accept``, and what it checks.
RULES: dict[str, str] = {
    "modality": "Modality is CR or DX, or a Secondary Capture of the chest",
    "body-part": "BodyPartExamined, where given, names the chest",
    "view": "ViewPosition, where given, is frontal (PA or AP), not lateral or oblique",
    "shape": f"the longer side is at most {1.6:g} times the shorter (chest films are 1 to 1.3)",
    "colour": "one grey channel (a colour image is a photo, a screenshot or a test pattern)",
    "orientation": "PatientOrientation, where given, is a frontal one the scan can turn upright",
    "histogram": "the pixels are not constant and spread over the grey levels as a radiograph's do",
}

#: Modalities of projection radiographs.
RADIOGRAPHY = frozenset({"CR", "DX"})
#: Modalities a Secondary Capture of a radiograph carries (SIIM's files are CR; others OT or none).
CAPTURE_MODALITIES = frozenset({"", "OT", "CR", "DX"})
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Words that name the chest in BodyPartExamined (English, and the Latin/Romance forms seen in exports).
CHEST_WORDS = ("CHEST", "THORA", "TORAX", "TORACE", "LUNG", "PECHO", "POUMON")
#: The largest ratio of the longer side to the shorter: 14 x 17 in films are 1.21, a stitched spine is over 2.
MAX_ASPECT = 1.6
#: A radiograph's grey levels spread: when the two fullest of 64 equal bins of the normalised image hold more
#: than this share of its pixels, it is a drawing, a test pattern or an image made binary by its window.
MAX_TWO_BIN_SHARE = 0.9


#: A JPEG decoder that runs out of data before the last block (a stream cut short and closed with an end marker:
#: libjpeg only warns) fills the rest of the image with the last block's value. When the bottom 1/FILLED_BAND of
#: the rows is one value that is neither black nor white (a border or a label band), the stream was cut short.
FILLED_BAND = 8


class NotTriaged(Exception):
    """Raised with the reason an image is not triaged (the caller names the file)."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        #: The header of the image refused, where it was read (its worklist row shows who and what it is).
        self.header: DicomHeader | None = None


def check_accept(accept: Collection[str]) -> tuple[str, ...]:
    """``accept`` checked against :data:`RULES` ("all" stands for every rule); unknown names list the valid."""
    names = set(accept)
    if "all" in names:
        return tuple(RULES)
    unknown = sorted(names - set(RULES))
    if unknown:
        raise UsageError(f"--accept {unknown[0]!r}: not a rule; choose from {', '.join(RULES)} or all")
    return tuple(r for r in RULES if r in names)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError, KeyError):
        return ""
    return str(value or "").strip().upper()


def check_header(ds: Dataset, header: DicomHeader, accept: Collection[str] = ()) -> None:
    """Raise :class:`NotTriaged` where the header says the image is not a frontal chest radiograph."""
    modality = _text(ds, "Modality")
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    part = _text(ds, "BodyPartExamined")
    if "modality" not in accept:
        capture = sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + ".")
        if not (modality in RADIOGRAPHY or (capture and modality in CAPTURE_MODALITIES)):
            what = f"modality {modality}" if modality else "no modality in the header"
            if capture:
                what += " (a Secondary Capture)"
            raise NotTriaged("modality", f"{what}: not a chest radiograph (CR or DX)")
    if "body-part" not in accept and part and not any(word in part for word in CHEST_WORDS):
        raise NotTriaged("body-part", f"body part examined is {part}, not the chest")
    view = _text(ds, "ViewPosition")
    if "view" not in accept and view and not view.startswith(("PA", "AP")):
        lateral = view in ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD") or "LAT" in view
        raise NotTriaged("view", f"view position {view}: {'a lateral' if lateral else 'not a frontal'} view")
    if "colour" not in accept and (
        header.samples_per_pixel != 1
        or (header.photometric or "").upper()
        not in (
            "MONOCHROME1",
            "MONOCHROME2",
        )
    ):
        raise NotTriaged("colour", f"a colour image ({header.photometric}, {header.samples_per_pixel} samples)")
    if "shape" not in accept and header.shape is not None and min(header.shape) > 0:
        rows, cols = header.shape
        if max(rows, cols) / min(rows, cols) > MAX_ASPECT:
            raise NotTriaged("shape", f"{rows} x {cols} px is not the shape of a chest radiograph")


def check_pixels(pixels: np.ndarray, notes: Collection[str], accept: Collection[str] = ()) -> None:
    """Raise :class:`NotTriaged` where the decoded image (float in [0, 1], as :func:`~pneumotriage.dicom.read_dicom`
    makes it) cannot be a radiograph read truly: constant (the reader's own "constant image" or "no finite pixel
    values"), its bottom rows filled with one grey value (:data:`FILLED_BAND`), or its grey levels crowded into two
    (:data:`MAX_TWO_BIN_SHARE`)."""
    if "histogram" in accept:
        return
    for note in ("no finite pixel values", "constant image"):
        if note in notes:
            raise NotTriaged("histogram", f"{note}: nothing to triage")
    band = pixels[-max(1, pixels.shape[0] // FILLED_BAND) :]
    lo, hi = float(band.min()), float(band.max())
    if lo == hi and 0.02 < lo < 0.98:
        raise NotTriaged(
            "histogram",
            f"its bottom {band.shape[0]} rows are all one grey value: pixel data cut short and filled by the decoder",
        )
    step = max(1, min(pixels.shape) // 256)
    sample = pixels[::step, ::step]
    counts = np.bincount(np.minimum((sample * 64).astype(np.int64).ravel(), 63), minlength=64)
    two = np.sort(counts)[-2:].sum() / max(1, sample.size)
    if two > MAX_TWO_BIN_SHARE:
        raise NotTriaged(
            "histogram", f"{two:.0%} of its pixels lie in two grey levels: not the grey levels of a radiograph"
        )


def orientation(ds: Dataset, accept: Collection[str] = ()) -> tuple[bool, bool]:
    """How to turn the image upright, from PatientOrientation (PS3.3 C.7.6.1.1.1: the patient directions of the
    image's rows and columns): (flip left-right, flip up-down). A frontal chest radiograph as read is ``L\\F`` (the
    patient's left to the right of the image, the feet down); ``R\\F`` is mirrored, ``L\\H`` upside down. Missing or
    empty: as read. A direction that is anterior/posterior (a lateral view) or rows along the body (an image turned
    by 90 degrees) raises :class:`NotTriaged`, unless "orientation" is accepted (then read as stored)."""
    try:
        value = ds.get("PatientOrientation")
    except (ValueError, TypeError, KeyError):
        value = None
    if value is None or isinstance(value, bytes):
        raw: list[str] = []
    elif isinstance(value, str):
        raw = value.split("\\")
    else:
        raw = [str(v) for v in value]
    parts = [p.strip().upper() for p in raw]
    parts = [p for p in parts if p]
    if len(parts) != 2:
        return (False, False)
    row, col = parts[0][0], parts[1][0]
    if row in "LR" and col in "FH":
        return (row == "R", col == "H")
    if "orientation" in accept:
        return (False, False)
    raise NotTriaged(
        "orientation", f"patient orientation {parts[0]}\\{parts[1]}: not a frontal image the scan can turn upright"
    )

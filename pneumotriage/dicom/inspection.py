"""A file as `pneumotriage inspect` shows it."""

from __future__ import annotations

from typing import Any

from pneumotriage.dicom.base import DicomHeader, SkippedFile
from pneumotriage.dicom.pixels import read_dicom
from pneumotriage.errors import (
    DicomError,
)


def describe(found: DicomHeader | SkippedFile, *, decode: bool = False) -> dict[str, Any]:
    """One row of `pneumotriage inspect`: what :func:`discover` found in a file (with ``decode``, the pixel data
    is decoded too, so its warnings and problems show), as plain values for a table or JSON."""
    if isinstance(found, SkippedFile):
        return {"path": str(found.path), "status": "skip", "reason": found.reason}
    h = found
    row: dict[str, Any] = {
        "path": str(h.path),
        "status": "ok" if h.usable else "skip",
        "reason": h.problem,
        "image_id": h.image_id,
        "sop_instance_uid": h.sop_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "patient_id": h.patient_id,
        "modality": h.modality,
        "view_position": h.view_position,
        "rows": h.rows,
        "columns": h.columns,
        "frames": h.frames,
        "photometric": h.photometric,
        "bits_stored": h.bits_stored,
        "transfer_syntax": h.transfer_syntax,
        "transfer_syntax_name": h.transfer_syntax_name,
        "pixel_spacing_mm": list(h.pixel_spacing_mm) if h.pixel_spacing_mm else None,
        "study_datetime": h.study_datetime.isoformat() if h.study_datetime else None,
        "warnings": list(h.warnings),
    }
    if decode and h.usable:
        try:
            image = read_dicom(h.path)
            row["warnings"] = image.warnings
        except DicomError as exc:
            row["status"], row["reason"] = "skip", exc.message
    return row

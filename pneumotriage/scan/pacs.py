"""DICOM outputs a PACS takes in: a Segmentation per outlined image and a Comprehensive SR per image.

Both reference their source image (its Study, Series and SOP Instance UIDs; the SEG also its size and pixel
spacing), so any viewer (OHIF, Weasis, a vendor PACS) shows the outline over the original and lists the findings
with the study. They are made with highdicom, the optional extra ``pneumotriage[dicom]``.

- ``OUT/dicom/<name>-seg.dcm``: a binary Segmentation with one segment "Pneumothorax" (SNOMED CT 36118008,
  property category "Morphologically abnormal structure"), the algorithm's identification (pneumotriage, its
  version, the models' names and sha256), at the source image's size.
- ``OUT/dicom/<name>-sr.dcm``: a Comprehensive SR holding a TID 1500 Measurement Report: the triage tier, the
  probability, the area in cm² where the spacing is known, the side, the plausibility flag, the models and, for a
  model that is not clinical, the statement "not for clinical use".

Their UIDs are derived from the source image's patient ID and Study, Series and SOP Instance UIDs and the models'
sha256, so scanning again gives the same object identities (a PACS replaces rather than duplicates them), and two
different patients' images that share a SOP Instance UID (a broken export) get objects of their own. The source
file is read again only if it is still the file that was scanned (the row's identity key and UIDs); a file
replaced meanwhile gets no object, never one with another patient's identity. With ``--no-phi`` the objects carry no
patient name, ID, birth date or accession number: a PACS files objects under the patient and study they name, so
such objects reach it only as unmatched orphans; use it for research exports, not for sending back to the PACS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumotriage.errors import UsageError
from pneumotriage.io import atomic_write_bytes
from pneumotriage.outlayout import OutLayout
from pneumotriage.scan.records import ImageResult
from pneumotriage.version import __version__

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from pneumotriage.scan.options import Outputs
    from pneumotriage.scan.workers import Workers

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
#: Private coding scheme of this tool's own concepts (triage tier, clinical-use statement).
SCHEME = "99PNTRG"
#: Patient and study attributes a derived object copies from its source, which must exist (Type 2: empty is
#: allowed) even where an export left them out.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
#: What ``--no-phi`` empties in the source header before an object copies from it: the attributes of the DICOM
#: PS3.15 Annex E Basic Application Level Confidentiality Profile that a derived SEG or SR copies (patient, study
#: and visit identity, dates and times, people and places); the UIDs stay, as the object must reference its image.
_PHI = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientComments",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID", "EthnicGroup",
    "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ContentDate", "ContentTime",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician", "PhysiciansOfRecord", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "StudyDescription", "AdmissionID",
    "RequestAttributesSequence", "ImageComments",
)  # fmt: skip


def require() -> None:
    """Stop with one line when highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UsageError(
            "--dicom-seg and --dicom-sr need highdicom", hint="pip install 'pneumotriage[dicom]'"
        ) from None


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["pneumotriage", *parts]))


def _identity(ds: Any, kind: str, models: list[dict[str, Any]], source: str = "") -> dict[str, Any]:
    """Series and instance identity of the ``kind`` ("seg" or "sr") object made from ``ds`` by ``models``: the
    same source and models give the same UIDs. ``source`` is who the source image is (:func:`_who`)."""
    key = "|".join(str(m["sha256"]) for m in models)
    return {
        "series_instance_uid": _uid(ds.StudyInstanceUID, f"{kind}-series", key),
        "series_number": SEG_SERIES_NUMBER if kind == "seg" else SR_SERIES_NUMBER,
        "sop_instance_uid": _uid(ds.SOPInstanceUID, kind, key, source),
        "instance_number": 1,
    }


def _who(ds: Dataset) -> str:
    """The source image's patient, study and series: what tells apart two images that share a SOP Instance UID."""
    return "|".join(str(ds.get(k, "")) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"))


class SourceChanged(Exception):
    """The source file is no longer the file that was scanned."""


def _source(result: ImageResult, no_phi: bool) -> tuple[Dataset, str]:
    """The source image's header, with the Type 2 attributes a derived object copies present (empty when
    missing), and without patient identifiers under ``no_phi``; and who it is (:func:`_who`, read before they
    go). Raises :class:`SourceChanged` where the file is not the one scanned (its identity key, or its UIDs)."""
    import pydicom

    from pneumotriage.io import file_key

    path = Path(result.path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    # The key after the read: a file replaced before or while it was read has another inode, ctime or size.
    if file_key(path) != result.key:
        raise SourceChanged("the file changed since it was scanned")
    for keyword, value in (
        ("SOPInstanceUID", result.sop_instance_uid),
        ("StudyInstanceUID", result.study_instance_uid),
    ):
        if value is not None and str(ds.get(keyword, "")).strip() != value:
            raise SourceChanged(f"its {keyword} is not the one scanned")
    who = _who(ds)
    for keyword in _TYPE2:
        if keyword not in ds or ds.get(keyword) is None:
            setattr(ds, keyword, "")
    if no_phi:
        for keyword in _PHI:
            if keyword in _TYPE2:
                setattr(ds, keyword, "")  # present and empty, as the derived object needs it
            elif keyword in ds:
                delattr(ds, keyword)
    return ds, who


def _algorithm(models: list[dict[str, Any]]) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    parameters = {str(m["role"]): f"{m['name']} sha256 {m['sha256']}" for m in models}
    return hd.AlgorithmIdentificationSequence(
        name="pneumotriage",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        source="pneumotriage",
        parameters=parameters,
    )


def write_seg(ds: Any, mask: np.ndarray, out: Path, models: list[dict[str, Any]], who: str = "") -> None:
    """A binary Segmentation of ``mask`` (the source image's size) over the image whose header (:func:`_source`)
    is ``ds``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if tuple(mask.shape) != (int(ds.Rows), int(ds.Columns)):
        raise UsageError(f"{ds.filename}: the mask is {mask.shape}, the image {ds.Rows}x{ds.Columns}")
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Pneumothorax",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(models),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a one-component patient name (anonymised exports) is fine
        seg = hd.seg.Segmentation(
            source_images=[ds],
            pixel_array=mask[None].astype(bool),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            **_identity(ds, "seg", models, who),
            series_description="pneumotriage pneumothorax outline",
            manufacturer="pneumotriage",
            manufacturer_model_name="pneumotriage",
            software_versions=__version__,
            device_serial_number="0",
        )
    # A projection radiograph has no patient-based frame of reference: Patient Orientation (Type 2C) stands in.
    seg.PatientOrientation = ds.get("PatientOrientation", "")
    _save(seg, out)


def write_sr(ds: Any, result: ImageResult, out: Path, models: list[dict[str, Any]], who: str = "") -> None:
    """A Comprehensive SR (TID 1500 Measurement Report) of one image's triage: tier, probability, area, side,
    flag, models, and "not for clinical use" where a model is not clinical."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    own = hd.sr.CodedConcept
    evaluations = [
        hd.sr.QualitativeEvaluation(
            own("TIER", SCHEME, "Triage priority"), own(result.tier.upper(), SCHEME, result.tier.capitalize())
        )
    ]
    if result.side:
        side = {"left": codes.SCT.Left, "right": codes.SCT.Right, "both": codes.SCT.Bilateral}[result.side]
        evaluations.append(hd.sr.QualitativeEvaluation(codes.SCT.Laterality, side))
    if result.flag:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                # A Code Meaning is encoded in the SR's character set: the flag's dash written as ASCII
                own("FLAG", SCHEME, "Plausibility"),
                own("IMPL", SCHEME, result.flag.replace("\u2014", "-")[:64]),
            )
        )
    if not all(m["clinical"] for m in models):
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                own("USE", SCHEME, "Intended use"), own("NOTCLIN", SCHEME, "Not for clinical use")
            )
        )
    measurements = []
    if result.probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=own("PROB", SCHEME, "Pneumothorax probability"),
                value=float(result.probability),
                unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            )
        )
    if result.area_cm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=float(result.area_cm2),
                unit=hd.sr.CodedConcept("cm2", "UCUM", "square centimeter"),
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(ds.SOPInstanceUID, "track", who), identifier="triage"),
        finding_type=hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax"),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name="pneumotriage",
            version=__version__,
            parameters=[f"{m['role']} {m['name']} sha256 {m['sha256']}" for m in models],
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device"), name="pneumotriage", manufacturer_name="pneumotriage", model_name=__version__
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.ComprehensiveSR(
            evidence=[ds],
            content=report,
            **_identity(ds, "sr", models, who),
            manufacturer="pneumotriage",
            series_description=SR_SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,
            is_verified=False,  # VerificationFlag UNVERIFIED: no physician has checked it
        )
    _as_ai_result(sr)
    _save(sr, out)


#: What a PACS shows of the SR series in its study browser: what it is, and that no one has verified it.
SR_SERIES_DESCRIPTION = "AI triage (pneumotriage), unverified: not a diagnosis"


def _as_ai_result(dataset: Dataset) -> None:
    """What the IHE AI Results profile asks of an object an algorithm made, beyond what highdicom writes: the
    algorithm as Contributing Equipment with the purpose "Processing Equipment" (DCM 109102) and a description
    saying it is unverified, and the declaration of this tool's private coding scheme (PS3.3 C.12.1.1.2: a
    scheme not in the standard's registry is identified in Coding Scheme Identification Sequence)."""
    from datetime import datetime

    from pydicom.dataset import Dataset

    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109102", "DCM", "Processing Equipment"
    equipment = Dataset()
    equipment.Manufacturer = "pneumotriage"
    equipment.ManufacturerModelName = "pneumotriage"
    equipment.SoftwareVersions = __version__
    equipment.PurposeOfReferenceCodeSequence = [purpose]
    equipment.ContributionDateTime = datetime.now().strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = "AI triage of pneumothorax; not verified by a physician"
    dataset.ContributingEquipmentSequence = [equipment]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "pneumotriage triage concepts"
    scheme.CodingSchemeResponsibleOrganization = "pneumotriage"
    dataset.CodingSchemeIdentificationSequence = [scheme]


def write_kos(results: list[ImageResult], out: Path, models: list[dict[str, Any]], no_phi: bool = False) -> str | None:
    """A Key Object Selection (document title "Of Interest", DCM 113000) that marks a study's urgent images for
    the worklists and viewers that read one, with the caution that no physician has verified it; written to
    ``out``. Its UIDs come from the study, the images marked and the models, so marking the same images again
    replaces it. Returns its SOP Instance UID, or None when the study has no urgent image (or none reads back as
    the file that was scanned)."""
    import highdicom as hd

    sources = []
    for r in results:
        if r.tier == "urgent" and r.status == "ok":
            try:
                sources.append(_source(r, no_phi)[0])
            except (SourceChanged, OSError):
                continue  # a file replaced since: never marked
    if not sources:
        return None
    first = sources[0]
    key = "|".join([*(str(m["sha256"]) for m in models), *sorted(str(d.SOPInstanceUID) for d in sources)])
    content = hd.ko.KeyObjectSelection(
        document_title=hd.sr.CodedConcept("113000", "DCM", "Of Interest"),
        referenced_objects=sources,
        description="pneumotriage AI triage: urgent, possible pneumothorax; unverified, not a diagnosis",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=sources,
            content=content,
            series_instance_uid=_uid(first.StudyInstanceUID, "kos-series", key),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=_uid(first.StudyInstanceUID, "kos", key),
            instance_number=1,
            manufacturer="pneumotriage",
        )
    kos.SeriesDescription = "AI triage (pneumotriage): urgent images, unverified"
    _as_ai_result(kos)
    _save(kos, out)
    return str(kos.SOPInstanceUID)


def _save(dataset: Dataset, out: Path) -> None:
    import io

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(out, buffer.getvalue(), durable=False)


def dicom_task(
    result: ImageResult, out: Path, models: list[dict[str, Any]], seg: bool, sr: bool, no_phi: bool
) -> str | None:
    """Write one image's SEG (if outlined and ``seg``) and SR (if ``sr``); an error line instead of raising."""
    from PIL import Image

    name = result.file_stem or result.image_id
    try:
        ds, who = _source(result, no_phi)  # its header, read once for both objects
        if seg and result.mask_file:
            with Image.open(out / result.mask_file) as picture:
                mask = np.asarray(picture.convert("L")) >= 128
            write_seg(ds, mask, OutLayout(out).dicom_object(name, "seg"), models, who)
        if sr:
            write_sr(ds, result, OutLayout(out).dicom_object(name, "sr"), models, who)
    except SourceChanged as exc:
        for kind in ("seg", "sr"):  # an object of an earlier scan of this file is not this row's either
            OutLayout(out).dicom_object(name, kind).unlink(missing_ok=True)
        return f"{result.path}: no DICOM output: {exc} (scan it again)"
    except Exception as exc:  # a source that vanished or does not parse since: the rest go on
        return f"{result.path}: no DICOM output ({type(exc).__name__}: {exc})"
    return None


def write_dicom(
    workers: Workers, out: Path, ranked: Sequence[ImageResult], models: list[dict[str, Any]], outputs: Outputs
) -> list[str]:
    """The DICOM SEG and SR objects of every readable image, made in the workers once the tiers are known;
    returns a note for the images whose objects could not be made (their rows stand)."""
    rows = [r for r in ranked if r.status == "ok"]
    OutLayout(out).dicom.mkdir(exist_ok=True)
    n = len(rows)
    failed = [
        e
        for e in workers.map(
            dicom_task,
            rows,
            [out] * n,
            [models] * n,
            [outputs.dicom_seg] * n,
            [outputs.dicom_sr] * n,
            [outputs.no_phi] * n,
        )
        if e
    ]
    if not failed:
        return []
    return [f"{len(failed)} image(s) got no DICOM SEG/SR, e.g. {failed[0]}"]

"""Results back where readers look: the study's DICOM SR (and SEG of an outlined image) sent by C-STORE to a PACS
node (:class:`Destination`) or by STOW-RS to a DICOMweb server (:class:`StowDestination`), with retries and
back-off while it is down (the caller's). Objects carry UIDs derived from their source, so sending one
again replaces rather than duplicates it: a resend after a crash is harmless, and the inbox's record of what was
acknowledged keeps it from happening at all in the normal course.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumotriage.errors import PneumotriageError, UsageError

#: Statuses a C-STORE SCP answers that mean "stored" (success, and the warnings of PS3.4 B.2.3: coerced, elements
#: discarded, data set does not match the SOP class).
STORED = {0x0000, 0xB000, 0xB007, 0xB006}
_DESTINATION = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})")


class SendError(PneumotriageError):
    """The destination could not be reached, refused the association, or did not store an object."""


@dataclass(frozen=True)
class Destination:
    """A DICOM node results are sent to: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        found = _DESTINATION.fullmatch(text.strip())
        if found is None or not 0 < int(found["port"]) <= 65535:
            raise UsageError(f"--send-to {text!r}: give AE@host:port, e.g. ORTHANC@127.0.0.1:4242")
        return cls(found["ae"].strip(), found["host"], int(found["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, files: Sequence[Path], *, calling: str = "PNEUMOTRIAGE") -> list[str]:
        return send(files, self, calling=calling)


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server results are stored on by STOW-RS: its base URL (Orthanc's: ``http://host:8042/dicom-web``)."""

    url: str

    @classmethod
    def parse(cls, text: str) -> StowDestination:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text.strip()):
            raise UsageError(f"--stow {text!r}: give the DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
        return cls(text.strip().rstrip("/"))

    def __str__(self) -> str:
        return self.url

    def send(self, files: Sequence[Path], *, calling: str = "PNEUMOTRIAGE", timeout_s: float = 30.0) -> list[str]:
        """STOW-RS ``files`` in one request; the SOP Instance UIDs the server reports stored. Raises
        :class:`SendError` when it cannot be reached or fails any of them."""
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        datasets = [pydicom.dcmread(f) for f in files]
        if not datasets:
            return []
        client = DICOMwebClient(url=self.url, timeout=timeout_s)
        try:
            answer = client.store_instances(datasets)
        except (requests.RequestException, OSError) as exc:
            raise SendError(f"{self} could not be reached ({type(exc).__name__})", hint="results stay queued") from None
        failed = [str(item.ReferencedSOPInstanceUID) for item in answer.get("FailedSOPSequence", [])]
        stored = [str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])]
        if failed:
            error = SendError(f"{self} did not store {len(failed)} of {len(datasets)} objects", hint="sent again")
            error.stored = stored  # type: ignore[attr-defined]
            raise error
        return stored


def send(
    files: Sequence[Path], to: Destination, *, calling: str = "PNEUMOTRIAGE", timeout_s: float = 30.0
) -> list[str]:
    """C-STORE ``files`` in one association; returns the SOP Instance UIDs stored, in order. Raises
    :class:`SendError` when the destination cannot be reached or does not store one of them (those before it are
    stored and returned on the error as ``stored``)."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    if not datasets:
        return []
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in dict.fromkeys((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(to.host, to.port, ae_title=to.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached"
        raise SendError(f"{to} {why}", hint="results stay queued and are sent when it answers")
    stored: list[str] = []
    try:
        for path, ds in zip(files, datasets, strict=True):
            status: Any = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in STORED:
                error = SendError(
                    f"{to} did not store {path.name} (status {'none' if code is None else hex(code)})",
                    hint="results stay queued and are sent again",
                )
                error.stored = stored  # type: ignore[attr-defined]
                raise error
            stored.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return stored

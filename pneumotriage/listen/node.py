"""The DICOM node: a storage SCP (pynetdicom) that answers C-ECHO and C-STORE for the radiograph SOP classes the
scan reads, writes each instance into the durable inbox before it answers success, and refuses what it must:

- other SOP classes: their presentation contexts are not accepted at association (the sender's status says so);
- calling AE titles not on ``--allow`` and hosts not on ``--allow-host``: the association is rejected ("calling
  AE title not recognised", permanent);
- more than ``--max-associations`` at once, or any while the free disk space is under ``--min-free``: rejected as
  "local limit exceeded" (transient: the sender retries later). An instance that cannot be written durably is
  answered "out of resources" (0xA700), never success: nothing acknowledged is ever lost.

pynetdicom negotiates an association in its own thread and reads the AE's limits there; the node's AE answers
those reads for the association asking (its peer's host, the disk at that moment).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pneumotriage.errors import UsageError
from pneumotriage.listen.inbox import Inbox, free_bytes, plain_uid

#: The image storage SOP classes the node accepts: what the scan reads (PS3.4 B.5).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
VERIFICATION = "1.2.840.10008.1.1"
#: C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: An AE title no requestor can have (17 characters: titles are 16 at most), used to reject a host not allowed.
_NOBODY = "#not-an-ae-title#"


def require() -> Any:
    """pynetdicom, or a one-line error naming the extra."""
    try:
        import pynetdicom
    except ImportError:
        raise UsageError(
            "listening for DICOM needs pynetdicom", hint="install the extra: pip install 'pneumotriage[pacs]'"
        ) from None
    return pynetdicom


@dataclass(frozen=True)
class NodeOptions:
    """Who the node is and whom it serves."""

    ae_title: str = "PNEUMOTRIAGE"
    host: str = "127.0.0.1"
    port: int = 11112
    #: Calling AE titles allowed to associate; empty: any.
    allow: tuple[str, ...] = ()
    #: Peer hosts (IP addresses) allowed to associate; empty: any.
    allow_hosts: tuple[str, ...] = ()
    max_associations: int = 10
    #: Free bytes under which new associations are refused.
    min_free: int = 1 << 30

    def check(self) -> None:
        if not 1 <= len(self.ae_title.strip()) <= 16:
            raise UsageError(f"--ae-title {self.ae_title!r}: give 1 to 16 characters")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: give 0 to 65535")
        if not 1 <= self.max_associations <= 1000:
            raise UsageError(f"--max-associations {self.max_associations}: give 1 to 1000")
        for title in self.allow:
            if not 1 <= len(title.strip()) <= 16:
                raise UsageError(f"--allow {title!r}: an AE title has 1 to 16 characters")


def _node_ae(pynetdicom: Any, options: NodeOptions, inbox: Inbox) -> Any:
    """An AE whose association limits are asked per association: the disk and the peer's host decide."""

    class NodeAE(pynetdicom.AE):  # type: ignore[misc]
        @property
        def maximum_associations(self) -> int:
            if free_bytes(inbox.root) < options.min_free:
                return 0  # every request is over the limit: rejected as transient, the sender retries
            return options.max_associations

        @maximum_associations.setter
        def maximum_associations(self, value: int) -> None:
            pass  # the node's own limit, above

        @property
        def require_calling_aet(self) -> list[str]:
            peer = getattr(getattr(threading.current_thread(), "requestor", None), "address", None)
            if options.allow_hosts and peer not in options.allow_hosts:
                return [_NOBODY]  # no title matches: rejected, "calling AE title not recognised"
            return list(options.allow)

        @require_calling_aet.setter
        def require_calling_aet(self, value: list[str]) -> None:
            pass

    return NodeAE(ae_title=options.ae_title)


class StorageNode:
    """The running SCP. ``on_stored(study)`` is called after each instance is on disk."""

    def __init__(self, options: NodeOptions, inbox: Inbox, on_stored: Callable[[str], None]) -> None:
        options.check()
        pynetdicom = require()
        self.options, self.inbox, self.on_stored = options, inbox, on_stored
        ae = _node_ae(pynetdicom, options, inbox)
        ae.add_supported_context(VERIFICATION)
        for sop_class in IMAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, pynetdicom.ALL_TRANSFER_SYNTAXES)
        self._ae = ae
        handlers = [(pynetdicom.evt.EVT_C_STORE, self._store)]
        self._server = ae.start_server((options.host, options.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])  # the port asked for, or the one given for 0

    def _store(self, event: Any) -> int:
        sop = plain_uid(event.request.AffectedSOPInstanceUID)
        try:
            study = plain_uid(event.dataset.StudyInstanceUID)
        except (AttributeError, ValueError, TypeError, KeyError):
            study = None
        if sop is None or study is None:
            return CANNOT_UNDERSTAND  # no usable Study or SOP Instance UID: it could not be filed
        if free_bytes(self.inbox.root) < self.options.min_free:
            return OUT_OF_RESOURCES
        try:
            self.inbox.store(study, sop, event.encoded_dataset())
        except OSError:
            return OUT_OF_RESOURCES  # not on disk: never answered as stored
        self.on_stored(study)
        return SUCCESS

    def close(self) -> None:
        self._server.shutdown()

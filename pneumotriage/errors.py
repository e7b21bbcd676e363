"""The exceptions the library raises.

Every error derives from :class:`PneumotriageError` and carries the file it concerns and what the user can
do about it, so the CLI can print one line and a batch can record it against the file and go on.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The command line's exit codes; :data:`EXIT_MEANINGS` says what each means (README lists the same)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NO_WEIGHT = 3
    INPUTS_FAILED = 4
    INTERRUPTED = 130


EXIT_MEANINGS = {
    ExitCode.OK: "all went well",
    ExitCode.ERROR: "an error stopped the command (a damaged checkpoint, an output that cannot be written)",
    ExitCode.USAGE: "usage error (an option out of range, an `--out` that is a file)",
    ExitCode.NO_WEIGHT: "a weight cannot be had (missing, or not downloadable: offline, server down)",
    ExitCode.INPUTS_FAILED: "some DICOM inputs could not be used (the rest were processed)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); what was finished is kept",
}


class PneumotriageError(Exception):
    """Base class: ``str(err)`` is one line naming the file, the problem and the next step."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.message = message
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class UsageError(PneumotriageError):
    """The arguments given cannot work (bad option value, missing folder)."""

    exit_code = ExitCode.USAGE


class OutputError(PneumotriageError):
    """An output could not be written: a full disk, a read-only or vanished folder. What was finished is kept."""


class DicomError(PneumotriageError):
    """A file could not be turned into an image."""


class NotDicomError(DicomError):
    """The file is not DICOM (no preamble and no recognisable data set)."""


class NoPixelDataError(DicomError):
    """The DICOM file holds no image (a report, a structured document, a header-only object)."""


class UnsupportedTransferSyntaxError(DicomError):
    """The pixel data is compressed with a codec no installed package decodes."""


class CorruptPixelDataError(DicomError):
    """The pixel data is truncated or does not decode."""


class LabelError(PneumotriageError):
    """A label CSV or run-length string is malformed."""


class MissingLabelsError(LabelError, UsageError):
    """The label CSV given is not there or cannot be opened: a usage error (exit 2), as a missing input folder is."""


class RleError(LabelError):
    """A run-length string is malformed: odd count, negative value, out of bounds or overlapping runs."""

"""The scan: triage folders of chest radiographs, one stage per module, in pipeline order.

- :mod:`~pneumotriage.scan.discover`: walk the inputs in a thread; regular files only, streamed as found.
- :mod:`~pneumotriage.scan.read`: parse a file's header and pixel bytes (in a worker); settle what a header can
  get wrong before any pixel is allocated.
- :mod:`~pneumotriage.scan.decode`: pixels to the models' inputs, in a worker into a shared slot, or for JPEG
  Baseline on a GPU in batches (nvJPEG).
- :mod:`~pneumotriage.scan.classify`: model set-up for inference, and the classifier.
- :mod:`~pneumotriage.scan.gate`: which images go on to the segmenter.
- :mod:`~pneumotriage.scan.segment`: probability maps for those.
- :mod:`~pneumotriage.scan.finish`: post-process, encode and write each image's files (in a worker).
- :mod:`~pneumotriage.scan.journal`: each finished row appended, for resuming.
- :mod:`~pneumotriage.scan.tiers`: tiers and worklist order.
- :mod:`~pneumotriage.scan.outputs` and :mod:`~pneumotriage.scan.report`: worklist, submission, report.

:mod:`~pneumotriage.scan.engine` wires them (:func:`run`), :mod:`~pneumotriage.scan.workers` holds the worker
processes, :mod:`~pneumotriage.scan.options` what the user chose and what ``auto`` resolved to.
The library never prints: progress goes to the ``progress`` callback.
"""

from pneumotriage.scan.engine import run
from pneumotriage.scan.options import ScanOptions, scan_thresholds
from pneumotriage.scan.records import TIERS, ImageResult, ScanSummary

__all__ = ["TIERS", "ImageResult", "ScanOptions", "ScanSummary", "run", "scan_thresholds"]

"""The scan: triage folders of chest radiographs, one stage per module, in pipeline order.

- :mod:`~pneumotriage.scan.discover`: walk the inputs in a thread; regular files only, streamed as found.
- :mod:`~pneumotriage.scan.read`: parse a file's header and pixel bytes (in a worker); settle what a header can
  get wrong before any pixel is allocated.
- :mod:`~pneumotriage.scan.decode`: pixels to the models' inputs, in a worker into a shared slot, or for JPEG
  Baseline on a GPU in batches (nvJPEG).
- :mod:`~pneumotriage.scan.stream`: decoded batches from a stream of files, in the order found.
- :mod:`~pneumotriage.scan.infer`: model set-up for inference; the classifier and the segmenter on a batch.
- :mod:`~pneumotriage.scan.gate`: which images go on to the segmenter.
- :mod:`~pneumotriage.scan.finish`: post-process, encode and write each image's files (in a worker).
- :mod:`~pneumotriage.scan.journal`: each finished row appended, for resuming.
- :mod:`~pneumotriage.scan.tiers`: tiers and worklist order.
- :mod:`~pneumotriage.scan.outputs` and :mod:`~pneumotriage.scan.report`: worklist, submission, report.

:mod:`~pneumotriage.scan.engine` wires them (:func:`run`), :mod:`~pneumotriage.scan.workers` holds the worker
processes, :mod:`~pneumotriage.scan.options` what the user chose and what ``auto`` resolved to;
:mod:`~pneumotriage.scan.shards`, :mod:`~pneumotriage.scan.merge` and :mod:`~pneumotriage.scan.torchrun` split a
scan over processes and merge it back. The library never prints: progress goes to the ``progress`` callback.

What the rest of the package (and the benchmarks) use is named here, in ``__all__``, and imported from here:
``tests/test_layout.py`` fails on an import of a scan module's own names from outside the package.
"""

from pneumotriage.scan import torchrun
from pneumotriage.scan.decode import turned
from pneumotriage.scan.discover import Found
from pneumotriage.scan.engine import run
from pneumotriage.scan.infer import choose_backends, classify, prepare_models, segment
from pneumotriage.scan.merge import ShardsMissing, merge_shards
from pneumotriage.scan.options import (
    Decisions,
    Execution,
    Outputs,
    Plan,
    ScanOptions,
    cpu_batch,
    plan_for,
    scan_thresholds,
)
from pneumotriage.scan.outdir import journaled
from pneumotriage.scan.outputs import (
    absolute_rle,
    by_image_id,
    clinical_notes,
    summarise,
    worklist_document,
    worklist_rows,
    write_outputs,
)
from pneumotriage.scan.pacs import write_kos
from pneumotriage.scan.records import TIERS, ImageResult, ScanSummary, row_from
from pneumotriage.scan.shards import Shard
from pneumotriage.scan.stream import decoded_batches, model_inputs
from pneumotriage.scan.tiers import rank, reason_of
from pneumotriage.scan.workers import Workers, decode_task

__all__ = [
    "TIERS",
    "Found",
    "ImageResult",
    "Plan",
    "ScanOptions",
    "Decisions",
    "Execution",
    "Outputs",
    "ScanSummary",
    "Shard",
    "ShardsMissing",
    "Workers",
    "absolute_rle",
    "by_image_id",
    "choose_backends",
    "classify",
    "clinical_notes",
    "classify",
    "cpu_batch",
    "decode_task",
    "decoded_batches",
    "journaled",
    "merge_shards",
    "model_inputs",
    "plan_for",
    "prepare_models",
    "rank",
    "reason_of",
    "row_from",
    "run",
    "scan_thresholds",
    "segment",
    "summarise",
    "torchrun",
    "turned",
    "worklist_document",
    "worklist_rows",
    "write_kos",
    "write_outputs",
]

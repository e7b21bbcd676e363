"""Synthetic chest-radiograph phantoms with and without pneumothorax, written as a SIIM-style study.

The phantom is a density map built from simple anatomy: a soft-tissue body with fall-off towards its edges, two
lungs (apex, lateral border, diaphragm domes), mediastinum and spine, heart, clavicles, posterior and anterior
ribs with bright cortices, branching pulmonary vessels that taper from the hila, and fine parenchymal texture.

A pneumothorax is a peripheral region of one lung (apical, lateral or basal) where lung markings vanish and the
air is slightly more lucent, bounded on the lung side by the thin bright visceral pleural line. Procedural
regions are crescents hugging the chest wall; with ``mask_shapes`` the regions are real SIIM outlines.

Confounders appear in positives and negatives at the same rate, so they carry no label information: skin folds
(a step edge with markings continuing across it) and line-like edges (tubes, the medial scapular border).
Everything is deterministic given the seed.

The phantom (:mod:`~pneumotriage.synth.phantom`: anatomy, pathology and confounders, one generator whose parts
share a coordinate frame and random streams; golden figures in the tests pin its output) and the study written
from phantoms (:mod:`~pneumotriage.synth.study`: DICOMs, labels, manifest).
"""

from pneumotriage.synth.phantom import Anatomy, Phantom, make_phantom
from pneumotriage.synth.study import StudyImage, StudySummary, _dataset, parse_size, synth_workers, write_study

__all__ = [
    "Anatomy",
    "Phantom",
    "StudyImage",
    "StudySummary",
    "_dataset",
    "make_phantom",
    "parse_size",
    "synth_workers",
    "write_study",
]

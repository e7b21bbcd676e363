"""The scan's outputs besides the report: worklist.json without PHI, safe file names, the patient's side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import scan_args
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.scan.discover import safe_name
from pneumotriage.scan.finish import patient_side
from pneumotriage.synth import StudySummary


def test_no_phi_and_json(scan_input: Path, models: dict[str, Path], tmp_path: Path, study: StudySummary) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*scan_args(scan_input, out, models), "--no-phi", "--json"])
    assert result.exit_code == 4
    document = json.loads(result.stdout)
    assert len(document["worklist"]) == 13 and "patient_id" not in document["worklist"][0]
    patients = {im.patient_id for im in study.images}
    for name in ("worklist.csv", "worklist.json", "report.html", "submission.csv"):
        # Embedded pictures are base64: any three letters turn up there by chance. The text is what counts.
        text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", (out / name).read_text())
        assert not any(p in text for p in patients), name
        assert "SYN" not in text  # accession numbers of the phantoms
    # What a scan writes at the top of --out is what the layout names (and a later walk of it passes over).
    from pneumotriage.outlayout import OUTPUTS

    assert {p.name for p in out.iterdir()} <= OUTPUTS


def test_safe_names() -> None:
    taken: set[str] = set()
    assert safe_name("../../etc/passwd", taken) == "etc_passwd"
    assert safe_name("a/b", taken) == "a_b"
    second = safe_name("a:b", taken)
    assert second.startswith("a_b-") and second != "a_b"
    assert safe_name("...", taken) == "image"
    assert all("/" not in n and not n.startswith(".") for n in taken)


def test_patient_side() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 1:3] = True  # image left = patient's right
    assert patient_side(mask) == "right"
    assert patient_side(mask[:, ::-1]) == "left"
    assert patient_side(mask | mask[:, ::-1]) == "both"
    assert patient_side(np.zeros((4, 4), dtype=bool)) is None


def test_a_rows_fields_have_one_definition_that_every_list_follows() -> None:
    """The worklist's identity and PHI fields are defined once (the header's identity, the row's field metadata);
    the CSV's columns, the report's columns and the SEG/SR's PHI attributes must keep up with them."""
    from dataclasses import fields

    from pneumotriage.dicom import ROW_IDENTITY
    from pneumotriage.scan.outputs import WORKLIST_FIELDS
    from pneumotriage.scan.pacs import _PHI
    from pneumotriage.scan.records import PHI_FIELDS, ImageResult
    from pneumotriage.scan.report import _COLUMNS, _COMPACT, _WHEN_FILLED

    row_fields = {f.name for f in fields(ImageResult)}
    assert set(ROW_IDENTITY) <= row_fields, "a header field a row does not have"
    assert set(ROW_IDENTITY) <= set(WORKLIST_FIELDS), "a header field the worklist does not list"
    assert {"patient_id", "accession", "study_datetime"} <= set(PHI_FIELDS) <= set(WORKLIST_FIELDS)
    shown = [key for key, _, _ in _COLUMNS]
    assert set(shown) <= set(WORKLIST_FIELDS), "the report shows a column the worklist does not have"
    assert set(_COMPACT) | set(_WHEN_FILLED) <= set(shown)
    # What a row holds from a header's PHI is also emptied in the headers a SEG or SR copies with --no-phi.
    keywords = {k for f in fields(ImageResult) for k in f.metadata.get("phi", ())}
    assert keywords and keywords <= set(_PHI)
    # Every row field is in the worklist, or is bookkeeping the worklist leaves out on purpose.
    internal = {"segmented", "rows", "columns", "rle", "key", "file_stem", "seq"}
    assert row_fields - internal <= set(WORKLIST_FIELDS)


def test_the_indented_json_is_byte_for_byte_jsons_own(tmp_path: Path) -> None:
    """strict_json with ``indent`` writes what ``json.dumps(finite(value), allow_nan=False, indent=...)`` writes,
    byte for byte, whatever the values; what it does not handle itself goes to json.dumps, error and all."""
    import enum

    from pneumotriage.io import finite, strict_json

    class Tier(enum.IntEnum):
        URGENT = 3

    class Text(str):
        pass

    text = ["plain", "é ü 中 🫁", 'quote " back \\ slash / tab \t nl \n cr \r', "\x00\x1f\x7f", "\udcff lone", ""]
    floats = [0.1, 1e-07, 1e16, -0.0, 1.5e300, 5e-324, float("nan"), float("inf"), -float("inf"), np.float64(0.25)]
    value = {
        "rows": [
            {"t": t, "f": f, "i": i} for t, f, i in zip(text * 2, floats, [0, -1, 2**70, True, False], strict=False)
        ],
        "empty": {"d": {}, "l": [], "t": (), "nested": [[], {}, [[{}]]]},
        "none": None,
        "tuple": (1, (2.5, "x"), [None]),
        "tier": Tier.URGENT,
        "text": Text("sub"),
        "": "empty key",
    }
    for indent in (0, 1, 2, 4):
        assert strict_json(value, indent=indent) == json.dumps(finite(value), allow_nan=False, indent=indent)
    for odd in ({1: "int key"}, {"set": {1, 2}}, [np.int64(3)]):
        try:
            expected: object = json.dumps(finite(odd), allow_nan=False, indent=1)
        except TypeError as exc:
            expected = type(exc)
        try:
            ours: object = strict_json(odd, indent=1)
        except TypeError as exc:
            ours = type(exc)
        assert ours == expected, odd
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(RecursionError):  # as before: finite() follows it forever
        strict_json(cycle, indent=1)
    assert strict_json(value) == json.dumps(finite(value), allow_nan=False)  # no indent: json.dumps itself

"""`pneumotriage submit`: exactly the sample's ImageIds, each mask at its image's own resolution."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.labels import read_rle_csv
from pneumotriage.rle import rle_decode
from pneumotriage.synth import StudySummary


def test_submit_matches_sample(study: StudySummary, models: dict[str, Path], tmp_path: Path) -> None:
    ids = [im.image_id for im in study.images]
    sample = tmp_path / "sample.csv"
    order = [ids[3], ids[0], ids[3], ids[5], "1.2.3.not.in.the.folder", ids[1]]
    sample.write_text("\ufeffImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in order))
    out = tmp_path / "submission.csv"
    result = CliRunner().invoke(
        app,
        [
            "submit",
            str(study.out),
            "--sample-submission",
            str(sample),
            "--out",
            str(out),
            "--classifier",
            str(models["classifier"]),
            "--segmenter",
            str(models["segmenter"]),
            "--workers",
            "0",
            "--segment-all",
        ],
    )
    assert result.exit_code == 4 and "1.2.3.not.in.the.folder" in result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    assert [line.split(",")[0] for line in lines[1:]] == [ids[3], ids[0], ids[5], "1.2.3.not.in.the.folder", ids[1]]
    written = read_rle_csv(out)
    assert written["1.2.3.not.in.the.folder"] == []
    for image_id in (ids[3], ids[0]):
        rows = written[image_id]
        if rows:
            assert rle_decode(rows[0], 128, 128).shape == (128, 128)  # original resolution

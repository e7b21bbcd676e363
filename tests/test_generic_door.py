"""The generic door: a TorchScript program or an ONNX graph with its input contract given by options
(`pneumotriage convert --format torchscript|onnx --kind ... --input-size ... --pipeline ... --normalisation ...`),
checked at convert and run by the scan like any model of the tool's own."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch calls TorchScript deprecated

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class _Findings(nn.Module):
    """A three-channel classifier of four findings with its sigmoid inside, as many exported models end."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(torch.flatten(self.body(x), 1)) * 4.0)


class _Mapper(nn.Module):
    """A one-channel segmenter giving mask logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 3.0


def _convert(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", *args])
    return result.exit_code, result.output


def _torchscript_classifier(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = _Findings().eval()
    path = tmp_path / "findings.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    return path, net


def test_a_torchscript_classifier_is_told_from_its_file_and_keeps_its_outputs(tmp_path: Path) -> None:
    """A scripted model whose third output is the finding, sigmoid inside, ImageNet RGB at 64 px: converted with
    that contract, its probability equals the program's own on the same normalised input within 1e-6, and the
    checkpoint says where it came from, what runs it and that it is not validated."""
    source, net = _torchscript_classifier(tmp_path)
    code, output = _convert(
        str(source),
        *("--out", str(tmp_path / "ts.pt"), "--kind", "classifier", "--input-size", "64"),
        *("--pipeline", "png8-square", "--normalisation", "imagenet-rgb", "--output-index", "2"),
        *("--outputs", "probability", "--gate", "0.3"),
    )
    assert code == 0, output
    for text in ("TorchScript program", "output 2 of 4", "gate:     0.3 (given)", "not validated by pneumotriage"):
        assert text in output, output
    loaded = load_model(tmp_path / "ts.pt")
    assert (loaded.spec.arch, loaded.spec.activation, loaded.thresholds["gate"]) == ("torchscript", "probability", 0.3)
    assert loaded.meta["imported"]["runtime"].startswith("TorchScript")
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.2, 0.6, 1.0]).view(
        3, 1, 1, 1
    )
    with torch.no_grad():
        ours = torch.sigmoid(loaded.model(x))
        theirs = net((x.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD)[:, 2]
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    assert float(theirs.max() - theirs.min()) > 0.01  # the outputs differ, so a wrong input would show


def test_an_onnx_segmenter_exported_for_one_image_runs_on_batches(tmp_path: Path) -> None:
    """An ONNX graph exported with a fixed batch of one (as many are): converted as a segmenter, its mask logits
    equal the torch network's within 1e-4 for a batch of three (run image by image)."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime (the onnx extra) is not installed")
    pytest.importorskip("onnx", reason="onnx (needed by torch to export) is not installed")
    torch.manual_seed(2)
    net = _Mapper().eval()
    source = tmp_path / "mapper.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 1, 64, 64),), str(source), dynamo=False, input_names=["image"])
    code, output = _convert(
        str(source),
        *("--out", str(tmp_path / "seg.pt"), "--kind", "segmenter", "--input-size", "64"),
        *("--pipeline", "png8-square", "--normalisation", "unit", "--json"),
    )
    assert code == 0, output
    record = json.loads(output[output.index("{") :])
    assert record["format"] == "onnx" and record["runtime"].startswith("ONNX Runtime") and not record["validated_here"]
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_model(tmp_path / "seg.pt").model(x)["mask"]
        theirs = net(x)
    assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-4


def test_a_contract_the_program_does_not_keep_is_refused_in_one_line(tmp_path: Path) -> None:
    source, _ = _torchscript_classifier(tmp_path)
    out = ("--out", str(tmp_path / "x.pt"))
    base = ("--kind", "classifier", "--input-size", "64", "--pipeline", "png8")
    for args, expected in (
        ((str(source), *out), "does not say how its input is made: give --kind, --input-size, --pipeline"),
        ((str(source), *out, *base, "--normalisation", "unit"), "does not run on input (2, 1, 64, 64)"),
        ((str(source), *out, *base, "--normalisation", "imagenet-rgb", "--output-index", "4"), "output index 4"),
        ((str(source), *out, *base, "--normalisation", "imagenet-rgb", "--pipeline", "jpeg"), "unknown input pipeline"),
        ((str(source), *out, "--kind", "segmenter", *base[2:], "--normalisation", "imagenet-rgb"), "not a map"),
        ((str(source), *out, "--output-index", "1"), "for the generic door"),
        ((str(source), *out, *base, "--normalisation", "imagenet-rgb", "--gate", "1.5"), "give a probability"),
    ):
        if "--output-index" in args and "--kind" not in args:
            plain = tmp_path / "plain.pt"
            torch.save({"x.weight": torch.zeros(2)}, plain)
            args = (str(plain), *args[1:])
        code, output = _convert(*args)
        assert code in (1, 2) and expected in output, (args, output)
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "x.pt").exists()


def test_logits_called_probabilities_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(4)
    path = tmp_path / "mapper.ts"
    torch.jit.save(torch.jit.script(_Mapper().eval()), str(path))
    code, output = _convert(
        str(path),
        *("--out", str(tmp_path / "x.pt"), "--kind", "segmenter", "--input-size", "64", "--pipeline", "png8-square"),
        *("--normalisation", "unit", "--outputs", "probability"),
    )
    assert code == 2 and "not probabilities (say logits)" in output, output


def test_a_scan_runs_a_program_brought_through_the_door_and_says_so(scan_input: Path, tmp_path: Path) -> None:
    """The scan takes the converted program as its classifier: a row for every readable image, its probability
    the program's, and the report and notes say it was imported and not validated."""
    source, _ = _torchscript_classifier(tmp_path)
    checkpoint = tmp_path / "ts.pt"
    code, output = _convert(
        str(source),
        *("--out", str(checkpoint), "--kind", "classifier", "--input-size", "64", "--pipeline", "png8-square"),
        *("--normalisation", "imagenet-rgb", "--output-index", "1", "--outputs", "probability"),
    )
    assert code == 0, output
    out = tmp_path / "scan"
    result = CliRunner().invoke(
        app, ["scan", str(scan_input), "--out", str(out), "--classifier", str(checkpoint), "--no-segment"]
    )
    assert result.exit_code in (0, 4), result.output
    assert "imported from a TorchScript program" in result.output, result.output
    assert "through the pipeline given at convert 'png8-square'" in result.output
    with open(out / "worklist.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    assert len(rows) == 12 and len({r["probability"] for r in rows}) > 1
    assert "imported from a TorchScript program" in (out / "report.html").read_text()


@pytest.mark.parametrize("arch", ["densenet121_keras", "torchscript"])
def test_an_imported_only_network_is_not_trained(tmp_path: Path, arch: str) -> None:
    result = CliRunner().invoke(app, ["train", "classifier", str(tmp_path), "--labels", "x.csv", "--arch", arch])
    assert result.exit_code == 2 and "is only ever imported with `pneumotriage convert`" in result.output

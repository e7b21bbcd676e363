"""ONNX Runtime and OpenVINO backends: `pneumotriage export` (parity with torch on real DICOMs, self-describing
metadata), `--backend` in scans (same answers, the choice recorded), `auto` (measured once, cached), and
`pneumotriage quantize` (int8 written with its figures, refused where it loses accuracy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pneumotriage.cli import app
from pneumotriage.errors import UsageError
from pneumotriage.models import ModelSpec, build_model, load_model, save_checkpoint

pytest.importorskip("onnxruntime", reason="ONNX Runtime (the onnx extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the onnx extra) is not installed")
pytest.importorskip("openvino", reason="OpenVINO (the openvino extra) is not installed")

from pneumotriage.deploy import AccuracyLost, export_model, quantize_model  # noqa: E402
from pneumotriage.models import backends  # noqa: E402
from pneumotriage.models.exported import OnnxNet, read_metadata  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def _demo_weights() -> None:
    from pneumotriage.demo import demo_weights

    demo_weights()


def _random_model(tmp_path: Path, name: str, **spec: object) -> Path:
    torch.manual_seed(0)
    net = build_model(ModelSpec(**spec)).eval()  # type: ignore[arg-type]
    return save_checkpoint(tmp_path / f"{name}.pt", net)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "classifier", "arch": "densenet121", "input_size": 256},
        {"kind": "segmenter", "arch": "unet", "encoder": "resnet34", "input_size": 512},
    ],
    ids=["densenet121@256", "unet-resnet34@512"],
)
def test_each_default_architecture_exports_with_parity_on_real_dicoms(
    real_data: Path, tmp_path: Path, spec: dict[str, object]
) -> None:
    """Each runtime gives torch's probabilities within 1e-4 on real SIIM DICOMs read as the scan reads them
    (the batch norm statistics made non-trivial, so folding them is exercised)."""
    torch.manual_seed(1)
    net = build_model(ModelSpec(**spec)).eval()  # type: ignore[arg-type]
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = save_checkpoint(tmp_path / "model.pt", net)
    done = export_model(load_model(path), tmp_path / "model.onnx", check=real_data / "siim-sample", limit=4)
    assert done.images == 4
    assert set(done.parity) == {"onnxruntime", "openvino"}
    assert all(0 <= gap <= 1e-4 for gap in done.parity.values()), done.parity
    info = read_metadata((tmp_path / "model.onnx").read_bytes())
    assert info is not None and info["parity"]["images"] == 4


def test_export_writes_a_self_describing_graph_that_loads_as_the_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "demo-segmenter", "--onnx", str(tmp_path / "seg.onnx")])
    assert result.exit_code == 0, result.output
    assert "parity with torch on 4 images" in result.output
    source = load_model("demo-segmenter")
    loaded = load_model(tmp_path / "seg.onnx")
    assert isinstance(loaded.model, OnnxNet)
    assert loaded.spec == source.spec
    assert loaded.thresholds == source.thresholds
    assert loaded.meta["onnx"]["source"]["sha256"] == source.sha256
    assert loaded.meta["clinical"] is False and loaded.meta["registry"] == "demo-segmenter"
    x = torch.rand(3, 1, source.spec.input_size, source.spec.input_size)
    with torch.inference_mode():
        ours, theirs = loaded.model(x)["mask"], source.model(x)["mask"]
    assert ours.shape == theirs.shape == (3, 1, source.spec.input_size, source.spec.input_size)
    assert float((torch.sigmoid(ours) - torch.sigmoid(theirs)).abs().max()) < 1e-4


def test_an_ensemble_exports_member_by_member(tmp_path: Path) -> None:
    first = _random_model(tmp_path, "a", kind="classifier", arch="densenet_mini", input_size=64)
    second = _random_model(tmp_path, "b", kind="classifier", arch="resnet34", input_size=64)
    ensemble = tmp_path / "ensemble.json"
    from pneumotriage.models.ensemble import write_ensemble

    write_ensemble(ensemble, [load_model(first), load_model(second)], {"gate": 0.4})
    done = export_model(load_model(ensemble), tmp_path / "out" / "both.onnx")
    assert [p.name for p in done.files] == ["both-0.onnx", "both-1.onnx"]
    assert done.ensemble == tmp_path / "out" / "both.json"
    back = load_model(done.ensemble)
    assert [m.spec.arch for m in back.members] == ["densenet_mini", "resnet34"]
    assert back.thresholds["gate"] == 0.4
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        gap = (torch.sigmoid(back.model(x)) - torch.sigmoid(load_model(ensemble).model(x))).abs().max()
    assert float(gap) < 1e-4


def test_an_onnx_file_without_the_tools_metadata_is_sent_to_the_generic_door(tmp_path: Path) -> None:
    from pneumotriage.weights import WeightError

    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(1, 1, 3), (torch.rand(1, 1, 8, 8),), str(plain), dynamo=False)
    with pytest.raises(WeightError, match="generic door"):
        load_model(plain)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_scan_with_a_runtime_gives_torchs_worklist(tmp_path: Path, scan_input: Path, backend: str) -> None:
    rows = {}
    for name in ("torch", backend):
        out = tmp_path / name
        args = ["scan", str(scan_input), "--out", str(out), "--classifier", "demo-classifier"]
        result = runner.invoke(app, [*args, "--segmenter", "demo-segmenter", "--backend", name, "--verbose"])
        assert result.exit_code == 4, result.output  # the broken file
        assert f"run by {name}" in result.output
        doc = json.loads((out / "worklist.json").read_text())
        assert doc["plan"]["backends"]["segmenter"]["backend"] == name
        rows[name] = {r["image_id"]: r for r in doc["worklist"]}
        if name == backend:
            assert f"segmenter: {backend}" in (out / "report.html").read_text()
    assert rows["torch"].keys() == rows[backend].keys()
    for key, ours in rows[backend].items():
        theirs = rows["torch"][key]
        assert (ours["tier"], ours["status"]) == (theirs["tier"], theirs["status"])
        if theirs["probability"] is not None:
            assert abs(ours["probability"] - theirs["probability"]) < 1e-4


def test_auto_measures_once_keeps_the_fastest_and_caches_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "SMALL_MS", 0.0)  # the demo model is small: measure it all the same
    loaded = load_model("demo-classifier")
    prepared = loaded.model
    cpu = torch.device("cpu")
    net, chosen = backends.choose(loaded, prepared, "auto", cpu, batch=2, threads=1, home=tmp_path)
    assert set(chosen.timings_ms) == {"torch", "onnxruntime", "openvino"}
    assert chosen.backend == min(chosen.timings_ms, key=chosen.timings_ms.__getitem__)
    assert (net is prepared) == (chosen.backend == "torch")
    saved = json.loads((tmp_path / "backends.json").read_text())
    assert [v["backend"] for v in saved.values()] == [chosen.backend]
    assert list((tmp_path / "exported").glob("*.onnx"))  # the graph is kept beside the weights

    def no_more_timing(*args: object) -> float:
        raise AssertionError("auto measured again")

    monkeypatch.setattr(backends, "_time_ms", no_more_timing)
    _, again = backends.choose(loaded, prepared, "auto", cpu, batch=2, threads=1, home=tmp_path)
    assert again.backend == chosen.backend and "measured on this machine before" in again.why
    # another batch size is another measurement
    with pytest.raises(AssertionError, match="measured again"):
        backends.choose(loaded, prepared, "auto", cpu, batch=3, threads=1, home=tmp_path)


def test_a_choice_made_before_runs_its_graph_with_no_torch_network_built_nor_torchvision_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan whose model was measured and exported before (on this machine, by this torch) runs the kept graph:
    the torch network is never built, so a new process never imports torchvision (~1.3 s of a 2-core CPU's
    start), and OpenVINO compiles the graph's file through its cache of compiled models."""
    import subprocess
    import sys

    from pneumotriage.scan.infer import prepare_models

    monkeypatch.setattr(backends, "SMALL_MS", 0.0)
    # OpenVINO made the fastest, whatever the machine: the choice this test is about is a runtime's
    fake = {"OnnxNet": 1.0}
    monkeypatch.setattr(backends, "_time_ms", lambda net, x, bf16=False: fake.get(type(net).__name__, 5.0))
    cpu = torch.device("cpu")
    first = load_model("demo-classifier", deferred=True)
    assert not first.built
    _, chosen = backends.choose(first, prepare_models(cpu, first)[0], "auto", cpu, batch=1, threads=1, home=tmp_path)
    assert chosen.backend in ("onnxruntime", "openvino") and first.built  # measured: built, exported

    again = load_model("demo-classifier", deferred=True)
    prepared = prepare_models(cpu, again)[0]
    assert prepared is not None
    net, chosen = backends.choose(again, prepared, "openvino", cpu, batch=1, threads=1, home=tmp_path)
    x = torch.rand(2, 1, again.spec.input_size, again.spec.input_size, generator=torch.Generator().manual_seed(3))
    assert not again.built and not prepared.built  # the graph runs; no torch network was made for it
    assert isinstance(net, OnnxNet) and isinstance(net._graph, Path)
    gap = float((backends.probabilities(net, x) - backends.probabilities(first.model, x)).abs().max())
    assert gap < backends.PARITY
    assert list((tmp_path / "exported" / "openvino-compiled").iterdir())  # compiled once, kept
    cached = backends.probabilities(
        backends.choose(again, prepared, "openvino", cpu, batch=1, threads=2, home=tmp_path)[0], x
    )
    assert float((cached - backends.probabilities(net, x)).abs().max()) < backends.PARITY
    assert again.model is again.model  # read at last: built once

    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from pneumotriage.models import backends, load_model\n"
        "from pneumotriage.scan.infer import prepare_models\n"
        "cpu = torch.device('cpu')\n"
        "loaded = load_model('demo-classifier', deferred=True)\n"
        "net, chosen = backends.choose(loaded, prepare_models(cpu, loaded)[0], 'auto', cpu, batch=1, threads=1,"
        " home=Path(sys.argv[1]))\n"
        "backends.probabilities(net, torch.rand(1, 1, loaded.spec.input_size, loaded.spec.input_size))\n"
        "print(chosen.backend, loaded.built, 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    backend, built, torchvision = done.stdout.split()
    assert backend in ("onnxruntime", "openvino") and (built, torchvision) == ("False", "False")


def test_onnx_runtime_keeps_its_optimised_graph_for_this_cpu_and_gives_the_same_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph file of the cache is optimised by ONNX Runtime once per ONNX Runtime and CPU (model name and
    instruction-set flags): later sessions load the optimised form, with the same outputs to the bit; no partial
    file is left; where the CPU cannot be told, nothing is kept."""
    from pneumotriage.models import exported

    assert runner.invoke(app, ["export", "demo-classifier", "--onnx", str(tmp_path / "c.onnx")]).exit_code == 0
    graph = tmp_path / "cache" / "g.onnx"
    graph.parent.mkdir()
    graph.write_bytes((tmp_path / "c.onnx").read_bytes())
    size = load_model(tmp_path / "c.onnx").spec.input_size
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(5))
    first = OnnxNet(graph, "classifier", ["logit"], "onnxruntime", 1)(x)
    kept = list((graph.parent / exported.ONNXRUNTIME_CACHE).iterdir())
    assert [p.name.startswith("g-") and p.suffix == ".onnx" for p in kept] == [True]
    stamp = kept[0].stat().st_mtime_ns
    again = OnnxNet(graph, "classifier", ["logit"], "onnxruntime", 1)(x)
    assert torch.equal(first, again) and kept[0].stat().st_mtime_ns == stamp  # read, not written again
    from_bytes = OnnxNet(graph.read_bytes(), "classifier", ["logit"], "onnxruntime", 1)(x)
    assert torch.equal(first, from_bytes)
    monkeypatch.setattr(exported, "cpu_features", lambda: "another cpu|other flags")
    OnnxNet(graph, "classifier", ["logit"], "onnxruntime", 1)(x)
    assert len(list((graph.parent / exported.ONNXRUNTIME_CACHE).iterdir())) == 2  # its own, beside the first
    monkeypatch.setattr(exported, "cpu_features", lambda: None)
    shutil.rmtree(graph.parent / exported.ONNXRUNTIME_CACHE)
    assert torch.equal(OnnxNet(graph, "classifier", ["logit"], "onnxruntime", 1)(x), first)
    assert not (graph.parent / exported.ONNXRUNTIME_CACHE).exists()


def test_a_deferred_network_whose_weights_do_not_fit_fails_when_built_naming_the_file(tmp_path: Path) -> None:
    from pneumotriage.weights import WeightError

    wrong = ModelSpec(kind="classifier", arch="densenet_mini", input_size=64)
    path = save_checkpoint(tmp_path / "wrong.pt", build_model(wrong))
    data = torch.load(path, weights_only=True)
    data["arch"] = "resnet34"  # says it is another network than its weights are
    torch.save(data, path)
    loaded = load_model(path, deferred=True)  # the description alone is read now
    with pytest.raises(WeightError, match="do not fit a .*resnet34") as caught:
        _ = loaded.model
    assert "wrong.pt" in str(caught.value)
    with pytest.raises(WeightError, match="do not fit"):
        load_model(path)  # not deferred: at once, as before
    result = runner.invoke(
        app,
        [
            "scan",
            str(tmp_path),
            "--classifier",
            str(path),
            "--no-segment",
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "torch",
            "--no-progress",
        ],
    )
    assert result.exit_code != 0 and "do not fit" in result.output and "Traceback" not in result.output


def test_auto_keeps_torch_for_a_small_model_and_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "small" made independent of how busy the machine is (the demo model takes a few ms an image when quiet)
    monkeypatch.setattr(backends, "SMALL_MS", 1e6)
    loaded = load_model("demo-classifier")
    _, chosen = backends.choose(loaded, loaded.model, "auto", torch.device("cpu"), batch=1, threads=1, home=tmp_path)
    assert chosen.backend == "torch" and "not worth exporting" in chosen.why
    assert not (tmp_path / "exported").exists()
    _, chosen = backends.choose(loaded, loaded.model, "auto", torch.device("cuda"), batch=1, threads=1, home=tmp_path)
    assert chosen.backend == "torch"
    with pytest.raises(UsageError, match="runs on the CPU"):
        backends.choose(loaded, loaded.model, "openvino", torch.device("cuda"), batch=1, threads=1, home=tmp_path)


def test_an_onnx_model_refuses_the_torch_backend(tmp_path: Path) -> None:
    assert runner.invoke(app, ["export", "demo-classifier", "--onnx", str(tmp_path / "c.onnx")]).exit_code == 0
    loaded = load_model(tmp_path / "c.onnx")
    with pytest.raises(UsageError, match="not torch"):
        backends.choose(loaded, loaded.model, "torch", torch.device("cpu"), batch=1, threads=1, home=tmp_path)
    _, chosen = backends.choose(loaded, loaded.model, "auto", torch.device("cpu"), batch=1, threads=1, home=tmp_path)
    assert chosen.backend in ("onnxruntime", "openvino")


def _labelled(tmp_path: Path) -> tuple[Path, Path]:
    from pneumotriage.synth import write_study

    study = write_study(tmp_path / "study", 16, positive_rate=0.5, size=(128, 128), seed=21, ptx_scale=2.0)
    return study.out, study.labels_csv


@pytest.mark.slow
def test_quantize_writes_an_int8_segmenter_with_its_figures_and_a_scan_shows_them(tmp_path: Path) -> None:
    data, labels = _labelled(tmp_path)
    out = tmp_path / "seg-int8.onnx"
    args = ["quantize", "demo-segmenter", "--calibrate", str(data), "--labels", str(labels), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = read_metadata(out.read_bytes())
    assert info is not None
    figures = info["quantization"]
    assert figures["held_out_images"] == 8 and figures["calibration_images"] == 8
    assert figures["before"]["dice_positives"] is not None and not figures["forced"]
    for after in figures["after"].values():  # a segmenter is judged on its outlines; its AUC is shown
        assert figures["before"]["dice_positives"] - after["dice_positives"] <= 0.01
        assert 0 <= after["auc"] <= 1
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    scan = runner.invoke(
        app, ["scan", str(data), "--out", str(tmp_path / "scan"), "--segmenter", str(out), "--no-submission"]
    )
    assert scan.exit_code == 0, scan.output
    report = (tmp_path / "scan" / "report.html").read_text()
    assert "int8: AUC" in report and "held-out images" in report


def test_quantize_refuses_a_model_whose_int8_version_loses_its_accuracy(tmp_path: Path) -> None:
    """An activation outlier (one channel of the first block at 10^4, which the next layers ignore) leaves the
    float32 model as it was but makes uint8 activations of that tensor too coarse for every other channel: the
    failure int8 is known for. It is refused, nothing written; --force writes it with the loss recorded."""
    data, labels = _labelled(tmp_path)
    loaded = load_model("demo-classifier")
    features = loaded.model.backbone.features
    with torch.no_grad():
        features.norm0.bias[0] = 1e4
        for name, module in features.named_modules():
            if (name.startswith("denseblock1") and name.endswith("norm1")) or name == "transition1.norm":
                module.weight[0] = 0.0
                module.bias[0] = 0.0
    bad = load_model(save_checkpoint(tmp_path / "bad.pt", loaded.model, thresholds=loaded.thresholds))
    out = tmp_path / "bad-int8.onnx"
    with pytest.raises(AccuracyLost, match="AUC"):
        quantize_model(bad, data, labels, out)
    assert not out.exists()
    forced = quantize_model(bad, data, labels, out, force=True)
    assert forced.refused and out.exists()
    info = read_metadata(out.read_bytes())
    assert info is not None and info["quantization"]["forced"] is True
    assert np.isfinite(info["quantization"]["before"]["auc"])


def test_openvino_leaves_the_threads_signal_stack_as_it_was(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin leaves an 11 KB alternate signal stack on the thread that runs it; a signal handled
    there later (the alarm timing an inline decode) corrupted memory. The tool puts the thread's own back."""
    import ctypes

    from pneumotriage.models.exported import _AltStack

    libc = ctypes.CDLL(None, use_errno=True)

    def current() -> tuple[int, int]:
        stack = _AltStack()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp or 0, stack.ss_flags

    before = current()
    loaded = load_model("demo-classifier")
    net = backends.runtime_net(loaded, "openvino", 1, None)
    with torch.inference_mode():
        net(torch.rand(1, 1, loaded.spec.input_size, loaded.spec.input_size))
    assert current() == before


def test_bf16_asked_for_runs_openvino_in_bf16_and_never_onnx_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--precision bf16 on a CPU: ONNX Runtime (float32 only there) is refused when named and left out of auto;
    auto weighs torch under bf16 autocast against OpenVINO in bf16, caches that choice apart from float32's, and
    says bf16 where it records the backend."""
    from pneumotriage.runtime import cpu_has_bf16

    cpu = torch.device("cpu")
    loaded = load_model("demo-classifier")
    with pytest.raises(UsageError, match="computes in float32") as refused:
        backends.choose(loaded, loaded.model, "onnxruntime", cpu, batch=1, threads=1, home=tmp_path, bf16=True)
    assert "openvino" in (refused.value.hint or "")
    monkeypatch.setattr(backends, "SMALL_MS", 0.0)  # the demo model is small: measure it all the same
    net, chosen = backends.choose(loaded, loaded.model, "auto", cpu, batch=1, threads=1, home=tmp_path, bf16=True)
    assert set(chosen.timings_ms) == {"torch", "openvino"}
    assert chosen.version.endswith("(bf16)") and "bf16" in chosen.why
    if chosen.backend == "openvino":
        assert isinstance(net, OnnxNet) and net.precision == "bf16"
    ov_net, named = backends.choose(loaded, loaded.model, "openvino", cpu, batch=1, threads=1, home=tmp_path, bf16=True)
    assert isinstance(ov_net, OnnxNet) and named.version.endswith("(bf16)")
    x = torch.rand(1, 1, loaded.spec.input_size, loaded.spec.input_size)
    ov_net(x)
    if cpu_has_bf16():  # elsewhere OpenVINO takes the hint as float32 (it does not emulate bf16)
        assert ov_net._session.precision == "bf16"
    fp32_net, _ = backends.choose(loaded, loaded.model, "openvino", cpu, batch=1, threads=1, home=tmp_path)
    fp32_net(x)
    assert fp32_net is not ov_net and fp32_net._session.precision == "f32"

    def no_more_timing(*args: object) -> float:
        raise AssertionError("auto measured again")

    monkeypatch.setattr(backends, "_time_ms", no_more_timing)
    _, again = backends.choose(loaded, loaded.model, "auto", cpu, batch=1, threads=1, home=tmp_path, bf16=True)
    assert again.backend == chosen.backend
    with pytest.raises(AssertionError, match="measured again"):  # float32's choice is its own
        backends.choose(loaded, loaded.model, "auto", cpu, batch=1, threads=1, home=tmp_path)

"""Every architecture x encoder: forward and backward on a tiny input, odd sizes, checkpoint round trips."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from pneumotriage.errors import UsageError
from pneumotriage.models import (
    CHECKPOINT_FORMAT,
    CLASSIFIERS,
    ENCODERS,
    SEGMENTERS,
    ModelSpec,
    build_model,
    load_model,
    save_checkpoint,
)
from pneumotriage.models.encoders import get_encoder, grey_conv
from pneumotriage.weights import WeightError, load_state_dict


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_contract(encoder: str) -> None:
    enc = get_encoder(encoder)
    feats = enc(torch.rand(1, 1, 64, 96))
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 96 // s) for s in (2, 4, 8, 16, 32)]


@pytest.mark.parametrize("arch", list(SEGMENTERS))
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_segmenter_forward_backward_odd_size_and_round_trip(arch: str, encoder: str, tmp_path: Path) -> None:
    spec = ModelSpec("segmenter", arch, encoder, input_size=64, empty_head=True)
    model = build_model(spec)
    out = model(torch.rand(2, 1, 64, 64))
    assert out["mask"].shape == (2, 1, 64, 64) and out["present"].shape == (2,)
    loss = out["mask"].mean() + out["present"].mean() + sum(a.mean() for a in out.get("aux", []))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter takes part in the loss"

    model.eval()
    odd = torch.rand(1, 1, 45, 77)
    with torch.no_grad():
        before = model(odd)["mask"]
    assert before.shape == (1, 1, 45, 77) and torch.isfinite(before).all()

    path = save_checkpoint(tmp_path / "m.pt", model, thresholds={"top_score": 0.7}, metrics={"dice": 0.5})
    loaded = load_model(path)
    assert loaded.spec == spec and loaded.thresholds["top_score"] == 0.7
    assert loaded.thresholds["bottom_score"] == 0.3  # defaults fill what the checkpoint leaves out
    with torch.no_grad():
        after = loaded(odd)["mask"]
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_classifier_forward_backward_odd_size_and_round_trip(arch: str, tmp_path: Path) -> None:
    spec = ModelSpec("classifier", arch, input_size=64)
    model = build_model(spec)
    y = model(torch.rand(2, 1, 64, 64))
    assert y.shape == (2,)
    y.sum().backward()
    model.eval()
    odd = torch.rand(1, 1, 45, 77)
    with torch.no_grad():
        before = model(odd)
    loaded = load_model(save_checkpoint(tmp_path / "c.pt", model, thresholds={"gate": 0.3}))
    assert loaded.thresholds == {"gate": 0.3} and loaded.spec.arch == arch
    with torch.no_grad():
        torch.testing.assert_close(loaded(odd), before)


def test_checkpoint_is_self_describing_and_weights_only(tmp_path: Path) -> None:
    model = build_model(ModelSpec("segmenter", "unet", "resnet34", input_size=96))
    path = save_checkpoint(
        tmp_path / "best.pt", model, config={"epochs": 3}, data_fingerprint="abc", metrics={"dice": 0.8}, epoch=2
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["format_version"] == 1
    for key in (
        "kind",
        "arch",
        "encoder",
        "input_size",
        "normalisation",
        "thresholds",
        "config",
        "data_fingerprint",
        "metrics",
        "package_version",
        "state_dict",
    ):
        assert key in raw, key
    assert raw["arch"] == "unet" and raw["input_size"] == 96 and raw["epoch"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left


def test_grey_conv_sums_rgb_weights() -> None:
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    grey = grey_conv(conv)
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(grey(x), conv(x.expand(1, 3, 8, 8)))


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="valid: unet, unetpp, double_unet"):
        ModelSpec("segmenter", "segformer", "resnet34")
    with pytest.raises(UsageError, match="valid: vgg19_bn, resnet34, efficientnet_b0, densenet121, densenet_mini"):
        ModelSpec("segmenter", "unet", "resnet18")
    with pytest.raises(UsageError, match="valid: densenet121, resnet50, resnet34, efficientnet_b0, densenet_mini"):
        ModelSpec("classifier", "vit")
    with pytest.raises(KeyError, match="valid:"):
        get_encoder("nope")


def test_imagenet_weights_from_cache_initialise_the_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached torchvision state dict (here random, saved under the registry's file name) is what the encoder
    starts from, with its first conv summed to one channel."""
    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    net = tvm.resnet34(weights=None)
    state = net.state_dict()
    registry_path = tmp_path / "weights.toml"
    file = home / "weights" / "r34.pth"
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    registry_path.write_text(
        f'[resnet34-imagenet]\nkind = "backbone"\narch = "resnet34"\ninput_size = 224\nnormalisation = "imagenet"\n'
        f'url = "http://127.0.0.1:9/r34.pth"\nfile = "r34.pth"\nsha256 = "{digest}"\n'
    )
    monkeypatch.setenv("PNEUMOTRIAGE_REGISTRY", str(registry_path))
    model = build_model(ModelSpec("segmenter", "unet", "resnet34", input_size=64), pretrained=True)
    assert model.meta["pretrained"] is True
    stem = model.encoder.stages[0][0]
    torch.testing.assert_close(stem.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.encoder.stages[4][0].conv1.weight, state["layer4.0.conv1.weight"])
    # without the cached file the model starts from scratch and says so
    file.unlink()
    assert build_model(ModelSpec("classifier", "densenet121"), pretrained=True).meta["pretrained"] is False


def test_xrv_style_state_dict_loads_through_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchXRayVision's file is a plain state dict of a 1-channel, 18-output torchvision ResNet50: a registry
    entry saying so makes load_model build the adapter that reports output 3 (Pneumothorax)."""
    home = tmp_path / "home"
    monkeypatch.setenv("PNEUMOTRIAGE_HOME", str(home))
    net = tvm.resnet50(weights=None, num_classes=18)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    file = home / "weights" / "xrv.pt"
    file.parent.mkdir(parents=True)
    torch.save(net.state_dict(), file)
    registry_path = tmp_path / "weights.toml"
    registry_path.write_text(
        '[xrv]\nkind = "classifier"\narch = "resnet50"\ninput_size = 512\nnormalisation = "xrv"\n'
        'url = "http://127.0.0.1:9/xrv.pt"\nfile = "xrv.pt"\noutputs = 18\noutput_index = 3\n'
        "[xrv.thresholds]\ngate = 0.507\n"
    )
    monkeypatch.setenv("PNEUMOTRIAGE_REGISTRY", str(registry_path))
    from pneumotriage.weights import WeightCache, load_registry

    reg = load_registry()
    WeightCache(reg).import_file(reg["xrv"], file, allow_unpinned=True)
    loaded = load_model("xrv")
    assert loaded.name == "xrv" and loaded.thresholds["gate"] == 0.507 and loaded.spec.outputs == 18
    x = torch.rand(2, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        expected = net(x * 2048 - 1024)[:, 3]
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)


def test_foreign_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(WeightError, match="not a pneumotriage checkpoint"):
        load_model(path)
    assert set(load_state_dict(path)) == {"weight"}

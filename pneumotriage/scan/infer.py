"""Stages 4 and 6, classify and segment: set the models up for inference on the device, and run them on a batch
(the classifier's probabilities; the segmenter's maps, with horizontal-flip TTA optional; in a scan, only each
map's window goes on to be finished: :class:`MapWindows`).

Set-up is where the CPU speed is won or lost: inference mode (no autograd bookkeeping), batch norm folded into
the convolutions, channels_last, one torch thread per core. On CUDA: channels_last and bf16 autocast.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pneumotriage.models import Deferred, LoadedModel
from pneumotriage.models.backends import BackendChoice, choose
from pneumotriage.runtime import autocast_for, one_thread
from pneumotriage.scan.finish import MapWindow
from pneumotriage.scan.options import Execution, Plan


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm2d that directly follows a Conv2d folded into it: in an
    ``nn.Sequential`` (conv-BN-ReLU blocks, VGG, EfficientNet) and in torchvision's ResNet stem and residual blocks
    (``convN`` then ``bnN``). Outputs agree to float rounding; on a CPU the separate normalisation pass over
    every feature map is saved (ResNet50 at 512 px: ~15 % of its time)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    folded = copy.deepcopy(module).eval()

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())

    for parent in list(folded.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names, names[1:], strict=False):
                fold(parent, first, second)
        elif isinstance(parent, BasicBlock | Bottleneck | ResNet):
            for i in (1, 2, 3):
                if hasattr(parent, f"conv{i}") and hasattr(parent, f"bn{i}"):
                    fold(parent, f"conv{i}", f"bn{i}")
    return folded


class FixedBatch(nn.Module):
    """A model compiled (``torch.compile``) for one batch shape: a smaller batch is padded with zeros and the
    outputs cut back, so compilation happens once, at the first batch, whatever the folder holds."""

    def __init__(self, net: nn.Module, batch: int) -> None:
        super().__init__()
        self.net = torch.compile(net, dynamic=False)
        self.batch = batch

    def forward(self, x: torch.Tensor) -> object:
        n = x.shape[0]
        if n < self.batch:
            pad = x.new_zeros(self.batch - n, *x.shape[1:])
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        if n == self.batch:
            return out
        if isinstance(out, dict):
            return {k: v[:n] for k, v in out.items()}
        return out[:n]


def prepare_models(
    device: torch.device, *models: LoadedModel | None, compile_batch: int | None = None
) -> list[LoadedModel | None]:
    """The models ready for inference on ``device``, as copies (the caller's stay as they are): eval mode,
    batch norm folded into the convolutions, channels_last memory format (oneDNN's fast path on a CPU,
    tensor cores' on CUDA); with ``compile_batch``, compiled for batches of that many images (:class:`FixedBatch`).
    Each copy is made when its network is first used (:class:`~pneumotriage.models.spec.Deferred`): a model run
    by an exported graph is never prepared, nor built."""
    return [
        None if m is None else m.with_model(Deferred(functools.partial(_prepared, m, device, compile_batch)))
        for m in models
    ]


def _prepared(m: LoadedModel, device: torch.device, compile_batch: int | None) -> nn.Module:
    # The same model prepared again for the same device (a node scanning study after study) is the copy made
    # before, while none of its weights has changed since (an in-place update bumps a tensor's version).
    key = _weights_key(device, m.model)
    kept = _PREPARED.get(m.model) if compile_batch is None and key is not None else None
    if kept is not None and kept[0] == key:
        return kept[1]
    net = fold_batch_norm(m.model.eval()).to(device).to(memory_format=torch.channels_last)
    if compile_batch is not None:
        return FixedBatch(net, compile_batch)
    if key is not None:
        _PREPARED[m.model] = (key, net)
    return net


def choose_backends(
    device: torch.device,
    *pairs: tuple[LoadedModel | None, LoadedModel | None],
    backend: str = "auto",
    batch: int = 1,
    threads: int = 1,
    bf16: bool = False,
) -> tuple[list[LoadedModel | None], list[BackendChoice | None]]:
    """For each (model as loaded, as :func:`prepare_models` made it), the model to run and what runs it
    (:func:`pneumotriage.models.backends.choose`, in bf16 where ``bf16``; exported graphs cached under the
    weights cache's home)."""
    from pneumotriage.weights import default_home

    home = default_home()
    ready: list[LoadedModel | None] = []
    choices: list[BackendChoice | None] = []
    for loaded, prepared in pairs:
        if loaded is None or prepared is None:
            ready.append(None)
            choices.append(None)
            continue
        net, chosen = choose(loaded, prepared, backend, device, batch=batch, threads=threads, home=home, bf16=bf16)
        ready.append(prepared.with_model(net))
        choices.append(chosen)
    return ready, choices


def ready_for_scan(
    device: torch.device,
    classifier: LoadedModel | None,
    segmenter: LoadedModel | None,
    run: Execution,
    plan: Plan,
    *,
    bf16: bool = False,
) -> tuple[tuple[LoadedModel | None, LoadedModel | None], Plan]:
    """A scan's models set up for inference on ``device`` and run by the backend chosen for each (compiled with
    ``--compile``), in bf16 where ``bf16`` (:func:`pneumotriage.runtime.use_bf16`); the plan says which."""
    loaded = (classifier, segmenter)
    ready = prepare_models(device, classifier, segmenter, compile_batch=plan.batch_size if run.compile else None)
    models, choices = choose_backends(
        device,
        (loaded[0], ready[0]),
        (loaded[1], ready[1]),
        backend="torch" if run.compile else run.backend,  # a compiled scan is torch's
        batch=plan.batch_size,
        threads=plan.torch_threads,
        bf16=bf16,
    )
    backends = {k: c.as_dict() for k, c in zip(("classifier", "segmenter"), choices, strict=True) if c}
    return (models[0], models[1]), replace(plan, backends=backends)


def _weights_key(device: torch.device, model: nn.Module) -> tuple[object, ...] | None:
    """The device and the version of every weight of ``model``; None where a weight made under inference mode
    keeps no version (such a model is prepared afresh each time)."""
    tensors = (*model.parameters(), *model.buffers())
    if any(t.is_inference() for t in tensors):
        return None
    return (str(device), tuple(t._version for t in tensors))


#: Models prepared for inference, by the caller's model (forgotten with it): (device and weight versions, copy).
_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], nn.Module]] = weakref.WeakKeyDictionary()


def _input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def classify(model: LoadedModel, images: torch.Tensor, device: torch.device, *, bf16: bool | None = None) -> np.ndarray:
    """Pneumothorax probabilities (B,) of a (B, 1, S, S) batch."""
    with autocast_for(device, bf16):
        logits = model.model(_input(images, device))
    return torch.sigmoid(logits.float()).cpu().numpy()


def model_info(m: LoadedModel | None, role: str) -> dict[str, Any] | None:
    """What a scan records of a model (its signature, worklist.json, the report): name, architecture, sha256,
    pipeline, provenance."""
    if m is None:
        return None
    return {
        "role": role,
        "name": m.name or (m.path.name if m.path else None),
        "model": m.spec.title,
        "input_size": m.spec.input_size,
        "sha256": m.sha256,
        "clinical": bool(m.meta.get("clinical", True)),
        "note": m.meta.get("note"),
        "pipeline": m.spec.pipeline,
        **({"members": m.meta["members"]} if m.meta.get("members") else {}),
        **({"imported": m.meta["imported"]} if isinstance(m.meta.get("imported"), dict) else {}),
        **({"onnx": _onnx_info(m.meta["onnx"])} if isinstance(m.meta.get("onnx"), dict) else {}),
    }


def _onnx_info(info: dict[str, Any]) -> dict[str, Any]:
    """What a model read from an ONNX file says of where it came from and, for an int8 one, its accuracy."""
    return {k: info[k] for k in ("source", "exported", "quantization") if k in info}


def _run_segmenter(
    model: LoadedModel, images: torch.Tensor, device: torch.device, tta: bool, bf16: bool | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The segmenter's outputs for a batch, and with ``tta`` its outputs for the batch mirrored left-right."""
    x = _input(images, device)
    with autocast_for(device, bf16):
        out = model.model(x)
        flipped = model.model(torch.flip(x, dims=[3])) if tta else None
    return out, flipped


def _probabilities(mask: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
    """Logits (..., 1, S, S) as probabilities (..., S, S); with ``mirrored`` (the logits of the mirrored
    input), the mean of both, the mirrored one turned back."""
    probs = torch.sigmoid(mask.float())[..., 0, :, :]
    if mirrored is not None:
        probs = (probs + torch.flip(torch.sigmoid(mirrored.float())[..., 0, :, :], dims=[-1])) / 2
    return probs


@torch.inference_mode()
def segment(
    model: LoadedModel, images: torch.Tensor, device: torch.device, tta: bool, *, bf16: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability maps (B, S, S) on the device and image-level scores (B,): the segmenter's own head where it
    has one, else the map's maximum."""
    out, flipped = _run_segmenter(model, images, device, tta, bf16)
    with one_thread(device):
        probs = _probabilities(out["mask"], flipped["mask"] if flipped is not None else None)
        present = torch.sigmoid(out["present"].float()) if "present" in out else probs.flatten(1).amax(1)
        return probs, present.float()


class MapWindows:
    """The segmenter of one scan, run batch by batch, with each probability map handed on as the finish needs
    it: only its window, the box around the values above ``floor`` (the lower of the triplet's two thresholds)
    with a margin of one pixel for the bilinear resize. Outside it every value is at most ``floor``, so a map
    rebuilt with zeros there (:meth:`MapWindow.rebuild`) gives the same outline (``floor`` >= 0; a lower one
    makes the window the whole map). An image with no window has nothing to outline.

    On a CPU the sigmoid is computed only where it can matter (:meth:`_from_logits`): the window and the map's
    maximum are found on the logits first, the sigmoid being monotonic, with a margin for its rounding. On a GPU
    the maps are made whole on the device and come back in one copy per batch, into kept pinned memory."""

    #: Relative margin, in float32 steps of a probability, for the sigmoid's rounding when a probability bound
    #: is turned into a logit bound: the vectorised sigmoid is within a few steps of the true one.
    STEPS = 64

    def __init__(self, model: LoadedModel, device: torch.device, *, tta: bool, floor: float) -> None:
        self.model, self.device, self.tta, self.floor = model, device, tta, floor
        self._buffer: torch.Tensor | None = None  # the batch's maps on the host, from a GPU
        self._boxes: torch.Tensor | None = None  # a box's logits and probabilities, on a CPU
        #: Every logit whose probability is above the floor is above this (-inf: the whole map can be).
        self._floor_logit = _logit_below(floor) if floor > 0 else -np.inf

    @torch.inference_mode()
    def run(
        self, images: torch.Tensor, places: Sequence[np.ndarray], *, bf16: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[MapWindow | None]]:
        """Segment a batch and write each map's window into ``places[j]`` (flat float32, at least a map's size:
        the image's slot). Returns the image-level scores (B,) (:func:`segment`'s), each map's maximum (B,), NaN
        for a map that holds one (a sigmoid's other values are finite), and each map's window."""
        out, flipped = _run_segmenter(self.model, images, self.device, self.tta, bf16)
        mask, mirrored = out["mask"], flipped["mask"] if flipped is not None else None
        windows: list[MapWindow | None] = []
        with one_thread(self.device):
            if self.device.type == "cpu":
                peak = self._from_logits(mask[:, 0], None if mirrored is None else mirrored[:, 0], places, windows)
            else:
                probs = _probabilities(mask, mirrored)
                host = self._held(probs.shape)
                host.copy_(probs, non_blocking=self.device.type == "cuda")  # waited for by a .cpu() in _hand_on
                peak = self._hand_on(probs, places, windows, host)
            present = torch.sigmoid(out["present"].float()) if "present" in out else peak
            return present.float().cpu().numpy(), peak.cpu().numpy(), windows

    def _held(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """The kept buffer's first ``shape[0]`` maps, made again only for a larger batch (or another map size)."""
        shape = tuple(shape)
        if self._buffer is None or self._buffer.shape[0] < shape[0] or self._buffer.shape[1:] != shape[1:]:
            self._buffer = torch.empty(shape, pin_memory=self.device.type == "cuda")
        return self._buffer[: shape[0]]

    def _hand_on(
        self,
        probs: torch.Tensor,
        places: Sequence[np.ndarray],
        windows: list[MapWindow | None],
        host: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each map's window of ``probs`` (B, S, S) into its place (read from ``host``, the maps' copy on the
        CPU, where given), appended to ``windows``; returns each map's maximum."""
        rows = probs.amax(2)  # (B, S): NaN propagates
        hot_rows = (rows > self.floor).cpu().numpy()
        maps = probs if host is None else host
        side = probs.shape[-1]
        for j, place in enumerate(places):
            ys = np.flatnonzero(hot_rows[j])
            if ys.size == 0:
                windows.append(None)
                continue
            # The columns, over the band of rows that holds a value above the floor only.
            cols = maps[j, int(ys[0]) : int(ys[-1]) + 1].amax(0)
            window = _window_around(ys, np.flatnonzero((cols > self.floor).numpy()), side)
            part = maps[j, window.top : window.top + window.height, window.left : window.left + window.width]
            place[: window.height * window.width].reshape(window.height, window.width)[...] = part.numpy()
            windows.append(window)
        return rows.amax(1)

    def _from_logits(
        self,
        logits: torch.Tensor,
        mirrored: torch.Tensor | None,
        places: Sequence[np.ndarray],
        windows: list[MapWindow | None],
    ) -> torch.Tensor:
        """:meth:`_hand_on` on a CPU from the logits (B, S, S) (and the mirrored input's, not yet turned back),
        with the sigmoid computed only in boxes that hold every value that can matter: the window, or where the
        window is empty, every value that can be the map's maximum. Each value is the one the whole map's sigmoid
        gives, bit for bit (:meth:`_probabilities_in`); where a map holds a NaN, the whole map is made. The
        boxes are found and cut with numpy: a torch operation costs a few microseconds even on a few values."""
        logits = logits.float()  # the model's own where it gave float32 (bfloat16 only by request on a CPU)
        rows = logits.amax(2)  # (B, S); turning a row back does not change its maximum
        if mirrored is not None:
            mirrored = mirrored.float()
            rows = torch.maximum(rows, mirrored.amax(2))  # NaN propagates
        maps, mirrors, rows_np = logits.numpy(), None if mirrored is None else mirrored.numpy(), rows.numpy()
        side = maps.shape[-1]
        peaks = np.empty(len(places), dtype=np.float32)
        for j, place in enumerate(places):
            row_max, mirror = rows_np[j], None if mirrors is None else mirrors[j]
            top_logit = float(row_max.max())
            if np.isnan(top_logit):  # damaged: found as from the whole map, the maximum NaN
                whole = torch.from_numpy(self._probabilities_in(maps[j], mirror, 0, side, 0, side))
                peaks[j] = self._hand_on(whole[None], [place], windows)[0]
                continue
            window = None
            box = _box(maps[j], mirror, row_max, self._floor_logit, strict=True)
            if box is not None:
                # With the margin of one pixel the resize reads: the window's own margin lies inside.
                top, left = max(box[0] - 1, 0), max(box[2] - 1, 0)
                probs = self._probabilities_in(maps[j], mirror, top, min(box[1] + 1, side), left, min(box[3] + 1, side))
                hot = probs > self.floor
                ys, xs = np.flatnonzero(hot.any(1)), np.flatnonzero(hot.any(0))
                if ys.size:
                    window = _window_around(ys + top, xs + left, side)
                    y0, x0 = window.top - top, window.left - left
                    part = probs[y0 : y0 + window.height, x0 : x0 + window.width]
                    place[: window.height * window.width].reshape(window.height, window.width)[...] = part
                    peaks[j] = probs.max()  # every value outside the box is at most the floor
            windows.append(window)
            if window is None:
                peaks[j] = self._peak(maps[j], mirror, row_max, top_logit)
        return torch.from_numpy(peaks)

    def _peak(self, logits: np.ndarray, mirrored: np.ndarray | None, row_max: np.ndarray, top_logit: float) -> float:
        """The largest probability of a map (logits (S, S)), from the values near its largest logit only.
        Without TTA a value is the sigmoid of its logit, so only logits whose sigmoid is within the rounding
        margin of the largest can give it. With TTA a value is at most the sigmoid of the larger of its two
        logits, so a first maximum, over those, bounds where a larger one can be."""
        best = -np.inf
        bound = _logit_below(_sigmoid(top_logit))
        for _ in range(1 if mirrored is None else 2):
            box = _box(logits, mirrored, row_max, bound, strict=False)
            assert box is not None  # the largest logit itself is in it
            best = max(best, float(self._probabilities_in(logits, mirrored, *box).max()))
            bound = _logit_below(best)
        return best

    def _probabilities_in(
        self, logits: np.ndarray, mirrored: np.ndarray | None, top: int, bottom: int, left: int, right: int
    ) -> np.ndarray:
        """The probabilities of rows ``top:bottom``, columns ``left:right`` of one map (logits (S, S)), as
        :func:`_probabilities` makes them for the whole map: the sigmoid of each value by torch's vectorised
        kernel (a box is copied into a kept buffer of whole vectors first: a row's last values, computed one at
        a time by another formula, can differ in the last bit), then with TTA the mean with the mirrored one's
        (a sum and a halving, exact operations: numpy's give the same bits). A view of the kept buffer."""
        side = logits.shape[-1]
        height, width = bottom - top, right - left
        size = height * width
        whole = -(-size // _VECTOR) * _VECTOR
        if self._boxes is None or self._boxes.numel() < 3 * whole:
            self._boxes = torch.empty(3 * max(whole, 16 * _VECTOR))
        kept = self._boxes
        values, probs = kept[:whole], kept[whole : 2 * whole]
        values_np, probs_np = values.numpy(), probs.numpy()
        values_np[size:] = 0.0
        values_np[:size].reshape(height, width)[...] = logits[top:bottom, left:right]
        torch.sigmoid(values, out=probs)
        if mirrored is not None:
            values_np[:size].reshape(height, width)[...] = mirrored[top:bottom, side - right : side - left][:, ::-1]
            other = kept[2 * whole : 3 * whole]
            torch.sigmoid(values, out=other)
            np.add(probs_np, other.numpy(), out=probs_np)
            np.divide(probs_np, 2, out=probs_np)
        return probs_np[:size].reshape(height, width)


def _window_around(ys: np.ndarray, xs: np.ndarray, side: int) -> MapWindow:
    """The window of a ``side`` x ``side`` map whose rows ``ys`` and columns ``xs`` (ascending) hold the values
    above the floor: their box, with the margin of one pixel the bilinear resize reads."""
    top, left = max(int(ys[0]) - 1, 0), max(int(xs[0]) - 1, 0)
    return MapWindow(top, left, min(int(ys[-1]) + 2, side) - top, min(int(xs[-1]) + 2, side) - left, side)


def _box(
    logits: np.ndarray, mirrored: np.ndarray | None, row_max: np.ndarray, bound: float, *, strict: bool
) -> tuple[int, int, int, int] | None:
    """Rows ``top:bottom``, columns ``left:right`` of the box around a map's logits (S, S) above ``bound`` (at
    or above, unless ``strict``; with TTA, the larger of each value's two logits; ``row_max``, each row's
    largest), or None if none is."""
    above = np.greater if strict else np.greater_equal
    ys = np.flatnonzero(above(row_max, bound))
    if ys.size == 0:
        return None
    top, bottom = int(ys[0]), int(ys[-1]) + 1
    cols = logits[top:bottom].max(0)
    if mirrored is not None:
        cols = np.maximum(cols, mirrored[top:bottom].max(0)[::-1])
    xs = np.flatnonzero(above(cols, bound))
    return top, bottom, int(xs[0]), int(xs[-1]) + 1


#: A multiple of the values torch's vectorised kernels take a step on any CPU (two vectors of floats: 32 with
#: AVX-512, 16 with AVX2): a buffer of this many leaves no value to the one-at-a-time tail.
_VECTOR = 64


def _sigmoid(x: float) -> float:
    """The sigmoid in double precision."""
    return float(1.0 / (1.0 + np.exp(-np.float64(x)))) if x > -700 else 0.0  # below, it is under 1e-304


def _logit_below(p: float) -> float:
    """A float32 logit at or under which no value's sigmoid, as float32 computes it, reaches ``p``: the logit of
    ``p`` less a margin for the sigmoid's rounding (:attr:`MapWindows.STEPS` float32 steps at ``p``), rounded
    down; -inf where any value can (``p`` at most the margin), +inf where none can (``p`` above 1)."""
    low = float(np.float64(p) - MapWindows.STEPS * np.spacing(np.float32(p)))
    if low <= 0.0 or np.isnan(low):
        return -np.inf
    if low >= 1.0:
        return np.inf
    x = float(np.log(low) - np.log1p(-low))
    below = np.float32(x)
    if float(below) > x:
        below = np.nextafter(below, np.float32(-np.inf))
    return float(below)

"""Training data: DICOMs resized to the model's input, masks from the label CSV, joint augmentation, an optional
on-disk cache of the resized arrays, and the epoch sampler with the positive-share schedule.

Every image is resized to a square ``size x size`` (bilinear with antialiasing; masks by area, then >= 0.5), the
same preprocessing (:mod:`pneumotriage.native`) the scan gives, so a model sees at inference what it saw in training.
JPEG Baseline images are decoded straight to a reduced size where the codec allows (``read_dicom(reduce_to=)``).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch.utils.data import Dataset, Sampler

from pneumotriage.dicom import read_dicom
from pneumotriage.folds import ImageRecord
from pneumotriage.io import atomic_write_bytes, file_key
from pneumotriage.labels import RleLabels
from pneumotriage.native import square

_CACHE_VERSION = "1"


def prepare_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A ``(H, W)`` boolean mask as a ``(1, size, size)`` float32 tensor of 0/1 (area-resampled, then >= 0.5)."""
    t = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    if t.shape[-2:] != (size, size):
        t = (F.interpolate(t, size=(size, size), mode="area") >= 0.5).float()
    return t[0]


class RadiographDataset(Dataset[dict[str, Any]]):
    """Items: ``image`` (1, S, S) in [0, 1], ``label`` (float 0/1), ``mask`` (1, S, S) when ``masks``, ``index``."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: RleLabels,
        size: int,
        *,
        masks: bool,
        augment: Any | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.records = list(records)
        self.labels = labels
        self.size = size
        self.masks = masks
        self.augment = augment
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def positives(self) -> list[bool]:
        return [r.positive for r in self.records]

    def _cache_path(self, record: ImageRecord) -> Path | None:
        if self.cache_dir is None:
            return None
        key = f"{_CACHE_VERSION}|{file_key(record.path)}|{self.size}|{self.masks}"
        key += "|" + "|".join(self.labels.get(record.image_id, []))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.size}" / f"{record.image_id}-{digest}.npz"

    def _load(self, record: ImageRecord) -> tuple[torch.Tensor, torch.Tensor | None]:
        cached = self._cache_path(record)
        if cached is not None and cached.is_file():
            with np.load(cached) as data:
                image = torch.from_numpy(data["image"].astype(np.float32))
                mask = torch.from_numpy(data["mask"].astype(np.float32)) if self.masks else None
            return image, mask
        decoded = read_dicom(record.path, reduce_to=self.size)
        image = square(decoded.pixels, self.size)
        mask = None
        if self.masks:
            h, w = decoded.original_shape  # labels are at the stored size, whatever size the JPEG decoded to
            mask = prepare_mask(self.labels.masks_for(record.image_id, h, w), self.size)
        if cached is not None:
            buffer = io.BytesIO()
            if mask is None:
                np.savez(buffer, image=image.numpy().astype(np.float16))
            else:
                np.savez(buffer, image=image.numpy().astype(np.float16), mask=mask.numpy().astype(np.uint8))
            atomic_write_bytes(cached, buffer.getvalue())
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, mask = self._load(record)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        item: dict[str, Any] = {"image": image, "label": torch.tensor(float(record.positive)), "index": index}
        if mask is not None:
            item["mask"] = mask
        return item


# --------------------------------------------------------------------------------------------------------------
# augmentation


def _grid_distortion_class() -> type:
    """Built on first use, so importing this module does not import torchvision.transforms."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    class GridDistortion(v2.Transform):  # type: ignore[misc]
        """Smooth random warp: displacements drawn on a coarse grid of ``cells`` x ``cells`` and interpolated
        (bicubic) to every pixel, then one resampling per input; image and mask share the warp.

        It stands in for torchvision's ElasticTransform, which blurs a full-resolution noise field with a wide
        Gaussian: far over a DataLoader worker's budget per image, where this warp stays within it
        (docs/performance.md)."""

        def __init__(self, p: float = 0.25, strength: float = 0.03, cells: int = 4) -> None:
            super().__init__()
            self.p, self.strength, self.cells = p, strength, cells

        def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
            if float(torch.rand(())) >= self.p:
                return {"grid": None}
            h, w = v2.query_size(flat_inputs)
            coarse = (torch.rand(1, 2, self.cells + 1, self.cells + 1) * 2 - 1) * self.strength
            flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
            base = F.affine_grid(identity, [1, 1, h, w], align_corners=False)
            return {"grid": base + flow}

        def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
            grid = params["grid"]
            if grid is None or not isinstance(inpt, torch.Tensor):
                return inpt
            mode = "nearest" if isinstance(inpt, tv_tensors.Mask) else "bilinear"
            out = F.grid_sample(
                inpt.as_subclass(torch.Tensor)[None].float(),
                grid,
                mode=mode,
                padding_mode="border",
                align_corners=False,
            )[0]
            return tv_tensors.wrap(out.to(inpt.dtype), like=inpt)

    return GridDistortion


class Augment:
    """Joint image + mask augmentation with torchvision.transforms.v2: horizontal flip, shift-scale-rotate,
    grid distortion (geometry, applied to both); brightness, contrast and gamma (image only).

    :data:`AUGMENT_LEVELS` names two settings: ``strong`` is what the SIIM-ACR winners used on 10,000+ real
    images; ``light`` suits a few dozen images trained from scratch, where strong distortion slows learning
    more than it regularises.
    """

    def __init__(
        self,
        *,
        rotate: float = 10.0,
        shift: float = 0.0625,
        scale: float = 0.1,
        distort_p: float = 0.25,
        brightness: float = 0.1,
        contrast: float = 0.15,
        gamma: float = 0.2,
    ) -> None:
        from torchvision.transforms import v2

        self.geometry = v2.Compose(
            [
                v2.RandomHorizontalFlip(0.5),
                v2.RandomAffine(degrees=rotate, translate=(shift, shift), scale=(1 - scale, 1 + scale)),
                _grid_distortion_class()(p=distort_p),
            ]
        )
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from torchvision import tv_tensors

        if mask is not None:
            image, mask_t = self.geometry(tv_tensors.Image(image), tv_tensors.Mask(mask))
            mask = (mask_t.as_subclass(torch.Tensor) >= 0.5).float()
        else:
            image = self.geometry(tv_tensors.Image(image))
        image = image.as_subclass(torch.Tensor)
        r = torch.rand(3)
        contrast = 1 + self.contrast * (2 * float(r[0]) - 1)
        brightness = self.brightness * (2 * float(r[1]) - 1)
        gamma = math.exp(self.gamma * (2 * float(r[2]) - 1))
        mean = image.mean()
        image = ((image - mean) * contrast + mean + brightness).clamp(0.0, 1.0) ** gamma
        return image, mask


AUGMENT_LEVELS: dict[str, dict[str, float] | None] = {
    "none": None,
    "light": {
        "rotate": 5.0,
        "shift": 0.03,
        "scale": 0.05,
        "distort_p": 0.0,
        "brightness": 0.05,
        "contrast": 0.1,
        "gamma": 0.1,
    },
    "strong": {},
}


def make_augment(level: str) -> Augment | None:
    if level not in AUGMENT_LEVELS:
        raise KeyError(f"unknown augmentation level {level!r}; valid: {', '.join(AUGMENT_LEVELS)}")
    params = AUGMENT_LEVELS[level]
    return None if params is None else Augment(**params)


# --------------------------------------------------------------------------------------------------------------
# sampling


def share_at(epoch: int, epochs: int, schedule: tuple[float, float]) -> float:
    """The positive-image share at ``epoch`` (0-based), moving linearly from ``schedule[0]`` to ``schedule[1]``."""
    start, end = schedule
    return start if epochs <= 1 else start + (end - start) * epoch / (epochs - 1)


class EpochSampler(Sampler[int]):
    """Indices for one epoch, reshuffled per epoch from ``seed``, split across distributed ranks.

    Without a schedule every image appears once per epoch. With ``positive_share=(start, end)`` an epoch of the
    same length draws that share of positive images (cycling through the positives, then the negatives, each in
    a fresh order), the share moving linearly across epochs, as the SIIM-ACR winners did (0.8 -> 0.4).
    Ranks take interleaved slices of one shared order, padded to equal length, like DistributedSampler.
    """

    def __init__(
        self,
        positives: Sequence[bool],
        *,
        epochs: int,
        seed: int = 0,
        positive_share: tuple[float, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.positives = np.asarray(positives, dtype=bool)
        self.epochs, self.seed, self.schedule = epochs, seed, positive_share
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if positive_share is not None and (self.positives.all() or not self.positives.any()):
            self.schedule = None  # nothing to balance

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.positives)
        if self.schedule is None:
            return rng.permutation(n)
        share = share_at(self.epoch, self.epochs, self.schedule)
        n_pos = int(round(share * n))
        pos, neg = np.flatnonzero(self.positives), np.flatnonzero(~self.positives)

        def cycle(idx: np.ndarray, count: int) -> np.ndarray:
            reps = -(-count // len(idx)) if count else 0
            return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:count] if reps else idx[:0]

        return rng.permutation(np.concatenate([cycle(pos, n_pos), cycle(neg, n - n_pos)]))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        per_rank = len(self)
        total = per_rank * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        return iter(order[self.rank : total : self.world_size].tolist())

    def __len__(self) -> int:
        return -(-len(self.positives) // self.world_size)

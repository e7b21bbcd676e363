"""Stage 3, decode: pixels to the models' input tensors, in a worker process or, for JPEG Baseline on a GPU, in
batches on the device.

Worker processes write each decoded image into a slot of a shared-memory arena (:class:`SlotArena`) and send
back only a small record; the process that runs the models reads the slot in place. Nothing is pickled per
pixel and no shared-memory segment is made per batch (those page faults cost more than the decoding on a
2-core CPU).

On CUDA, JPEG Baseline frames travel compressed and are decoded together with nvJPEG
(``torchvision.io.decode_jpeg(..., device=...)``), normalised and resized there, by the torch half of
:mod:`pneumotriage.native` (whose numpy half reads a file on the CPU, in training and in the scan's workers).
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Sequence
from multiprocessing import shared_memory

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from pneumotriage.dicom import codec_reduces, decode_pixels, stored_pixels
from pneumotriage.inputcheck import check_pixels
from pneumotriage.native import square, square_batch, unit_range_batch
from pneumotriage.pipelines import GREY, NATIVE, InputKey, make_input
from pneumotriage.scan.read import Source

#: Longest side of the display copy each slot keeps for overlays and thumbnails.
DISPLAY = 512


#: Named shared-memory blocks whose memory a view still held when their arena closed (a block dropped then would
#: complain that it cannot close): closed by the next arena to close, once their views are gone.
_LINGERING: list[shared_memory.SharedMemory] = []


def _closed(block: shared_memory.SharedMemory) -> bool:
    try:
        block.close()
        return True
    except BufferError:
        return False


class SlotArena:
    """Shared memory for the images on their way through a scan, in two kinds of place:

    - ``rows`` input rows, each holding one image as every model's input (:class:`~pneumotriage.pipelines.
      InputKey`: a size by a pipeline). Each input's rows lie one after another, so the rows of a batch taken in
      ring order are one (B, 1, S, S) tensor with no copy (:meth:`view`). A row is needed only until the models
      have run on it.
    - ``count`` slots, each holding a display copy (uint8, longest side :data:`DISPLAY`) and, with ``map_size``,
      room for one probability map (a scan writes there only the map's window, flat: :class:`~pneumotriage.scan.
      finish.MapWindow`). A slot is needed until its image is finished.

    With the ``fork`` start method the arena is an anonymous shared mapping the workers inherit (it does not
    count against a container's small ``/dev/shm``); otherwise a named shared-memory block they attach to."""

    def __init__(
        self,
        count: int,
        keys: Sequence[InputKey],
        map_size: int | None,
        *,
        rows: int | None = None,
        inherited: bool,
        name: str | None = None,
    ) -> None:
        """A new arena, or (``name``) the one another process made; ``rows`` defaults to ``count``."""
        self.count = count
        self.rows = count if rows is None else rows
        self.keys = tuple(sorted(set(keys)))
        self.map_size = map_size
        # Each part: where its first place starts, and the bytes of one place.
        self._parts: dict[object, tuple[int, int]] = {}
        offset = 0
        for key in self.keys:
            self._parts[key] = (offset, key.size * key.size * 4)
            offset += self.rows * key.size * key.size * 4
        if map_size:
            self._parts["map"] = (offset, map_size * map_size * 4)
            offset += count * map_size * map_size * 4
        self._parts["display"] = (offset, DISPLAY * DISPLAY)
        offset += count * DISPLAY * DISPLAY
        self.layout = (count, self.keys, map_size, self.rows)
        self._owner = name is None
        self._shm: shared_memory.SharedMemory | None = None
        if inherited:
            self._buffer: mmap.mmap | memoryview = mmap.mmap(-1, max(1, offset))
        else:
            self._shm = shared_memory.SharedMemory(name=name, create=name is None, size=max(1, offset))
            assert self._shm.buf is not None
            self._buffer = self._shm.buf
        self.name = self._shm.name if self._shm is not None else None

    def _array(self, part: object, place: int, side: int, n: int = 1) -> np.ndarray:
        start, step = self._parts[part]
        return np.frombuffer(self._buffer, dtype=np.float32, count=n * side * side, offset=start + place * step)

    @property
    def native_sizes(self) -> tuple[int, ...]:
        """The sizes of the inputs made by the tool's own pipeline (the only ones nvJPEG's path can make)."""
        return tuple(k.size for k in self.keys if k.pipeline == NATIVE)

    def image(self, row: int, key: InputKey) -> np.ndarray:
        return self._array(key, row, key.size).reshape(key.size, key.size)

    def map(self, slot: int) -> np.ndarray:
        assert self.map_size is not None
        return self._array("map", slot, self.map_size).reshape(self.map_size, self.map_size)

    def display(self, slot: int, shape: tuple[int, int]) -> np.ndarray:
        start, step = self._parts["display"]
        flat = np.frombuffer(self._buffer, dtype=np.uint8, count=DISPLAY * DISPLAY, offset=start + slot * step)
        return flat[: shape[0] * shape[1]].reshape(shape)

    def view(self, rows: Sequence[int], key: InputKey) -> torch.Tensor | None:
        """The inputs ``key`` of ``rows`` as one (B, 1, S, S) tensor in the arena's own memory, with no copy, where
        the rows follow one another (valid while they are held: use it before handing them back); else None."""
        if not rows or list(rows) != list(range(rows[0], rows[0] + len(rows))):
            return None
        size = key.size
        return torch.from_numpy(self._array(key, rows[0], size, len(rows))).view(len(rows), 1, size, size)

    def batch(self, rows: Sequence[int], key: InputKey, out: torch.Tensor | None = None) -> torch.Tensor:
        """The inputs ``key`` of ``rows`` as one (B, 1, S, S) tensor, a copy (the rows can be reused), in ``out``
        (a CPU tensor of that shape, kept by the caller) where given."""
        if out is None:
            out = torch.empty(len(rows), 1, key.size, key.size)
        np.stack([self.image(r, key) for r in rows], out=out.numpy()[:, 0])
        return out

    def close(self) -> None:
        """Let the memory go. A view still held (the last batch, or an exception's traceback) keeps its mapping
        until it goes itself; a named block's name goes at once."""
        _LINGERING[:] = [block for block in _LINGERING if not _closed(block)]
        if self._shm is not None:
            if not _closed(self._shm):
                _LINGERING.append(self._shm)  # its views keep the mapping until they go
            if self._owner:
                self._shm.unlink()
            self._shm = None
        elif isinstance(self._buffer, mmap.mmap):
            with contextlib.suppress(BufferError):
                self._buffer.close()


def turned(array: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    """``array`` (..., H, W) flipped left-right and/or up-down as ``flip`` says (its PatientOrientation, from
    :func:`pneumotriage.inputcheck.orientation`): a view, the same call turning an image upright and its map back."""
    flip_lr, flip_ud = flip
    return array[..., :: -1 if flip_ud else 1, :: -1 if flip_lr else 1]


def display_shape(shape: tuple[int, int], side: int = DISPLAY) -> tuple[int, int]:
    """The size of a copy of an image of ``shape`` whose longest side is ``side``, never enlarged."""
    h, w = shape
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def make_display(pixels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) float pixels in [0, 1] as uint8 display copies of ``shape`` (antialiased)."""
    if tuple(pixels.shape[-2:]) != shape:
        lead = pixels.shape[:-2]
        flat = pixels.reshape(-1, 1, *pixels.shape[-2:])
        pixels = F.interpolate(flat, size=shape, mode="bilinear", antialias=True).reshape(*lead, *shape)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def decode_into(source: Source, arena: SlotArena, slot: int, row: int) -> tuple[int, int]:
    """Decode ``source`` on the CPU into input ``row`` as every input of the arena and into ``slot`` as a display
    copy of :func:`display_shape`; returns the image's true size. An imported model's input is made by its own pipeline
    from the stored pixels (:func:`pneumotriage.pipelines.make_input`)."""
    top = max((*arena.native_sizes, DISPLAY))
    image = decode_pixels(source.ds, source.header, source.notes, reduce_to=top)
    check_pixels(image.pixels, image.warnings, source.accept)
    # One full decode of the stored values serves every imported model's input (a colour image is left to
    # make_input, which refuses it before decoding anything).
    foreign = any(k.pipeline != NATIVE for k in arena.keys)
    grey = (source.header.photometric or "").strip().upper() in GREY
    stored = stored_pixels(source.ds, source.header) if foreign and grey else None
    for key in arena.keys:
        if key.pipeline != NATIVE:
            arena.image(row, key)[...] = make_input(source.ds, source.header, key, stored)
            continue
        size = key.size
        pixels = image.pixels
        if size < top and codec_reduces(source.ds, source.header, size):
            # Decoded again as training decodes it (``read_dicom(reduce_to=size)``): a JPEG the codec reduces to
            # the model's size is not the image reduced to the display size and then resized, and a model should
            # see in a scan the pixels it was trained on (a demo classifier gave a negative 0.72 instead of 0.21).
            pixels = decode_pixels(source.ds, source.header, [], reduce_to=size, again=image).pixels
        arena.image(row, key)[...] = square(pixels, size)[0].numpy()
    if any(source.flip):
        # Upright for the models (the engine turns their maps back: masks and overlays keep the stored grid).
        for key in arena.keys:
            x = arena.image(row, key)
            x[...] = turned(x, source.flip).copy()
    shown = display_shape(image.original_shape)
    arena.display(slot, shown)[...] = make_display(torch.from_numpy(image.pixels), shown).numpy()
    return image.original_shape


def decode_jpegs_on_device(
    frames: Sequence[bytes], invert: Sequence[bool], sizes: Sequence[int], device: torch.device
) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """Decode 8-bit grey JPEG codestreams together on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU) to
    (B, 1, S, S) float tensors at each size in ``sizes``, each image's display copy (on the CPU) and its own
    size."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in frames]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work, and
        # torchvision <= 0.29.1 is what this package supports.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
    shapes = [(int(d.shape[-2]), int(d.shape[-1])) for d in decoded]
    out = {size: torch.empty(len(frames), 1, size, size, device=device) for size in sizes}
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    displays: list[torch.Tensor] = [torch.empty(0)] * len(frames)
    sign = torch.tensor([-1.0 if v else 1.0 for v in invert], device=device)
    for shape, members in groups.items():
        index = torch.tensor(members, device=device)
        grey = torch.stack([decoded[i][0] for i in members]).float() * sign[index][:, None, None]
        pixels = unit_range_batch(grey)[:, None]
        for size in sizes:
            out[size][index] = square_batch(pixels, size) if pixels.shape[-2:] != (size, size) else pixels
        small = make_display(pixels, display_shape(shape)).cpu()
        for j, i in enumerate(members):
            displays[i] = small[j, 0]
    return out, displays, shapes

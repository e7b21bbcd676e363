"""Where and how models run: the device, the precision, and the CPU cores this process may use.

Shared by training, the scan and tuning, so that none of them depends on another for these facts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal, get_args

from pneumotriage.errors import UsageError

if TYPE_CHECKING:
    import torch  # imported where used: the command line starts without it (~1.7 s)

PRECISIONS = ("auto", "bf16", "fp32")

#: What long jobs (training, scanning, tuning) report as they go: a dict whose "event" (an :data:`EventKind`) says
#: what happened, with that event's figures beside it. Made by :func:`progress_event`.
ProgressEvent = dict[str, Any]
#: The callback those jobs take to report it.
Progress = Callable[[ProgressEvent], None]
#: Every kind of progress event: a scan's "start", "batch" and "done"; tune's "cached", "predicted" and "counted";
#: training's "weights", "data", "epoch_start", "batch", "epoch_end" and "swa".
EventKind = Literal["start", "batch", "done", "cached", "predicted", "counted", "weights", "data", "epoch_start",
                    "epoch_end", "swa"]  # fmt: skip
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


def progress_event(kind: EventKind, **figures: Any) -> ProgressEvent:
    """A progress event of ``kind`` with its figures (refused if ``kind`` is not an :data:`EventKind`, so a
    listener never waits for an event that is spelt another way)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"{kind!r} is not a progress event kind: {', '.join(EVENT_KINDS)}")
    return {"event": kind, **figures}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    import torch

    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"unknown device {name!r}; try auto, cpu, cuda, cuda:1 or mps") from None
        if device.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: no triage runs there
            raise UsageError(f"--device {name!r}: choose auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA GPU is available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps asked for, but this machine has no MPS device")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether to run in bf16 autocast with channels_last: ``auto`` on CUDA only; ``bf16`` on CUDA or a CPU with
    native bf16 (elsewhere bf16 is emulated and slower, so it is refused); ``fp32`` never."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return False
    if precision == "auto":
        return device.type == "cuda"
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return True
    raise UsageError(f"--precision bf16: this {device.type} has no native bf16; use --precision fp32")


def autocast_for(device: torch.device, bf16: bool | None = None) -> Any:
    """bf16 autocast where :func:`use_bf16` says so (default: on CUDA only), else nothing (float32)."""
    import torch

    if bf16 if bf16 is not None else device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Small tensor work on a CPU (a sigmoid or maximum over a few probability maps) in this thread alone.

    Split over torch's thread pool, each such operation leaves the pool's threads spinning for a while after it
    (OpenMP's wait policy), on cores the worker processes need: many times the work's own CPU time
    (docs/performance.md). The models keep every thread."""
    import torch

    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

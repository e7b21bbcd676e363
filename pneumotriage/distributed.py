"""Processes that ``torchrun`` started: whether this is one, its place in the job, and joining the process group
(NCCL on GPUs, gloo on CPUs). One set-up for training (DistributedDataParallel) and scanning (a shard per rank):
the rendezvous store that joins the group also carries what the ranks tell each other."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pneumotriage.runtime import pick_device


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` (or a launcher setting the same variables)
    started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Ranks:
    """This process's place in the job, from torchrun's environment, and the store the ranks share."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    #: How many times torchrun restarted the job (``--max-restarts``): a restarted rank resumes its shard.
    restart: int
    device: torch.device
    store: Any


def _share_cores(local_rank: int, local_world: int) -> None:
    """Give this rank its own share of the machine's cores (its worker processes inherit it, and ``auto`` sizes
    its workers and threads by it): ranks sharing a machine would otherwise each start a torch thread and a
    worker per core, and slow one another down."""
    if local_world <= 1 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    mine = cores[local_rank * len(cores) // local_world : (local_rank + 1) * len(cores) // local_world]
    os.sched_setaffinity(0, mine or [cores[local_rank % len(cores)]])


@contextlib.contextmanager
def joined(device_name: str = "auto", *, share_cores: bool = True) -> Iterator[Ranks]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), and leave it cleanly. With
    ``share_cores``, ranks on one machine each take their share of its cores."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore
    from torch.distributed.rendezvous import rendezvous

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # "auto" and a bare "cuda" mean this rank's own GPU; "cuda:1" is taken as given.
    device = pick_device("auto" if device_name == "cuda" and torch.cuda.is_available() else device_name, local_rank)
    if share_cores:  # on a GPU machine too: each rank's worker processes on its own cores
        _share_cores(local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # One connection to the rendezvous store serves the process group and this module's counters.
    store, _, _ = next(rendezvous("env://", rank, world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # Keys of a restarted job's attempt apart from the failed attempt's (the store outlives the workers).
    ours = PrefixStore(f"pneumotriage/{restart}", store)
    dist.init_process_group(
        backend,
        store=PrefixStore("pg", ours),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield Ranks(rank, world, local_rank, local_world, restart, device, PrefixStore("job", ours))
    finally:
        dist.destroy_process_group()

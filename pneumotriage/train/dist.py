"""Training under ``torchrun``: the process group, and what the ranks must agree on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pneumotriage.distributed import joined, launched
from pneumotriage.errors import PneumotriageError
from pneumotriage.io import atomic_write_text
from pneumotriage.runtime import pick_device
from pneumotriage.train.steps import param_checksum


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group that ``torchrun`` describes in the environment (:func:`pneumotriage.distributed.joined`,
    as a scan does; the cores are not split, DataLoader workers use them), or run alone."""
    if not launched():
        yield Dist(), pick_device(device_name)
        return
    with joined(device_name, share_cores=False) as ranks:
        yield Dist(ranks.rank, ranks.world, ranks.local_rank), ranks.device


def broadcast_int(value: int, dist: Dist, device: torch.device) -> int:
    if not dist.enabled:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.broadcast(t, src=0)
    return int(t.item())


def record_rank_checksums(model: nn.Module, dist: Dist, best_path: Path, device: torch.device) -> None:
    """Under DDP, gather every rank's parameter checksum and write them beside the checkpoints: they must agree."""
    if not dist.enabled:
        return
    import torch.distributed as tdist

    mine = torch.tensor([param_checksum(model)], dtype=torch.float64, device=device)
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, mine)
    if dist.main:
        values = [float(g.item()) for g in gathered]
        atomic_write_text(
            best_path.parent / "ranks.json",
            json.dumps({"world_size": dist.world_size, "param_checksums": values}, indent=2) + "\n",
        )
        if len(set(values)) != 1:
            raise PneumotriageError(f"ranks ended with different weights: {values}", path=best_path.parent)

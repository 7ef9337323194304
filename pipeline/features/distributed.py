"""torch.distributed for extraction: under `torchrun`, every rank extracts one contiguous shard of each image
set; rank 0 assembles the shards into the cache entry a single process would write, then scores alone.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Where this process sits: rank among world_size processes, and its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_environment(device_name: str) -> tuple[Topology, str]:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs); returns the topology and this rank's
    device ("cuda:<local rank>" when the configured device is CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Topology(), device_name
    topology = Topology(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    uses_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if uses_cuda:
        torch.cuda.set_device(topology.local_rank)
        device_name = f"cuda:{topology.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if uses_cuda else "gloo")
    return topology, device_name


def shard_bounds(count: int, topology: Topology) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of `count` items: exact, no padding, none dropped."""
    return count * topology.rank // topology.world_size, count * (topology.rank + 1) // topology.world_size


def barrier(topology: Topology) -> None:
    if topology.distributed:
        dist.barrier()


def broadcast_ranges(ranges: list[tuple[int, int]], topology: Topology) -> list[tuple[int, int]]:
    """Rank 0's list of (start, end) row ranges on every rank (as tensors: nothing is pickled)."""
    if not topology.distributed:
        return ranges
    device = torch.device("cuda", topology.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([len(ranges)], dtype=torch.int64, device=device)
    dist.broadcast(count, src=0)
    flat = torch.tensor(ranges if topology.is_main else [(0, 0)] * int(count), dtype=torch.int64,
                        device=device).reshape(-1, 2)
    dist.broadcast(flat, src=0)
    return [(int(start), int(end)) for start, end in flat.tolist()]


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel plumbing. A run is distributed when launched by torchrun (WORLD_SIZE > 1 in the environment):
gloo on CPU, NCCL on GPU; rank 0 alone prints, writes checkpoints and exports."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives put their tensors (NCCL needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun describes in the environment (a single process when it does not)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str) -> World:
    """Join the process group torchrun set up (if any). `device`: "cpu", "cuda" or "auto" (CUDA when present).
    Under torchrun each process takes the GPU of its local rank."""
    world = launched_world()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    world = World(world.rank, world.size, world.local_rank, device)
    if world.distributed and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world


def barrier(world: World) -> None:
    if world.distributed:
        torch_dist.barrier()


def mean(world: World, value: float) -> float:
    """The mean of a float over ranks (every rank gets it)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    torch_dist.all_reduce(t)
    return t.item() / world.size


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is true on one (ranks stop together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=world.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def sum_all(world: World, values: list[float]) -> list[float]:
    """Element-wise sums of floats over ranks."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    torch_dist.all_reduce(t)
    return t.tolist()

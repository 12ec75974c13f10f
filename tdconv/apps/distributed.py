"""Data parallelism under ``torchrun``: the process group, and the reductions that keep every
process's view of a run the same (metrics, BatchNorm statistics, a stop signal)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "init_distributed", "barrier", "all_sum", "all_max", "all_mean_", "reduce_signal"]


def rank_and_world() -> tuple:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> tuple:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``): NCCL for CUDA, Gloo
    otherwise. Returns ``(rank, world_size, device)``, the device being this process's GPU on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    return rank, world, device


def barrier() -> None:
    """Wait for every process (nothing to wait for outside a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def _all_reduce(values: list, device, op) -> list:
    if rank_and_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_sum(values: list, device) -> list:
    """Element-wise sums of ``values`` over all processes."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def all_max(values: list, device) -> list:
    """Element-wise maxima of ``values`` over all processes."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def all_mean_(tensors, world: int) -> None:
    """Average each tensor over all processes, in place."""
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def reduce_signal(signum: int, device) -> int:
    """The stop signal that every process acts on: the one any process received (0: none; of two
    different ones, the larger number). A maximum, not a sum: SIGTERM on two processes is SIGTERM."""
    return int(all_max([signum], device)[0])

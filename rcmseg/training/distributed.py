"""The few distributed-data-parallel (DDP) helpers the trainer needs.

The process group is started by whoever launches the run (``torchrun`` plus the bundle's
``multi_gpu_train.json``, which uses nccl on CUDA and gloo on CPU); without one every helper
behaves as for a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def wrap_ddp(network: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``network`` in DDP when a process group runs and it is not wrapped yet."""
    if not is_distributed() or isinstance(network, DistributedDataParallel):
        return network
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside a DDP wrapper (what checkpoints and validation use)."""
    return network.module if isinstance(network, DistributedDataParallel) else network


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all processes (in place; returned for convenience)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(network: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    Each process updates its running statistics from its own batches; sharing rank 0's keeps
    the whole state identical across ranks, so any rank's checkpoint is the model.
    """
    if is_distributed():
        for buffer in unwrap(network).buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()

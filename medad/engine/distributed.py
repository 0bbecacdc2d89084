"""Small helpers so the same training code runs alone or under ``torchrun`` (PyTorch DDP)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "init_distributed",
    "unwrap",
    "distributed_network",
    "barrier",
    "all_reduce_mean",
    "main_process_first",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; before the process group exists, ``torchrun``'s ``RANK`` (so that code run while a
    bundle is being set up, e.g. the run record, is written by rank 0 only)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 writes checkpoints, maps and tables, so nothing is written twice."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(backend: str | None = None) -> torch.device:
    """Initialise the process group from ``torchrun``'s environment and return this rank's device.

    Args:
        backend: ``"nccl"`` on GPUs, ``"gloo"`` on CPUs; default picks by CUDA availability.
    """
    if not is_distributed():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def distributed_network(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``network`` on ``device``, wrapped in DistributedDataParallel when it has parameters to train.

    A module with nothing to train (the baselines' per-pixel statistics, intensity scoring) is left unwrapped: DDP
    refuses such a module, and there are no gradients to synchronise. BatchNorm becomes SyncBatchNorm on CUDA, so
    the batch statistics span every rank.
    """
    if not any(parameter.requires_grad for parameter in network.parameters()):
        return network.to(device)
    if device.type == "cuda":
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return torch.nn.parallel.DistributedDataParallel(network.to(device), device_ids=[device] if device.type == "cuda" else None)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a DistributedDataParallel / DataParallel wrapper."""
    return network.module if hasattr(network, "module") else network


def all_reduce_mean(values: dict[str, float], device: str | torch.device = "cpu") -> dict[str, float]:
    """Average scalars over the ranks (unchanged without DDP); every rank must call it with the same keys."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    # gloo reduces CPU tensors, nccl CUDA tensors
    device = torch.device(device) if dist.get_backend() != "gloo" else torch.device("cpu")
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= world_size()
    reduced = dict(zip(keys, tensor.tolist()))
    return {k: float(reduced[k]) for k in values}  # the caller's column order


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes the demo data), the other ranks then find its result.

    Every rank must enter the block; without DDP it is a plain block.
    """
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()

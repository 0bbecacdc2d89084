"""medad.engine.distributed: what the multi-GPU workflow wraps in DistributedDataParallel."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from medad.engine import distributed_network
from medad.methods.baselines import BrainIntensity, PixelGaussian


def test_modules_without_trainable_parameters_stay_unwrapped():
    for module in (PixelGaussian(), BrainIntensity()):  # DDP refuses them, and there is nothing to synchronise
        assert distributed_network(module, torch.device("cpu")) is module


def test_a_trainable_network_is_wrapped_in_ddp():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        wrapped = distributed_network(network, torch.device("cpu"))
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is network
        assert isinstance(network[1], torch.nn.BatchNorm2d)  # SyncBatchNorm only on CUDA
    finally:
        dist.destroy_process_group()

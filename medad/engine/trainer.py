"""A clean training loop shared by every bundle.

What differs between methods (the loss, the corruption, an adversary) lives in a *training step*:
a callable ``step(network, batch) -> dict`` whose ``"loss"`` entry is back-propagated. The loop does
the rest: optimiser and LR schedule, gradient clipping, progress bar, CSV log, atomic checkpoints,
resuming after a kill, and rank-0-only writes under ``torchrun``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medad.data.validation import clear_input_errors

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import all_reduce_mean, barrier, is_main_process, unwrap

__all__ = ["Trainer", "warmup_cosine_schedule"]

logger = logging.getLogger("medad.train")


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, stepped every iteration (DISYRE's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


class Trainer:
    """Train a network with a method's training step.

    Args:
        network: the model (optionally wrapped in DistributedDataParallel).
        optimizer: its optimiser.
        train_loader: iterable of batches (dicts of tensors).
        training_step: ``step(network, batch) -> {"loss": scalar tensor, ...}``; if it is an ``nn.Module``
            its state (e.g. a discriminator and its optimiser) is checkpointed too.
        max_steps: stop after this many optimiser steps (the papers count steps).
        max_epochs: or after this many passes over ``train_loader``; at least one of the two is required.
        max_minutes: or after this much training time (a CPU budget for benchmarks); checked every step.
        device: where batches go.
        checkpoint_path: ``models/checkpoint.pt``-like path for the full resumable state.
        model_path: where the final network weights go (``models/model.pt``, the MONAI bundle convention).
        lr_scheduler: stepped every iteration.
        grad_clip_norm: clip the global gradient norm (DISYRE uses 1.0).
        checkpoint_every: steps between checkpoints (also written at the end).
        resume: continue from ``checkpoint_path`` when it exists.
        bundle: name stored in the checkpoint, checked when loading.
        log_path: CSV of step, epoch, loss and the step's other scalars.
        progress: show a tqdm bar (rank 0 only).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable[Mapping[str, Any]],
        training_step: Callable[[torch.nn.Module, Mapping[str, Any]], dict[str, torch.Tensor]],
        max_steps: int | None = None,
        max_epochs: int | None = None,
        max_minutes: float | None = None,
        device: str | torch.device = "cpu",
        checkpoint_path: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        lr_scheduler: Any | None = None,
        grad_clip_norm: float | None = None,
        checkpoint_every: int = 1000,
        resume: bool = True,
        bundle: str | None = None,
        log_path: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if max_steps is None and max_epochs is None:
            raise ValueError("Trainer needs max_steps or max_epochs.")
        self.network = network
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.training_step = training_step
        self.max_steps = max_steps if max_steps is not None else math.inf
        self.max_epochs = max_epochs if max_epochs is not None else math.inf
        self.max_seconds = 60.0 * max_minutes if max_minutes is not None else math.inf
        self.device = torch.device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.model_path = Path(model_path) if model_path else None
        self.lr_scheduler = lr_scheduler
        self.grad_clip_norm = grad_clip_norm
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.bundle = bundle
        self.log_path = Path(log_path) if log_path else None
        self.progress = progress
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "bundle": self.bundle,
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "train_seconds": self.train_seconds,
            "history": self.history,
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if isinstance(self.training_step, torch.nn.Module):
            state["training_step"] = self.training_step.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if isinstance(self.training_step, torch.nn.Module) and "training_step" in state:
            self.training_step.load_state_dict(state["training_step"])
        self.step = int(state.get("step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = list(state.get("history", []))

    def save(self) -> None:
        if not is_main_process():
            return
        state = self.state_dict()
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, state)
        if self.model_path is not None:
            save_checkpoint(self.model_path, {k: state[k] for k in ("bundle", "network", "step", "train_seconds")})

    def _remove_stale_temporaries(self) -> None:
        # A run killed while saving leaves its temporary file (".<name>.<random>.tmp"); the target is intact.
        for path in (self.checkpoint_path, self.model_path):
            if path is not None and path.parent.is_dir() and is_main_process():
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink(missing_ok=True)

    def _maybe_resume(self) -> None:
        self._remove_stale_temporaries()
        if self.resume and self.checkpoint_path is not None and self.checkpoint_path.is_file():
            state = load_checkpoint(self.checkpoint_path, self.device)
            if self.bundle is not None and state.get("bundle") not in (None, self.bundle):
                raise ValueError(
                    f"{self.checkpoint_path}: checkpoint of bundle '{state.get('bundle')}' cannot resume '{self.bundle}'."
                )
            self.load_state_dict(state)
            logger.info("resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, self.epoch)

    # -- loop ----------------------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        # Plain tensors: every op on a MONAI MetaTensor also updates its meta data, which costs more than a
        # small network's convolutions; a training step needs the values only.
        return {k: _plain(v).to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _over_time_budget(self, elapsed: float) -> bool:
        over = self.train_seconds + elapsed >= self.max_seconds
        if self.max_seconds != math.inf and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(over)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # all ranks stop together
            over = bool(flag.item())
        return over

    def _finished(self) -> bool:
        return self.step >= self.max_steps or self.epoch >= self.max_epochs or self._over_time_budget(0.0)

    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.log_path is None or not is_main_process():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.log_path.exists() or self.step <= 1
        with open(self.log_path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)

    def train_iteration(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimiser step on one batch; returns the step's scalars."""
        self.network.train()
        outputs = self.training_step(self.network, self._to_device(batch))
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; lower the learning rate.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.step += 1
        return {k: float(v.detach().mean()) for k, v in outputs.items() if torch.is_tensor(v) and v.numel() > 0}

    def run(self) -> dict[str, Any]:
        """Train until ``max_steps`` or ``max_epochs``; returns a summary (steps, minutes, last loss)."""
        self._maybe_resume()
        total = self.max_steps if self.max_steps != math.inf else None
        if total is None and hasattr(self.train_loader, "__len__"):
            total = int(self.max_epochs * len(self.train_loader))  # type: ignore[arg-type]
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (self.progress and is_main_process()))
        last: dict[str, float] = {}
        while not self._finished():
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)  # a different shuffle on every epoch under DDP
            start = time.perf_counter()
            sums: dict[str, float] = {}
            count = 0
            for batch in clear_input_errors(self.train_loader):
                scalars = self.train_iteration(batch)
                for k, v in scalars.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", epoch=self.epoch)
                if self.step % self.checkpoint_every == 0:
                    self.save()
                if self.step >= self.max_steps or self._over_time_budget(time.perf_counter() - start):
                    break
            self.train_seconds += time.perf_counter() - start
            self.epoch += 1
            # Under DDP every rank saw its own share of the data: log the mean over ranks.
            last = all_reduce_mean({k: v / max(count, 1) for k, v in sums.items()}, self.device)
            self._log({"epoch": self.epoch, "step": self.step, **last, "seconds": self.train_seconds})
        bar.close()
        self.save()
        barrier()
        return {"steps": self.step, "epochs": self.epoch, "train_minutes": self.train_seconds / 60, **last}

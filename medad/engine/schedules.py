"""Learning-rate schedules that are functions of the training *progress*, so they follow any budget.

A paper schedule says "×0.2 at 80 % of training" or "cosine to zero at the end". With a time budget
(``max_minutes``) the number of steps is not known in advance, so a schedule written in steps either never
decays or decays too early. Here every schedule is ``lr = base_lr · factor(progress, step)`` with
``progress ∈ [0, 1]`` supplied by :class:`medad.engine.Trainer` (``max(step/max_steps, epochs/max_epochs,
seconds/max_seconds)``): a run stopped by ``max_minutes`` ends as decayed as one stopped by ``max_steps``.

Outside a trainer (no progress source bound) the progress is ``step / total_steps``, the classic schedule.

This module is the one home of the learning-rate schedules; a bundle names a builder here (``multi_step_schedule``
for FAIR, ``warmup_cosine_schedule`` for DISYRE, ``step_decay_schedule`` for ADDM) with the method's values.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "ProgressScheduler",
    "MultiStepProgressLR",
    "WarmupCosineProgressLR",
    "ExponentialStepProgressLR",
    "multi_step_schedule",
    "warmup_cosine_schedule",
    "step_decay_schedule",
    "training_length",
]


class ProgressScheduler(LRScheduler):
    """Base class: ``lr = base_lr · factor(progress, step)``, stepped once per optimiser step.

    Args:
        optimizer: the optimiser.
        total_steps: steps of a whole run, used only when no trainer supplies the progress (None: a trainer must).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> None:
        self.total_steps = None if total_steps is None else max(1, int(total_steps))
        self.progress = 0.0
        self._progress_source: Callable[[], float] | None = None
        super().__init__(optimizer)

    def bind(self, progress_source: Callable[[], float] | None) -> None:
        """Read the progress from ``progress_source()`` (the trainer's) at every step."""
        self._progress_source = progress_source
        for group, lr in zip(self.optimizer.param_groups, self._learning_rates()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _update_progress(self) -> None:
        if self._progress_source is not None:
            self.progress = min(1.0, max(0.0, float(self._progress_source())))
        elif self.total_steps is not None:
            self.progress = min(1.0, max(0, self.last_epoch) / self.total_steps)
        elif self.last_epoch > 0:
            raise RuntimeError(
                f"{type(self).__name__}: no training length known; give total_steps (or max_steps/max_epochs) "
                "or let medad.engine.Trainer drive it (it binds its progress)."
            )

    def factor(self, progress: float, step: int) -> float:
        """Multiplier of the base learning rate at ``progress`` ∈ [0, 1] after ``step`` optimiser steps."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return self._learning_rates()

    def _learning_rates(self) -> list[float]:
        self._update_progress()
        scale = self.factor(self.progress, max(0, self.last_epoch))
        return [base * scale for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        # the bound progress source is the trainer's method: it is re-bound on resume, never pickled
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_progress_source")}


class MultiStepProgressLR(ProgressScheduler):
    """``lr ×gamma`` at each of ``fractions`` of training (FAIR: ×0.2 at 0.8 and 0.9)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        fractions: Sequence[float],
        gamma: float,
        total_steps: int | None = None,
    ) -> None:
        self.fractions = sorted(float(f) for f in fractions)
        if any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise ValueError(f"schedule fractions must lie in [0, 1], got {list(fractions)}.")
        self.gamma = float(gamma)
        super().__init__(optimizer, total_steps)

    def factor(self, progress: float, step: int) -> float:
        # a tiny tolerance: 0.8 of 100 steps is 80.00000000000001 / 100 in floating point
        return self.gamma ** bisect.bisect_right(self.fractions, progress + 1e-12)


class ExponentialStepProgressLR(ProgressScheduler):
    """``lr ×gamma`` ``num_decays`` times, evenly over training (ADDM: ×0.999 every 200 of its epochs)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, gamma: float, num_decays: float, total_steps: int | None = None
    ) -> None:
        self.gamma = float(gamma)
        self.num_decays = max(0.0, float(num_decays))
        super().__init__(optimizer, total_steps)

    def factor(self, progress: float, step: int) -> float:
        return self.gamma ** math.floor(progress * self.num_decays + 1e-9)


class WarmupCosineProgressLR(ProgressScheduler):
    """Linear warm-up over ``warmup_steps`` steps, then a cosine from 1 to ``min_factor`` over the rest of training.

    The warm-up is counted in steps (it is about optimiser stability, not the budget); the cosine runs over the
    progress left when the warm-up ended, so it reaches ``min_factor`` exactly at the end of any budget.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        min_factor: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_factor = float(min_factor)
        self.warmup_end: float | None = 0.0 if self.warmup_steps == 0 else None
        super().__init__(optimizer, total_steps)

    def factor(self, progress: float, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.warmup_end is None:
            self.warmup_end = min(progress, 1.0 - 1e-9)  # the progress at which the cosine starts
        span = max(1e-12, 1.0 - self.warmup_end)
        cosine = min(1.0, max(0.0, (progress - self.warmup_end) / span))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * cosine))


def training_length(
    max_steps: int | None = None, max_epochs: int | None = None, steps_per_epoch: int | None = None
) -> int:
    """Optimiser steps the :class:`~medad.engine.Trainer` will take: the first of ``max_steps`` and
    ``max_epochs · steps_per_epoch`` to be reached."""
    bounds = [math.inf]
    if max_steps is not None:
        bounds.append(int(max_steps))
    if max_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("max_epochs needs steps_per_epoch (the length of the training loader).")
        bounds.append(int(max_epochs) * int(steps_per_epoch))
    total = min(bounds)
    if total == math.inf:
        raise ValueError("give max_steps or max_epochs to size the learning-rate schedule.")
    return int(total)


def multi_step_schedule(
    optimizer: torch.optim.Optimizer,
    fractions: Sequence[float],
    gamma: float,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    steps_per_epoch: int | None = None,
) -> MultiStepProgressLR:
    """Learning rate ×``gamma`` after each of ``fractions`` of training, stepped every iteration (FAIR: ×0.2 after
    0.8 and 0.9).

    The fractions are of the training *progress* that :class:`~medad.engine.Trainer` reports (steps, epochs or
    ``max_minutes``, whichever ends training first), so a time-budgeted run decays too. Outside a trainer the
    milestones are ``f · total_steps`` with ``total_steps`` from :func:`training_length`.
    """
    total = training_length(max_steps, max_epochs, steps_per_epoch) if max_steps or max_epochs else None
    return MultiStepProgressLR(optimizer, fractions, gamma, total_steps=total)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None = None, min_factor: float = 0.0
) -> WarmupCosineProgressLR:
    """Linear warm-up then cosine decay tied to the training progress (DISYRE's schedule).

    ``total_steps`` is needed only outside a :class:`~medad.engine.Trainer`.
    """
    return WarmupCosineProgressLR(optimizer, warmup_steps, min_factor, total_steps)


def step_decay_schedule(
    optimizer: torch.optim.Optimizer,
    gamma: float,
    decay_every_epochs: float,
    max_epochs: float | None = None,
    max_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> ExponentialStepProgressLR:
    """``lr ×gamma`` every ``decay_every_epochs`` epochs of the planned training (ADDM: ×0.999 every 200 epochs).

    The number of decays is the planned length in epochs (``max_epochs``, else ``max_steps / steps_per_epoch``)
    over ``decay_every_epochs``; they are spread evenly over the progress, so a time budget gets all of them.
    """
    if max_epochs is None:
        if max_steps is None or not steps_per_epoch:
            raise ValueError("step_decay_schedule: give max_epochs, or max_steps and steps_per_epoch, to size the decay.")
        max_epochs = max_steps / steps_per_epoch
    total = None
    if max_steps is not None:
        total = int(max_steps)
    elif steps_per_epoch:
        total = int(max_epochs * steps_per_epoch)
    return ExponentialStepProgressLR(optimizer, gamma, float(max_epochs) / float(decay_every_epochs), total)

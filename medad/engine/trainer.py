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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medad.data.validation import clear_input_errors

from .amp import autocast, check_amp
from .checkpoint import load_checkpoint, load_network_weights, save_checkpoint
from .distributed import all_reduce_mean, barrier, is_distributed, is_main_process, unwrap
from .random_state import capture_random_state, restore_random_state
from .schedules import ProgressScheduler

__all__ = ["Trainer", "TrainingInterrupted"]

logger = logging.getLogger("medad.train")


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped training after a checkpoint was written; exit code 128 + the signal number."""


def _ema_average(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """``multi_avg_fn`` of :class:`torch.optim.swa_utils.AveragedModel`: an EMA whose decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not dominated by the initial weights."""

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
                a.copy_(c)

    return average


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor



class Trainer:
    """Train a network with a method's training step.

    Nothing is lost: a checkpoint is written every ``checkpoint_every`` steps, every ``checkpoint_minutes``
    minutes, at the end, and when SIGINT/SIGTERM arrives (after the step in flight; then the process exits with
    128 + the signal number). A rerun resumes from it and, with step or epoch budgets, ends with the same weights
    as an uninterrupted run: the checkpoint holds every random state (global generators, the corruptions' and
    the data transforms' own generators) and the position in the epoch, which is replayed on resume.

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
        model_path: where the final network weights go (``models/model.pt``, the MONAI bundle convention);
            the EMA weights when ``ema_decay`` is set.
        lr_scheduler: stepped every iteration; a :class:`~medad.engine.schedules.ProgressScheduler` follows
            :attr:`progress`, so it decays on schedule whichever budget ends training.
        grad_clip_norm: clip the global gradient norm (DISYRE uses 1.0).
        checkpoint_every: steps between checkpoints (also written at the end).
        checkpoint_minutes: also write one when this many minutes passed since the last (None: never by time).
        resume: continue from ``checkpoint_path`` when it exists.
        bundle: name stored in the checkpoint, checked when loading.
        log_path: CSV of step, epoch, loss and the step's other scalars.
        progress: show a tqdm bar (rank 0 only).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.999); None: off.
        monitor: a :class:`~medad.engine.monitor.LearningMonitor`, called every ``monitor.every`` steps and at the end.
        handle_signals: install the SIGINT/SIGTERM handlers while training (main thread only).
        tracker: an experiment tracker (:class:`~medad.engine.tracking.MLflowTracker`): the run is started here,
            step losses and monitor records are logged, and it is ended as KILLED / FAILED if training stops so.
        init_weights: start from these network weights (a ``model.pt`` of the same bundle and network settings,
            e.g. a shipped model, to train it further; nnU-Net's ``-pretrained_weights``). Optimiser, schedule
            and step count start fresh; ignored when a checkpoint of this run is resumed.
        profile: add up wall seconds per part of a step in :attr:`profile_seconds`: ``data`` (next batch),
            ``training_step`` (corruption, the network's forward pass and the losses), ``forward`` (the network's
            forward passes inside it, timed by forward hooks), ``backward`` and ``optimizer`` (clipping, step,
            EMA, LR schedule) — ``scripts/benchmark.py --profile``.
        amp: ``"bf16"``: the training step (forward passes and losses) runs under bfloat16 autocast
            (:mod:`medad.engine.amp`); weights, optimiser and checkpoints stay float32. None: full precision.
        compile: ``torch.compile`` the network's forward in place (``nn.Module.compile``: state_dict names and
            checkpoints unchanged); pays off on GPUs over many steps of one input shape, costs minutes on a CPU.
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
        checkpoint_minutes: float | None = 10.0,
        resume: bool = True,
        bundle: str | None = None,
        log_path: str | os.PathLike | None = None,
        progress: bool = True,
        ema_decay: float | None = None,
        monitor: Any | None = None,
        handle_signals: bool = True,
        tracker: Any | None = None,
        init_weights: str | os.PathLike | None = None,
        profile: bool = False,
        amp: str | None = None,
        compile: bool = False,
    ) -> None:
        if max_steps is None and max_epochs is None:
            raise ValueError("Trainer needs max_steps or max_epochs.")
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) (e.g. 0.999) or be null to turn EMA off, got {ema_decay}.")
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
        self.checkpoint_seconds = 60.0 * checkpoint_minutes if checkpoint_minutes else math.inf
        self.resume = resume
        self.bundle = bundle
        self.log_path = Path(log_path) if log_path else None
        self.show_progress = progress
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema = (
            torch.optim.swa_utils.AveragedModel(unwrap(network), multi_avg_fn=_ema_average(float(ema_decay)), use_buffers=True)
            if ema_decay is not None
            else None
        )
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", True) else None
        self.handle_signals = handle_signals
        self.tracker = tracker if is_main_process() else None
        self.init_weights = Path(init_weights).expanduser() if init_weights not in (None, "") else None
        self.amp = check_amp(amp)
        self.compile = bool(compile)
        self.clock: Callable[[], float] = time.perf_counter  # tests replace it with a fake clock
        self.profile_seconds: dict[str, float] | None = {} if profile else None
        self._forward_starts: list[float] = []
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._epoch_sums: dict[str, float] = {}
        self._epoch_rng: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._tick = 0.0
        self._last_save = 0.0
        self._signal: int | None = None
        self._budget_used = False

    # -- progress ------------------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]: ``max(step/max_steps, epochs/max_epochs, seconds/max_seconds)``,
        with fractional epochs; every LR schedule is a function of it."""
        fractions = [0.0]
        if self.max_steps != math.inf:
            fractions.append(self.step / max(1, self.max_steps))
        if self.max_epochs != math.inf:
            length = len(self.train_loader) if hasattr(self.train_loader, "__len__") else 0  # type: ignore[arg-type]
            epochs = self.epoch + (self.batch_in_epoch / length if length else 0.0)
            fractions.append(epochs / max(1, self.max_epochs))
        if self.max_seconds != math.inf:
            fractions.append(self.train_seconds / self.max_seconds)
        return min(1.0, max(fractions))

    def _account_time(self) -> None:
        """Add the time since the last tick to ``train_seconds`` (monitoring and checkpointing are not counted)."""
        now = self.clock()
        self.train_seconds += now - self._tick
        self._tick = now

    def _schedulers(self) -> list[Any]:
        """The trainer's scheduler and any a training step keeps (ADDM's discriminator scheduler)."""
        found = [self.lr_scheduler] if self.lr_scheduler is not None else []
        if isinstance(self.training_step, torch.nn.Module):
            for module in self.training_step.modules():
                found += [v for v in vars(module).values() if isinstance(v, torch.optim.lr_scheduler.LRScheduler)]
        return found

    def _bind_schedulers(self) -> None:
        for scheduler in self._schedulers():
            if isinstance(scheduler, ProgressScheduler):
                scheduler.bind(lambda: self.progress)
            elif self.max_seconds != math.inf and is_main_process():
                logger.warning(
                    "%s counts steps, not the training progress: with max_minutes it will not decay as planned; use a "
                    "medad.engine.schedules scheduler.", type(scheduler).__name__,
                )

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "bundle": self.bundle,
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "epoch_sums": dict(self._epoch_sums),
            # where this epoch's data order and augmentation started, and every random state now
            "epoch_random_state": self._epoch_rng if self.batch_in_epoch else None,
            "random_state": capture_random_state(self.training_step, self.train_loader),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if isinstance(self.training_step, torch.nn.Module):
            state["training_step"] = self.training_step.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if isinstance(self.training_step, torch.nn.Module) and "training_step" in state:
            self.training_step.load_state_dict(state["training_step"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a run that trained without it: start averaging from the current weights
                self.ema = torch.optim.swa_utils.AveragedModel(
                    unwrap(self.network), multi_avg_fn=self.ema.multi_avg_fn, use_buffers=True
                )
        self.step = int(state.get("step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = list(state.get("history", []))
        self._epoch_sums = dict(state.get("epoch_sums", {}))
        self._epoch_rng = state.get("epoch_random_state")
        self._resume_rng = state.get("random_state")
        if self.batch_in_epoch and self._epoch_rng is None:
            self.batch_in_epoch = 0  # a checkpoint of an older medad: restart the epoch

    def deployed_network(self) -> torch.nn.Module:
        """The weights ``model.pt`` holds: the EMA average when ``ema_decay`` is set, else the network."""
        return self.ema.module if self.ema is not None else unwrap(self.network)

    def save(self) -> None:
        self._last_save = self.clock()
        if not is_main_process():
            return
        state = self.state_dict()
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, state)
        if self.model_path is not None:
            model = {k: state[k] for k in ("bundle", "step", "train_seconds")}
            model["network"] = self.deployed_network().state_dict()
            model["ema_decay"] = self.ema_decay
            save_checkpoint(self.model_path, model)

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
            if self._resume_rng is not None and not self.batch_in_epoch:
                restore_random_state(self._resume_rng, self.training_step, self.train_loader)
                self._resume_rng = None
            logger.info("resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, self.epoch)
        elif self.init_weights is not None:
            load_network_weights(unwrap(self.network), self.init_weights, bundle=self.bundle, map_location=self.device)
            logger.info("initialised the network from %s", self.init_weights)

    # -- signals -------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once (the last checkpoint stays valid)
        self._signal = signum
        logger.warning("%s received: finishing step %d, then writing a checkpoint.", signal.Signals(signum).name, self.step + 1)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        return previous

    def _interrupt(self) -> None:
        """Write the checkpoint and leave with exit code 128 + signal number."""
        signum = int(self._signal)  # type: ignore[arg-type]
        self.save()
        where = self.checkpoint_path if self.checkpoint_path is not None else "nowhere (no checkpoint_path is set)"
        message = (
            f"interrupted at step {self.step}, checkpoint written to {where}; run the same command again to resume."
        )
        logger.warning(message)
        if is_main_process() and not logger.hasHandlers():
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(128 + signum)

    # -- loop ----------------------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        # Plain tensors: every op on a MONAI MetaTensor also updates its meta data, which costs more than a
        # small network's convolutions; a training step needs the values only.
        return {k: _plain(v).to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _should_stop(self) -> bool:
        """A budget is used up or a signal arrived (on any rank: all ranks stop together)."""
        over = self.step >= self.max_steps or self.train_seconds >= self.max_seconds or self._signal is not None
        if is_distributed():
            flag = torch.tensor([float(over), float(self._signal or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag[0].item())
            if flag[1].item() and self._signal is None:
                self._signal = int(flag[1].item())
        self._budget_used = self._budget_used or (over and self._signal is None)
        return over

    def _finished(self) -> bool:
        done = self._budget_used or self.step >= self.max_steps or self.epoch >= self.max_epochs
        done = done or self.train_seconds >= self.max_seconds
        if is_distributed() and self.max_seconds != math.inf:  # clocks differ between ranks: stop together
            flag = torch.tensor([float(done)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            done = bool(flag.item())
        return done

    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.log_path is None or not is_main_process():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.log_path.exists() or self.epoch <= 1
        with open(self.log_path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)

    def train_iteration(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimiser step on one batch; returns the step's scalars."""
        self.network.train()
        started = time.perf_counter()
        with autocast(self.device, self.amp):
            outputs = self.training_step(self.network, self._to_device(batch))
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; lower the learning rate.")
        started = self._add_time("training_step", started)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        started = self._add_time("backward", started)
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.network))
        self.step += 1
        self.batch_in_epoch += 1
        self._account_time()  # the schedule below sees this step's progress (steps and seconds)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._add_time("optimizer", started)
        return {k: float(v.detach().mean()) for k, v in outputs.items() if torch.is_tensor(v) and v.numel() > 0}

    def _add_time(self, part: str, started: float) -> float:
        """Book the seconds since ``started`` on ``part`` when profiling; returns now."""
        now = time.perf_counter()
        if self.profile_seconds is not None:
            self.profile_seconds[part] = self.profile_seconds.get(part, 0.0) + now - started
        return now

    def _forward_hooks(self) -> list[Any]:
        """Hooks that time the network's forward passes (profiling only); removed at the end of :meth:`run`."""
        if self.profile_seconds is None:
            return []
        def started(*_: Any) -> None:
            self._forward_starts.append(time.perf_counter())

        def finished(*_: Any) -> None:  # a hook returning a value would replace the network's output
            self._add_time("forward", self._forward_starts.pop())

        module = unwrap(self.network)
        return [module.register_forward_pre_hook(started), module.register_forward_hook(finished)]

    def _monitor(self) -> None:
        if self.monitor is None or not is_main_process():
            return
        record = self.monitor(self.deployed_network(), self.step, self.progress)
        if self.tracker is not None and isinstance(record, Mapping):
            self.tracker.log_metrics(record, step=self.step, prefix="monitor/")
        self._tick = self.clock()  # monitoring time is not training time

    def _batches(self) -> Iterator[Mapping[str, Any]]:
        """This epoch's batches; after a resume in the middle of an epoch, the same order and augmentation as the
        interrupted run, from the next batch on (the epoch's first batches are loaded again and skipped)."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # a different shuffle on every epoch under DDP
        skip = self.batch_in_epoch
        if skip:
            restore_random_state(self._epoch_rng, self.train_loader)  # type: ignore[arg-type]
        else:
            self._epoch_rng = capture_random_state(self.train_loader)
            self._epoch_sums = {}
        iterator = clear_input_errors(self.train_loader)
        for _ in range(skip):
            next(iterator, None)
        if self._resume_rng is not None:
            restore_random_state(self._resume_rng, self.training_step, self.train_loader)
            self._resume_rng = None
        return iterator

    def _run_epoch(self, bar: Any) -> bool:
        """Train one epoch (or its rest); returns False when training must stop inside it."""
        iterator = self._batches()
        self._tick = self.clock()
        while True:
            try:
                fetched = time.perf_counter()
                batch = next(iterator)
            except StopIteration:
                break
            except Exception:
                if self._signal is not None:  # Ctrl-C also stops DataLoader workers: keep what was trained
                    return False
                raise
            self._add_time("data", fetched)
            scalars = self.train_iteration(batch)
            if self.tracker is not None:
                self.tracker.log_training_step(self.step, scalars)
            for k, v in scalars.items():
                self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", epoch=self.epoch)
            if self.monitor is not None and self.monitor.due(self.step):
                self._monitor()
            if self.step % self.checkpoint_every == 0 or self.clock() - self._last_save >= self.checkpoint_seconds:
                self.save()
                self._tick = self.clock()
            if self._should_stop():
                return False
        return True

    def _end_epoch(self) -> dict[str, float]:
        count = max(self.batch_in_epoch, 1)
        self.epoch += 1
        self.batch_in_epoch = 0
        # Under DDP every rank saw its own share of the data: log the mean over ranks.
        last = all_reduce_mean({k: v / count for k, v in self._epoch_sums.items()}, self.device)
        self._epoch_sums = {}
        self._log({"epoch": self.epoch, "step": self.step, **last, "seconds": self.train_seconds})
        return last

    def run(self) -> dict[str, Any]:
        """Train until a budget is used up; returns a summary (steps, epochs, minutes, last losses).

        Raises:
            TrainingInterrupted: (a ``SystemExit``) after SIGINT/SIGTERM, once the checkpoint is written.
        """
        self._maybe_resume()
        if self.compile and getattr(unwrap(self.network), "_compiled_call_impl", None) is None:
            unwrap(self.network).compile()  # in place, after the weights are loaded; compiles at the first step
        self._bind_schedulers()
        if self.tracker is not None:
            self.tracker.start()
        if self.monitor is not None:
            self.monitor.resume(self.step)
        total = self.max_steps if self.max_steps != math.inf else None
        if total is None and hasattr(self.train_loader, "__len__"):
            total = int(self.max_epochs * len(self.train_loader)) if self.max_epochs != math.inf else None  # type: ignore[arg-type]
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (self.show_progress and is_main_process()))
        last: dict[str, float] = {}
        self._signal, self._budget_used = None, False
        previous = self._install_signal_handlers()
        hooks = self._forward_hooks()
        self._last_save = self.clock()
        try:
            while not self._finished():
                completed = self._run_epoch(bar)
                if self._signal is not None:
                    self._interrupt()
                if completed or self._finished():
                    last = self._end_epoch()
            bar.close()
            if self.monitor is not None and not any(r["step"] == self.step for r in self.monitor.records):
                self._monitor()
            self.save()
        except BaseException as error:
            if self.tracker is not None:  # the MLflow run says how it ended
                self.tracker.end("KILLED" if self._signal is not None or isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for hook in hooks:
                hook.remove()
        barrier()
        return {"steps": self.step, "epochs": self.epoch, "train_minutes": self.train_seconds / 60, **last}

"""Where a bundle's training and inference time goes (``scripts/benchmark.py --profile``).

:func:`profile_bundle` builds a bundle's train workflow (its own loaders, network, optimiser and training step, from
``configs/train.json``; the demo data unless a ``dataset_dir`` override is given) and measures, in one process and
alternating round by round so that the machine's load hits both alike:

- the medad :class:`~medad.engine.Trainer`'s steps per second, with the share of each part of a step
  (``Trainer(profile=True)``: data loading, corruption and losses, the network's forward passes, backward pass,
  optimiser);
- a bare PyTorch loop over the same network and optimiser on pre-built batches: the network calls the training step
  made on a few real batches are recorded once (inputs detached), then replayed as forward, MSE to a fixed target,
  backward, gradient clipping as the trainer does, optimiser step — the least any trainer could spend on that
  network;
- the inference overhead of the bundle's evaluation inferer on one evaluation batch: wall time of the inferer and
  the image score ÷ the time of the same network evaluations replayed alone (inputs recorded from a second pass;
  encoder-only passes such as ddpm_kl's feature score included), i.e. wall ÷ (network evaluations × one forward
  pass).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["profile_bundle", "profile_table", "inference_overhead", "network_step_seconds", "PARTS"]

#: the parts of a training step, in the order they are reported
PARTS = ("data", "corruption_and_losses", "forward", "backward", "optimizer", "other")


def _frozen(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args)


class _Recorder(torch.nn.Module):
    """Passes calls through to ``network``; records detached copies of their arguments while ``recording``.

    ``methods`` names other entry points of the network to record as well (in ``method_calls``), e.g.
    ``encoder_features``, which ddpm_kl's feature score calls on the unwrapped network: the method is replaced on
    ``network`` itself, so pass a copy (the training network is never patched).
    """

    def __init__(self, network: torch.nn.Module, methods: Sequence[str] = ()) -> None:
        super().__init__()
        self.network = network
        self.recording = False
        self.calls: list[tuple[tuple[Any, ...], torch.Size]] = []
        self.method_calls: list[tuple[str, tuple[Any, ...]]] = []
        for name in methods:
            original = getattr(network, name, None)
            if callable(original):
                object.__setattr__(network, name, self._recording(name, original))

    def _recording(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def method(*args: Any) -> Any:
            out = original(*args)
            if self.recording:
                self.method_calls.append((name, _frozen(args)))
            return out

        method.original = original  # type: ignore[attr-defined]
        return method

    def forward(self, *args: Any) -> torch.Tensor:
        out = self.network(*args)
        if self.recording:
            self.calls.append((_frozen(args), out.shape))
        return out


def _train_parser(bundle_dir: Path, run_dir: Path, overrides: Mapping[str, Any]):
    from medad.bundle import parser

    settings = dict(overrides)
    return parser(bundle_dir, "train", settings.pop("data", None), **{
        "run_dir": str(run_dir), "tracker": None,
        "trainer#monitor": None, "trainer#checkpoint_path": None, "trainer#model_path": None,
        "trainer#log_path": None, "trainer#progress": False, "trainer#handle_signals": False, "trainer#profile": True,
        **settings,
    })


def _prebuilt_batches(trainer: Any, count: int) -> list[list[tuple[tuple[Any, ...], torch.Size]]]:
    """The network calls the training step makes on ``count`` real batches (arguments detached)."""
    recorder = _Recorder(trainer.network)
    recorder.recording = True
    batches = []
    iterator = iter(trainer.train_loader)
    for _ in range(count):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(trainer.train_loader)
            batch = next(iterator)
        recorder.calls = []
        outputs = trainer.training_step(recorder, trainer._to_device(batch))
        outputs["loss"].detach()
        batches.append(list(recorder.calls))
    trainer.optimizer.zero_grad(set_to_none=True)
    return batches


def _bare_steps(trainer: Any, batches: Sequence[list[tuple[tuple[Any, ...], torch.Size]]], steps: int) -> float:
    """Seconds of ``steps`` bare optimiser steps on the pre-built ``batches`` (cycled)."""
    network, optimizer = trainer.network, trainer.optimizer
    targets = [[torch.zeros(shape, device=trainer.device) for _, shape in calls] for calls in batches]
    network.train()
    start = time.perf_counter()
    for step in range(steps):
        calls = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = sum(F.mse_loss(network(*args), target) for (args, _), target in zip(calls, targets[step % len(batches)]))
        loss.backward()
        if trainer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(network.parameters(), trainer.grad_clip_norm)
        optimizer.step()
    return time.perf_counter() - start


def _trainer_steps(trainer: Any, steps: int) -> float:
    """Seconds of ``steps`` more steps of the medad trainer (a fresh epoch each time: no batches replayed)."""
    trainer.max_steps = trainer.step + steps
    trainer.max_epochs = float("inf")
    trainer.max_seconds = float("inf")
    trainer.batch_in_epoch = 0
    start = time.perf_counter()
    trainer.run()
    return time.perf_counter() - start


def _evaluation_batch(parser: Any) -> tuple[dict[str, Any], Callable[..., dict[str, torch.Tensor]], Callable, dict]:
    """One evaluation batch, the evaluator's inferer and image score, and the inferer's extra arguments."""
    loaders = parser.get_parsed_content("loaders")
    loader = loaders.get("test") or loaders["val"]
    batch = next(iter(loader))
    inferer = parser.get_parsed_content("inferer")
    image_score = parser.get_parsed_content("image_score")
    evaluator = parser.get("evaluator", {})
    foreground_key = evaluator.get("foreground_key")
    if isinstance(foreground_key, str) and foreground_key.startswith("@"):
        foreground_key = parser.get_parsed_content(foreground_key[1:])
    extra = {}
    if foreground_key and foreground_key in batch:
        fg = batch[foreground_key]
        extra["foreground"] = fg.as_tensor() if hasattr(fg, "as_tensor") else fg
    return batch, inferer, image_score, extra


def _inference_overhead(parser: Any, network: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Wall time of inference (inferer + image score) ÷ the same network evaluations replayed alone."""
    batch, inferer, image_score, extra = _evaluation_batch(parser)
    image = batch["image"]
    images = image.as_tensor() if hasattr(image, "as_tensor") else image
    # encoder passes are network work too (ddpm_kl's feature score runs the UNet's encoder on x and each x̂_0)
    recorder = _Recorder(copy.deepcopy(network).eval(), methods=("encoder_features",))
    walls, alone = [], []
    with torch.no_grad():
        for _ in range(repeats):
            torch.manual_seed(0)
            recorder.recording, recorder.calls, recorder.method_calls = False, [], []
            start = time.perf_counter()
            out = inferer(images, recorder, **extra)
            image_score(out["anomaly_map"])
            walls.append(time.perf_counter() - start)
            torch.manual_seed(0)
            recorder.recording = True
            inferer(images, recorder, **extra)
            calls, method_calls = list(recorder.calls), list(recorder.method_calls)
            start = time.perf_counter()
            for args, _ in calls:
                recorder.network(*args)
            for name, args in method_calls:
                getattr(recorder.network, name).original(*args)
            alone.append(time.perf_counter() - start)
    evaluations = sum(int(args[0].shape[0]) for args, _ in calls)
    return {
        "inference_seconds": statistics.median(walls),
        "network_seconds": statistics.median(alone),
        "inference_overhead": statistics.median(walls) / statistics.median(alone),
        "network_evaluations": evaluations,
        "network_calls": len(calls),
        "encoder_passes": sum(int(args[0].shape[0]) for _, args in method_calls),
        "inference_batch": tuple(images.shape),
    }


def profile_bundle(
    bundle: str | os.PathLike,
    run_dir: str | os.PathLike,
    steps: int = 20,
    rounds: int = 3,
    warmup: int = 3,
    prebuilt: int = 4,
    inference_repeats: int = 3,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Training throughput (medad trainer vs a bare loop, with the trainer's time per part) and inference overhead.

    Args:
        bundle: the bundle folder (``bundles/disyre``).
        run_dir: a scratch run folder (demo data and ``run.json`` go there).
        steps / rounds: each round times ``steps`` trainer steps, then ``steps`` bare steps.
        warmup: untimed trainer steps first (allocations, caches).
        prebuilt: real batches recorded for the bare loop.
        inference_repeats: timed inference passes (median).
        overrides: config overrides of the train workflow (e.g. ``{"dataset_dir": ...}``).

    Returns:
        ``bundle``, ``threads``, ``batch`` (the network input shape of a step), ``trainer_steps_per_second``,
        ``bare_steps_per_second``, ``ratio``, ``shares`` (fraction of trainer time per part of :data:`PARTS`),
        ``trainer_seconds`` / ``bare_seconds`` (per round) and the :func:`_inference_overhead` entries.
    """
    bundle_dir = Path(bundle).resolve()
    parser = _train_parser(bundle_dir, Path(run_dir), overrides or {})
    parser.get_parsed_content("initialize")  # the bundle's seed and thread settings, as a run makes them
    trainer = parser.get_parsed_content("trainer")
    _trainer_steps(trainer, warmup)
    batches = _prebuilt_batches(trainer, prebuilt)
    _bare_steps(trainer, batches, warmup)
    trainer.profile_seconds = {}
    trainer_times, bare_times = [], []
    for _ in range(rounds):
        trainer_times.append(_trainer_steps(trainer, steps))
        bare_times.append(_bare_steps(trainer, batches, steps))
    total = sum(trainer_times)
    seconds = dict(trainer.profile_seconds)
    parts = {
        "data": seconds.get("data", 0.0),
        "corruption_and_losses": seconds.get("training_step", 0.0) - seconds.get("forward", 0.0),
        "forward": seconds.get("forward", 0.0),
        "backward": seconds.get("backward", 0.0),
        "optimizer": seconds.get("optimizer", 0.0),
    }
    parts["other"] = total - sum(parts.values())
    result = {
        "bundle": bundle_dir.name,
        "threads": torch.get_num_threads(),
        "batch": [tuple(a.shape) for a in batches[0][0][0] if torch.is_tensor(a)] if batches and batches[0] else [],
        "trainer_steps_per_second": rounds * steps / total,
        "bare_steps_per_second": rounds * steps / sum(bare_times),
        "ratio": sum(bare_times) / total,
        "shares": {k: v / total for k, v in parts.items()},
        "trainer_seconds": trainer_times,
        "bare_seconds": bare_times,
        "load": os.getloadavg()[0],
    }
    result.update(_inference_overhead(parser, trainer.deployed_network(), inference_repeats))
    return result


def inference_overhead(
    bundle: str | os.PathLike,
    run_dir: str | os.PathLike,
    repeats: int = 3,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The inference overhead alone (no training), e.g. at network sizes too large to train here.

    The network is the bundle's ``network_def`` as configured (random weights: the overhead is a matter of shapes,
    not of values); everything else as in :func:`profile_bundle`.

    Returns:
        ``bundle``, ``threads``, ``load`` and the :func:`_inference_overhead` entries.
    """
    bundle_dir = Path(bundle).resolve()
    parser = _train_parser(bundle_dir, Path(run_dir), overrides or {})
    parser.get_parsed_content("initialize")
    network = parser.get_parsed_content("network_def")
    result: dict[str, Any] = {"bundle": bundle_dir.name, "threads": torch.get_num_threads(),
                              "parameters": sum(p.numel() for p in network.parameters())}
    result.update(_inference_overhead(parser, network, repeats))
    result["load"] = os.getloadavg()[0]
    return result


def network_step_seconds(
    network: torch.nn.Module, batch_shape: Sequence[int], num_timesteps: int = 100, repeats: int = 3
) -> float:
    """Median wall time of one training step of ``network`` alone: forward on random ``(B, C, *spatial)`` inputs
    with random timesteps, MSE to the input, backward, an AdamW step. No data loading, corruption or second
    network (e.g. ADDM's discriminator): a lower bound of what a trainer spends on that network per step.

    The first step (allocation, kernel selection) is not counted; ``repeats`` timed steps follow it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.rand(*batch_shape)
    t = torch.randint(0, num_timesteps, (batch_shape[0],))
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = F.mse_loss(network(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def profile_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`profile_bundle` results."""
    header = ("| bundle | threads | step input | trainer steps/s | bare steps/s | ratio | "
              + " | ".join(p.replace("_", " ") for p in PARTS) + " | inference overhead | load |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        shares = " | ".join(f"{100 * r['shares'][p]:.0f} %" for p in PARTS)
        shape = "; ".join("×".join(str(s) for s in shape) for shape in r["batch"][:1])
        lines.append(
            f"| {r['bundle']} | {r['threads']} | {shape} | {r['trainer_steps_per_second']:.2f} | "
            f"{r['bare_steps_per_second']:.2f} | {r['ratio']:.2f} | {shares} | {r['inference_overhead']:.2f} "
            f"({r['network_evaluations']} evaluations) | {r['load']:.1f} |"
        )
    return "\n".join(lines)

"""Trainer: nothing lost on SIGINT (same final weights after resume), schedules tied to the budget, EMA, monitor."""

from __future__ import annotations

import logging
import multiprocessing
import runpy
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medad.engine import (
    LearningMonitor,
    Trainer,
    load_checkpoint,
    multi_step_schedule,
    step_decay_schedule,
    warmup_cosine_schedule,
)
from medad.inferers import SliceAggregationInferer
from medad.inferers.base import AnomalyInferer
from tests.helpers import signal_when_ready

# A tiny run that draws from every kind of random stream: the loader's shuffle (global torch RNG), MONAI random
# transforms (their own numpy states), a training step's private torch.Generator, and the global numpy RNG.
SCRIPT = textwrap.dedent('''
    import sys, time
    import numpy as np
    import torch
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader
    from monai.utils import set_determinism
    from medad.engine import Trainer, multi_step_schedule
    
    max_steps, pause, run_dir = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    set_determinism(seed=0)
    items = [{"image": torch.rand(1, 8, 8)} for _ in range(10)]
    transform = mt.Compose([mt.RandFlipd("image", prob=0.5, spatial_axis=0), mt.RandGaussianNoised("image", prob=0.5)])
    loader = DataLoader(CacheDataset(items, transform, progress=False), batch_size=2, shuffle=True)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.generator = torch.Generator().manual_seed(1)

        def forward(self, net, batch):
            x = batch["image"]
            noisy = x + 0.1 * torch.randn(x.shape, generator=self.generator) + 0.05 * torch.randn_like(x)
            weight = float(np.random.uniform(0.5, 1.5))
            with open(run_dir + "/steps.txt", "a") as f:
                f.write("x")
            time.sleep(pause)
            return {"loss": weight * ((net(noisy) - x) ** 2).mean()}

    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    trainer = Trainer(network, optimizer, loader, Step(), max_steps=max_steps,
                      lr_scheduler=multi_step_schedule(optimizer, fractions=[0.5], gamma=0.2),
                      checkpoint_path=run_dir + "/checkpoint.pt", model_path=run_dir + "/model.pt",
                      checkpoint_every=1000, ema_decay=0.9, progress=False)
    trainer.run()
''')


def _run_script(script: str, argv: list[str]) -> None:
    logging.basicConfig(filename=str(Path(argv[2]) / "train.log"), level=logging.INFO, force=True)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def _steps_done(run_dir: Path) -> int:
    marker = run_dir / "steps.txt"
    return len(marker.read_text(encoding="utf-8")) if marker.is_file() else 0


def test_sigint_writes_a_checkpoint_and_the_rerun_ends_with_the_same_weights(tmp_path: Path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir()
    interrupted.mkdir()
    # the reference: uninterrupted, 14 steps = 2.8 epochs of 5 batches, LR x0.2 at step 7
    _run_script(str(script), ["14", "0", str(reference)])

    # the same run in a forked process, stopped by a real SIGINT in the middle of an epoch
    process = multiprocessing.get_context("fork").Process(
        target=_run_script, args=(str(script), ["14", "0.2", str(interrupted)]), daemon=True
    )
    signal_when_ready(process, lambda: _steps_done(interrupted) >= 3, signal.SIGINT, timeout=60, poll=0.02)
    assert process.exitcode == 128 + signal.SIGINT
    stopped_at = load_checkpoint(interrupted / "checkpoint.pt")["step"]
    assert 3 <= stopped_at < 14 and stopped_at % 5 != 0, stopped_at  # mid-epoch, before the end
    log = (interrupted / "train.log").read_text(encoding="utf-8")
    assert f"interrupted at step {stopped_at}, checkpoint written to {interrupted / 'checkpoint.pt'}" in log

    _run_script(str(script), ["14", "0", str(interrupted)])  # the rerun resumes and finishes
    assert _steps_done(interrupted) == 14  # both processes together: no step trained twice, none skipped
    done, expected = load_checkpoint(interrupted / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert done["step"] == expected["step"] == 14
    for part in ("network", "ema"):
        for key, value in expected[part].items():
            torch.testing.assert_close(done[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")
    for key, value in load_checkpoint(reference / "model.pt")["network"].items():  # model.pt = the EMA weights
        torch.testing.assert_close(load_checkpoint(interrupted / "model.pt")["network"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(expected["ema"][f"module.{key}"], value)


# -- schedules follow the budget ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _time_budget_run(make_scheduler, tmp_path: Path, minutes: float = 1.0) -> tuple[Trainer, list[float]]:
    torch.manual_seed(0)
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer)
    lrs: list[float] = []

    def step(net, batch):
        lrs.append(optimizer.param_groups[0]["lr"])
        return {"loss": 0.0 * net(batch["x"]).sum()}  # only the schedule is under test

    batches = [{"x": torch.randn(4, 2)} for _ in range(3)]
    # a paper-length step budget that is never reached: the time budget ends training, as in a CPU benchmark
    trainer = Trainer(network, optimizer, batches, step, max_steps=10**6, max_minutes=minutes, lr_scheduler=scheduler,
                      checkpoint_path=tmp_path / "checkpoint.pt", progress=False, handle_signals=False)
    trainer.clock = FakeClock(0.25)
    trainer.run()
    return trainer, lrs + [optimizer.param_groups[0]["lr"]]


def test_fair_schedule_decays_at_80_and_90_percent_of_a_time_budget(tmp_path: Path):
    trainer, lrs = _time_budget_run(lambda opt: multi_step_schedule(opt, (0.8, 0.9), 0.2, max_steps=10**6), tmp_path)
    assert trainer.progress == 1.0 and 50 < trainer.step < 10**6
    assert lrs[-1] == pytest.approx(0.04)  # x0.2 twice: as decayed as a run stopped by max_steps
    first_decay, second_decay = lrs.index(pytest.approx(0.2)), lrs.index(pytest.approx(0.04))
    assert 0.75 < first_decay / trainer.step < 0.85 and 0.85 < second_decay / trainer.step < 0.95


def test_warmup_cosine_and_addm_decay_end_decayed_under_a_time_budget(tmp_path: Path):
    trainer, lrs = _time_budget_run(lambda opt: warmup_cosine_schedule(opt, warmup_steps=5), tmp_path)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[len(lrs) // 2] == pytest.approx(0.5, abs=0.05)
    # ADDM: x0.999 every 200 of 3000 epochs = 15 decays, all of them within the time budget
    _, lrs = _time_budget_run(lambda opt: step_decay_schedule(opt, 0.5, 200, max_epochs=3000), tmp_path / "addm")
    assert lrs[-1] == pytest.approx(0.5**15)


def test_warmup_cosine_matches_the_step_schedule_when_steps_end_training(tmp_path: Path):
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=4, total_steps=20)
    lrs = []

    def step(net, batch):
        lrs.append(optimizer.param_groups[0]["lr"])
        return {"loss": 0.0 * net(batch["x"]).sum()}  # only the schedule is under test

    Trainer(network, optimizer, [{"x": torch.randn(2, 2)}] * 3, step, max_steps=20, lr_scheduler=scheduler,
            progress=False, handle_signals=False).run()
    import math

    expected = [(s + 1) / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(20)]
    assert lrs == pytest.approx(expected)


def test_checkpoints_are_also_written_every_n_minutes(tmp_path: Path):
    network = torch.nn.Linear(2, 1)
    trainer = Trainer(network, torch.optim.SGD(network.parameters(), lr=0.1), [{"x": torch.randn(2, 2)}] * 4,
                      lambda net, b: {"loss": net(b["x"]).pow(2).mean()}, max_steps=40, checkpoint_every=10**6,
                      checkpoint_minutes=1, checkpoint_path=tmp_path / "checkpoint.pt", progress=False,
                      handle_signals=False)
    trainer.clock = FakeClock(5.0)  # ~ 2-3 clock reads per step: about one minute every 5 steps
    saved_at = []
    original = trainer.save
    trainer.save = lambda: (saved_at.append(trainer.step), original())[1]  # type: ignore[method-assign]
    trainer.run()
    assert len(saved_at) >= 4 and saved_at[-1] == 40 and saved_at[0] < 20


def test_ema_weights_go_to_model_pt_and_the_checkpoint_keeps_both(tmp_path: Path):
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 1)
    batches = [{"x": torch.randn(4, 3)} for _ in range(3)]
    trainer = Trainer(network, torch.optim.SGD(network.parameters(), lr=0.5), batches,
                      lambda net, b: {"loss": (net(b["x"]) - 1).pow(2).mean()}, max_steps=6, ema_decay=0.5,
                      checkpoint_path=tmp_path / "checkpoint.pt", model_path=tmp_path / "model.pt", progress=False,
                      handle_signals=False)
    # the EMA by hand: decay min(0.5, (1 + n) / (10 + n)) after n updates, starting from the first step's weights
    weights = []
    original = trainer.optimizer.step

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        weights.append(network.weight.detach().clone())
        return out

    trainer.optimizer.step = record  # type: ignore[method-assign]
    trainer.run()
    ema = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        ema = decay * ema + (1 - decay) * w
    model, checkpoint = load_checkpoint(tmp_path / "model.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(model["network"]["weight"], ema)
    assert model["ema_decay"] == 0.5
    torch.testing.assert_close(checkpoint["network"]["weight"], network.weight.detach())
    torch.testing.assert_close(checkpoint["ema"]["module.weight"], ema)
    assert not torch.allclose(ema, network.weight.detach())


def test_init_weights_start_training_from_a_model_and_a_resumed_run_ignores_them(tmp_path: Path):
    torch.manual_seed(0)
    shipped = torch.nn.Linear(3, 1)
    torch.save({"network": shipped.state_dict(), "bundle": "toy"}, tmp_path / "shipped.pt")
    batches = [{"x": torch.randn(4, 3)} for _ in range(3)]

    def make(max_steps: int, lr: float, run: str) -> Trainer:
        network = torch.nn.Linear(3, 1)  # other random weights
        return Trainer(network, torch.optim.SGD(network.parameters(), lr=lr), batches,
                       lambda net, b: {"loss": (net(b["x"]) - 1).pow(2).mean()}, max_steps=max_steps,
                       checkpoint_path=tmp_path / run / "checkpoint.pt", model_path=tmp_path / run / "model.pt",
                       init_weights=tmp_path / "shipped.pt", bundle="toy", progress=False, handle_signals=False)

    frozen = make(max_steps=2, lr=0.0, run="frozen")  # lr 0: the trained weights are the initial ones
    frozen.run()
    torch.testing.assert_close(frozen.network.weight.detach(), shipped.weight.detach())
    trained = make(max_steps=2, lr=0.1, run="trained")
    trained.run()
    moved = trained.network.weight.detach().clone()
    assert not torch.allclose(moved, shipped.weight.detach())
    resumed = make(max_steps=2, lr=0.1, run="trained")
    resumed.run()  # resumes the run's checkpoint (step 2), not the shipped weights again
    assert resumed.step == 2
    torch.testing.assert_close(resumed.network.weight.detach(), moved)
    with pytest.raises(Exception, match="bundle 'toy', not 'other'"):
        other = torch.nn.Linear(3, 1)
        Trainer(other, torch.optim.SGD(other.parameters(), lr=0.1), batches, lambda net, b: {"loss": net(b["x"]).sum()},
                max_steps=1, init_weights=tmp_path / "shipped.pt", bundle="other", progress=False,
                handle_signals=False).run()


# -- learning monitor -----------------------------------------------------------------------------------------
class ResidualInferer(AnomalyInferer):
    """restoration = network(x); map = squared error summed over channels."""

    def __call__(self, inputs, network, *args, **kwargs):
        restoration = network(inputs)
        return {"restoration": restoration, "anomaly_map": ((inputs - restoration) ** 2).sum(1, keepdim=True)}


class Blur(torch.nn.Module):
    """A "restoration" that smooths: it damages normal images a little and removes part of small anomalies."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = torch.linspace(0.2, 0.8, size)
    smooth = (base[None, :] + base[:, None]) / 2
    return (smooth + 0.01 * torch.randn(n, 1, size, size, generator=generator)).clamp(0, 1)


def test_monitor_records_restoration_vs_do_nothing_and_writes_the_curve(tmp_path: Path, caplog):
    loader = [{"image": _images()[:3]}, {"image": _images()[3:]}]
    monitor = LearningMonitor(loader, ResidualInferer(), tmp_path, every=2, num_images=4)
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="medad.train"):
        record = monitor(Blur(), step=2, progress=0.5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the monitor never shifts training's random stream
    assert monitor.prepare()["clean"].shape == (4, 1, 32, 32)
    assert 0 < record["mse_normal"] < record["do_nothing_corrupted"]  # smoothing costs less than the anomalies
    assert record["mse_inside"] < record["do_nothing_inside"]  # and removes part of them
    assert record["pixel_auroc"] > 0.7
    assert "monitor step 2" in caplog.text and "WARNING" not in caplog.text
    # an identity "restoration": as good as doing nothing on normals, heals nothing, finds nothing
    identity = monitor(torch.nn.Identity(), step=4)
    assert identity["mse_normal"] == 0 and identity["mse_inside"] == pytest.approx(identity["do_nothing_inside"])
    assert "does not heal anomalies" in caplog.text
    # a restoration that destroys the image: worse than doing nothing, said clearly
    black = Blur()
    black.scale.data.zero_()
    monitor(black, step=6)
    assert "worse than doing nothing" in caplog.text
    rows = (tmp_path / "learning_curve.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4 and rows[0].startswith("step,progress,mse_normal")
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    monitor.resume(4)  # a resumed run keeps the curve up to its checkpoint
    assert [r["step"] for r in monitor.records] == [2, 4]


def test_monitor_takes_fixed_axial_slices_of_mri_volumes_and_runs_in_the_trainer(tmp_path: Path):
    volume = _images(n=10, size=24).permute(1, 2, 3, 0)[None]  # (1, 1, 24, 24, 10)
    brain = torch.zeros_like(volume)
    brain[..., 2:22, 2:22, 1:9] = 1
    loader = [{"image": volume * brain, "brain_mask": brain}, {"image": volume.flip(-1) * brain, "brain_mask": brain}]
    monitor = LearningMonitor(loader, SliceAggregationInferer(ResidualInferer(), size_divisor=1), tmp_path, every=3,
                              slices_per_volume=3)
    data = monitor.prepare()
    assert data["clean"].shape == (2, 1, 24, 24, 3) and data["labels"].shape == (6, 1, 24, 24)
    assert data["labels"].sum() > 0 and (data["labels"] <= data["region"]).all()  # anomalies only inside the brain
    network = Blur()
    trainer = Trainer(network, torch.optim.SGD(network.parameters(), lr=0.01), [{"x": torch.ones(1)}] * 2,
                      lambda net, b: {"loss": (net.scale - 1.1) ** 2}, max_steps=7, monitor=monitor,
                      checkpoint_path=tmp_path / "checkpoint.pt", progress=False, handle_signals=False)
    trainer.run()
    assert [r["step"] for r in monitor.records] == [3, 6, 7]  # every 3 steps and at the end
    assert all(0.0 <= r["pixel_auroc"] <= 1.0 for r in monitor.records)

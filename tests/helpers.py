"""Small stand-ins shared by several test modules (one definition each; the modules import them)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from html.parser import HTMLParser
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch

from medad.diffusion import SyntheticAnomalySchedule
from medad.inferers import AnomalyInferer
from medad.methods.baselines import PixelGaussian
from medad.networks import AnomalyUNet

#: DISYRE's default schedule of synthetic anomalies
SCHEDULE = SyntheticAnomalySchedule()


def brains(batch: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that are 0 outside a disk (the 'brain'), and the disk masks, (B, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fg = (((yy - size // 2) ** 2 + (xx - size // 2 + 4) ** 2) < (size // 3) ** 2).float()
    x = (0.2 + 0.6 * torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))) * fg
    return x, fg.expand(batch, 1, size, size).clone()


class Constant(torch.nn.Module):
    """x̂_0 = c everywhere; records the inputs and timesteps it is called with."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return torch.full_like(x, self.value)


def fair_unet(in_channels: int = 1, out_channels: int = 3) -> AnomalyUNet:
    """FAIR's network family (additive skips, BatchNorm, sigmoid) at a test-sized width."""
    return AnomalyUNet(2, in_channels, out_channels, channels=(8, 16), num_res_blocks=(1, 0),
                       attention_levels=(False, False), with_timestep=False, skip_mode="add", norm="batch",
                       act="RELU", output_activation="sigmoid")


class Recorder(torch.nn.Module):
    """Returns a fixed restoration and remembers what it was given (a stand-in for the UNet)."""

    def __init__(self, restoration: torch.Tensor) -> None:
        super().__init__()
        self.restoration = restoration
        self.weight = torch.nn.Parameter(torch.zeros(()))  # so the loss has something to differentiate
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.restoration + 0 * self.weight


def random_unet(**kwargs) -> AnomalyUNet:
    """A small time-free UNet with random (seeded) weights: a non-trivial function, in eval mode."""
    torch.manual_seed(0)
    net = AnomalyUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), num_res_blocks=1,
                      attention_levels=(False, False), norm_num_groups=8, with_timestep=False, **kwargs)
    for p in net.parameters():  # a non-trivial function (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


class ResidualInferer(AnomalyInferer):
    """|x - net(x)| and net(x): a deterministic restoration inferer."""

    def __call__(self, inputs, network, *args, **kwargs):
        restoration = network(inputs)
        return {"anomaly_map": (inputs - restoration).abs().mean(dim=1, keepdim=True), "restoration": restoration}


def fitted_gaussian(images: torch.Tensor, std_floor: float = 0.01, chunk: int = 3) -> PixelGaussian:
    """A :class:`PixelGaussian` fitted on ``images`` (N, C, *spatial) in chunks of ``chunk``."""
    model = PixelGaussian(std_floor)
    for start in range(0, len(images), chunk):
        model.update(images[start : start + chunk])
    return model


class _ReportText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.cells: dict[str, str] = {}
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        self._key = dict(attrs).get("data-key") if tag == "td" else None

    def handle_data(self, data):
        self.parts.append(data)
        if self._key:
            self.cells[self._key] = data
            self._key = None


def report_cells(html: str) -> tuple[dict[str, str], str]:
    """The text of each metric cell of a report (``<td data-key=...>``) by key, and the page's whole text."""
    page = _ReportText()
    page.feed(html)
    return page.cells, " ".join(page.parts)


def signal_when_ready(process: BaseProcess, ready: Callable[[], bool], sig: int, timeout: float, poll: float) -> None:
    """Start ``process`` (a training), wait until ``ready()`` (at most ``timeout`` s), send it ``sig`` and wait for it
    to end; it is killed if anything fails, so no test leaves a training behind."""
    process.start()
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.is_alive() and not ready():
            time.sleep(poll)
        assert process.is_alive(), f"training ended early with exit code {process.exitcode}"
        os.kill(process.pid, sig)
        process.join(timeout=30)
    finally:
        if process.is_alive():
            process.kill()


#: the IXI head the MRI preprocessing tests run on (``../shared/data/ixi_t1_2mm``)
IXI_CASE = "IXI012-HH-1211_T1"


def ixi_cohort_input(ixi_dir: Path, root: Path) -> Path:
    """``root/input`` holding a link to :data:`IXI_CASE` (a cohort of one for ``medad preprocess``); returns the
    linked file. Skips the test when the head is not available."""
    source = ixi_dir / f"{IXI_CASE}.nii.gz"
    if not source.exists():
        pytest.skip(f"{source} not available")
    (root / "input").mkdir()
    (root / "input" / source.name).symlink_to(source)
    return source

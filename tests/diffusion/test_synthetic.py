"""DISYRE's synthetic-anomaly schedule (medad.diffusion.SyntheticAnomalySchedule): α_t, t(α), restoration steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medad.diffusion import SyntheticAnomalySchedule, make_diffusion

SCHEDULE = SyntheticAnomalySchedule()


def test_schedule_is_the_flipped_sqrt_alpha_bar_and_grows_with_t():
    diffusion = make_diffusion("linear", 100, "start_x", beta_start=1e-3, beta_end=0.2)
    np.testing.assert_allclose(SCHEDULE.alphas, diffusion.sqrt_alphas_cumprod[::-1])
    assert np.all(np.diff(SCHEDULE.alphas) > 0)  # corruption strength grows with t
    assert SCHEDULE.alphas[-1] == pytest.approx(np.sqrt(1 - 1e-3))  # α_{T-1} = √ᾱ_0 = √(1 − β_1)
    assert 0 < SCHEDULE.alphas[0] < 0.01
    assert float(SCHEDULE.alpha(-1)) == 0.0  # "after the last step": the clean image


def test_alpha_to_timestep_is_monotone_and_inverts_the_schedule():
    t = torch.arange(100)
    assert torch.equal(SCHEDULE.timestep_for_alpha(SCHEDULE.alpha(t).double()), t)
    steps = SCHEDULE.timestep_for_alpha(torch.linspace(0, 1, 201))
    assert (steps[1:] >= steps[:-1]).all() and steps[0] == 0 and steps[-1] == 99
    midpoint = (SCHEDULE.alphas[40] + SCHEDULE.alphas[41]) / 2  # argmin |α_t − α|: the nearer neighbour wins
    assert int(SCHEDULE.timestep_for_alpha(midpoint - 1e-6)) == 40
    assert int(SCHEDULE.timestep_for_alpha(midpoint + 1e-6)) == 41


def test_restoration_timesteps_use_the_official_trailing_spacing():
    assert SCHEDULE.restoration_timesteps(5) == [99, 79, 59, 39, 19]
    assert SCHEDULE.restoration_timesteps(1) == [99]
    assert SCHEDULE.restoration_timesteps(100) == list(range(99, -1, -1))
    with pytest.raises(ValueError):
        SCHEDULE.restoration_timesteps(0)

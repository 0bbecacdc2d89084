"""DISYRE (seed 003): the foreign-patch corruption of the training step and its x_0-prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medad.corruptions import ForeignPatchCorruption
from medad.methods import SyntheticAnomalyStep
from medad.networks import AnomalyUNet
from tests.helpers import SCHEDULE, brains


def test_corruption_is_identity_at_alpha_zero_and_stays_in_the_foreground():
    x, fg = brains()
    step = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=0)
    clean = step.corrupt(x, fg, alpha=torch.zeros(4))
    assert torch.equal(clean["x_t"], x) and torch.equal(clean["t"], torch.zeros(4, dtype=torch.long))
    out = step.corrupt(x, fg)
    mask = out["mask"]
    assert mask.min() >= 0 and mask.max() <= 1 and (mask.amax(dim=(1, 2, 3)) > 0).all()
    assert (mask[fg == 0] == 0).all() and torch.equal(out["x_t"][fg == 0], x[fg == 0])
    assert torch.equal(out["t"], SCHEDULE.timestep_for_alpha(out["alpha"]))


def test_corruption_is_linear_in_alpha():
    # eq. 1: x̃ − x = α·m·(x_f − x); the same draws with α = 1 and α = 0.4 differ by the factor 0.4
    x, fg = brains()
    strong = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=3).corrupt(x, fg, alpha=torch.ones(4))
    weak = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=3).corrupt(x, fg, alpha=torch.full((4,), 0.4))
    torch.testing.assert_close(weak["x_t"] - x, 0.4 * (strong["x_t"] - x), atol=1e-6, rtol=0)
    assert (strong["t"] == 99).all() and (weak["t"] == SCHEDULE.timestep_for_alpha(torch.tensor(0.4))).all()


def test_training_step_is_mse_of_the_x0_prediction_at_t_of_alpha():
    x, fg = brains()
    batch = {"image": x, "brain_mask": fg}
    expected = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1).corrupt(x, fg)
    seen = {}

    def identity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["t"] = t
        return x_t

    out = SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1)(identity, batch)
    torch.testing.assert_close(out["loss"], F.mse_loss(expected["x_t"], x))
    assert torch.equal(seen["t"], expected["t"])
    network = AnomalyUNet(2, 1, 1, channels=(8, 16), num_res_blocks=1, attention_levels=(False, False))
    SyntheticAnomalyStep(SCHEDULE, ForeignPatchCorruption(16), seed=1)(network, batch)["loss"].backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)


def test_official_dag_conditions_on_the_larger_of_the_two_strengths():
    # trainer_disyre.py: t = t(max(alpha_texture, alpha_bias)) where alpha_bias is the bias's clipped change
    x, fg = brains()
    dag = ForeignPatchCorruption(16, bias_after_prob=1.0)
    out = SyntheticAnomalyStep(SCHEDULE, dag, seed=2).corrupt(x, fg, alpha=torch.zeros(4))
    assert (out["alpha"] > 0).all() and torch.equal(out["t"], SCHEDULE.timestep_for_alpha(out["alpha"]))
    torch.testing.assert_close(out["alpha"], (out["x_t"] - x).abs().flatten(1).amax(1))

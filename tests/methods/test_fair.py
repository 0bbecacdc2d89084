"""FAIR (seed 002): the training step (corruption, high-frequency input, L2 + SSIM loss)."""

from __future__ import annotations

import pytest
import torch

from medad.methods import FairTrainingStep
from medad.transforms.frequency import HighFrequencyInput
from tests.helpers import Recorder, fair_unet


def test_training_step_gives_finite_loss_and_gradients():
    torch.manual_seed(0)
    network = fair_unet()
    step = FairTrainingStep(seed=0)
    out = step(network, {"image": torch.rand(4, 3, 16, 16)})
    assert set(out) == {"loss", "l2", "ssim"} and out["loss"].ndim == 0
    assert torch.isfinite(out["loss"]) and torch.isclose(out["loss"], out["l2"] + out["ssim"])
    out["loss"].backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_loss_is_l2_plus_one_minus_ssim_and_input_is_the_highpass():
    images = torch.rand(2, 3, 16, 16)
    step = FairTrainingStep(corrupt=False, margin=0)  # margin 0: the Recorder returns image-sized outputs
    exact = Recorder(images.clone())
    out = step(exact, {"image": images})
    assert float(out["loss"].detach()) < 1e-6  # perfect restoration: L2 = 0 and SSIM = 1
    assert torch.allclose(exact.seen, HighFrequencyInput()(images))

    shifted = Recorder((images + 0.1).clamp(0, 1))
    out = step(shifted, {"image": images})
    assert torch.isclose(out["l2"], ((shifted.restoration - images) ** 2).mean())
    assert 0 < float(out["ssim"]) < 1


def test_corruption_changes_the_input_but_clean_branch_does_not():
    images = torch.rand(4, 3, 32, 32)
    never = FairTrainingStep(p_clean=1.0, rotate_prob=0.0)
    targets, corrupted = never.corrupt_batch(images)
    assert torch.equal(targets, images) and torch.equal(corrupted, images)
    always = FairTrainingStep(p_clean=0.0, rotate_prob=0.0, seed=1, margin=0)
    targets, corrupted = always.corrupt_batch(images)
    assert torch.equal(targets, images)
    changed = (corrupted - images).abs().flatten(1).amax(dim=1) > 0
    assert changed.all()
    # precomputed corruptions in the batch (RandFairCorruptiond in the loader) are used as they are
    recorder = Recorder(images.clone())
    always(recorder, {"image": images, "corrupted": corrupted})
    assert torch.allclose(recorder.seen, HighFrequencyInput()(corrupted))


def test_training_step_rejects_a_network_with_the_wrong_output_channels():
    step = FairTrainingStep(corrupt=False)
    with pytest.raises(ValueError, match="out_channels"):
        step(Recorder(torch.rand(2, 1, 16, 16)), {"image": torch.rand(2, 3, 16, 16)})

"""ADDM (seed 004): the adversarial diffusion step and its checkpointed discriminator (simplex training noise included).

Simplex-noise statistics themselves (zero mean, unit variance, spatial correlation, independent fields) are
tested in ``tests/corruptions/test_corruptions.py``; here only the paths that draw it for ADDM are.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from medad.diffusion import make_diffusion
from medad.engine import Trainer
from medad.methods import AdversarialDiffusionStep
from medad.networks import AnomalyUNet, PatchDiscriminator


def tiny_unet(channels: int = 1) -> AnomalyUNet:
    return AnomalyUNet(
        spatial_dims=2, in_channels=channels, out_channels=channels, channels=(8, 16), num_res_blocks=1,
        attention_levels=(False, False), num_head_channels=8, with_timestep=True,
    )


def tiny_step(noise: str = "gaussian", weight: float = 0.05, lr: float = 1e-3) -> AdversarialDiffusionStep:
    discriminator = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=1, num_layers_d=2)
    return AdversarialDiffusionStep(
        make_diffusion("linear", 1000), discriminator, adversarial_weight=weight, discriminator_lr=lr, noise=noise,
        simplex_kwargs={"frequency": 8},
    )


def lag1_correlation(x: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])


def test_step_losses_are_finite_and_combine_with_lambda():
    torch.manual_seed(0)
    step, network = tiny_step(weight=0.05), tiny_unet()
    out = step(network, {"image": torch.rand(4, 1, 16, 16)})
    assert set(out) == {"loss", "ddpm", "mse", "adversarial", "discriminator"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"].detach(), out["ddpm"] + 0.05 * out["adversarial"])
    assert out["loss"].requires_grad and not out["discriminator"].requires_grad


def test_max_timestep_restricts_training_to_detection_timesteps():
    # AnoDDPM detects from t = noise level; with max_timestep the step never trains above it (and says so early)
    discriminator = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=1, num_layers_d=2)
    step = AdversarialDiffusionStep(make_diffusion("linear", 1000), discriminator, max_timestep=250)
    torch.manual_seed(0)
    t = step.losses(tiny_unet(), {"image": torch.rand(64, 1, 8, 8)})["t"]
    assert int(t.max()) < 250 and int(t.min()) >= 0 and len(set(t.tolist())) > 30
    with pytest.raises(ValueError, match="max_timestep"):
        AdversarialDiffusionStep(make_diffusion("linear", 1000), discriminator, max_timestep=1001)


def test_discriminator_weights_change_and_it_learns_to_separate():
    torch.manual_seed(0)
    step = tiny_step(lr=1e-2)
    before = copy.deepcopy(step.discriminator.state_dict())
    real, fake = torch.full((4, 1, 16, 16), 0.8), torch.full((4, 1, 16, 16), -0.8)
    first = step.update_discriminator(real, fake)
    changed = [k for k, v in step.discriminator.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)
    for _ in range(15):
        last = step.update_discriminator(real, fake)
    assert last < 0.5 * first  # the BCE game of eq. 5: D separates constant real and fake inputs


def test_generator_gets_adversarial_gradient_and_discriminator_none():
    torch.manual_seed(0)
    step, network = tiny_step(), tiny_unet()
    terms = step.losses(network, {"image": torch.rand(3, 1, 16, 16)})
    fake = step.fake_sample(terms["model_output"], terms["x_t"], terms["t"])
    step.generator_loss(fake).backward()
    grads = [p.grad for p in network.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in step.discriminator.parameters())  # D frozen in the generator's pass
    assert all(p.requires_grad for p in step.discriminator.parameters())  # ... and unfrozen afterwards


def test_real_sample_is_q_of_x_t_minus_1_and_x0_at_t0():
    torch.manual_seed(0)
    step = tiny_step()
    diffusion = step.diffusion
    x0 = torch.full((2, 1, 64, 64), 0.5)
    t = torch.tensor([0, 301])
    real = step.real_sample(x0, t)
    assert torch.equal(real[0], x0[0])
    abar = diffusion.alphas_cumprod[300]  # q(x_{t-1} | x_0) at t - 1 = 300 (DDPM eq. 4)
    assert float(real[1].mean()) == pytest.approx(abar**0.5 * 0.5, abs=0.03)
    assert float(real[1].std()) == pytest.approx((1 - abar) ** 0.5, rel=0.05)


def test_simplex_training_noise_reaches_the_real_sample():
    torch.manual_seed(0)
    step = tiny_step(noise="simplex")
    x0 = torch.zeros(2, 1, 48, 48)
    t = torch.tensor([501, 501])
    abar = step.diffusion.alphas_cumprod[500]
    noise = step.real_sample(x0, t) / (1 - abar) ** 0.5
    torch.testing.assert_close(noise.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-3, rtol=0)
    assert lag1_correlation(noise) > 0.3 and abs(lag1_correlation(torch.randn(2, 1, 48, 48))) < 0.1  # not white


def test_fake_sample_at_t0_is_the_reverse_mean():
    step, network = tiny_step(), tiny_unet()
    x_t = torch.rand(2, 1, 16, 16) * 2 - 1
    t = torch.zeros(2, dtype=torch.long)
    output = network(x_t, t)
    expected = step.diffusion.p_mean_variance(output, x_t, t)["mean"]
    torch.testing.assert_close(step.fake_sample(output, x_t, t), expected)


def test_resume_restores_discriminator_and_its_optimizer(tmp_path: Path):
    batches = [{"image": torch.rand(2, 1, 16, 16)} for _ in range(2)]

    def build(seed: int) -> tuple[Trainer, AdversarialDiffusionStep]:
        torch.manual_seed(seed)
        network, step = tiny_unet(), tiny_step()
        step.discriminator_lr_scheduler = torch.optim.lr_scheduler.StepLR(step.discriminator_optimizer, 1, gamma=0.5)
        trainer = Trainer(network, torch.optim.Adam(network.parameters(), 1e-3), batches, step, max_steps=2,
                          checkpoint_path=tmp_path / "checkpoint.pt", progress=False)
        return trainer, step

    trainer, step = build(0)
    trainer.run()
    resumed_trainer, resumed = build(1)  # other initial weights: everything must come from the checkpoint
    resumed_trainer.run()  # resumes at step 2 = max_steps: loads, trains nothing
    assert resumed_trainer.step == 2
    for key, value in step.discriminator.state_dict().items():
        torch.testing.assert_close(resumed.discriminator.state_dict()[key], value)
    saved, loaded = step.discriminator_optimizer.state_dict(), resumed.discriminator_optimizer.state_dict()
    assert saved["state"] and saved["state"].keys() == loaded["state"].keys()
    for index, state in saved["state"].items():
        torch.testing.assert_close(loaded["state"][index]["exp_avg"], state["exp_avg"])
        assert float(loaded["state"][index]["step"]) == 2.0
    assert resumed.discriminator_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)  # 2 StepLR halvings

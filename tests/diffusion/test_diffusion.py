"""Closed-form tests of medad.diffusion (schedules, forward process, posterior, reverse steps, losses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medad.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    make_diffusion,
    normal_kl,
)
from medad.networks import AnomalyUNet

F64 = torch.float64


def _x0(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=F64) * 1.8 - 0.9)


# ---------------------------------------------------------------- schedules
def test_cosine_alpha_bar_matches_formula_and_monai():
    T, s = 1000, 0.008
    d = make_diffusion("cosine", T)
    f = lambda tau: math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 1, 10, 250, 500, 900, 990):  # array index i is the paper's t = i + 1
        assert d.alphas_cumprod[i] == pytest.approx(f((i + 1) / T) / f(0.0), rel=1e-12)
    assert d.betas.max() <= 0.999 and d.betas[-1] == pytest.approx(0.999)
    from monai.networks.schedulers.scheduler import _cosine_beta

    monai_betas = _cosine_beta(T)[0].double().numpy()
    np.testing.assert_allclose(d.betas, monai_betas, atol=1e-4)


def test_cosine_is_squared_not_plain_cos():
    # Seed 000 prints cos without the square; with the square ᾱ at the middle step is ~0.5, without it ~0.7.
    d = make_diffusion("cosine", 1000)
    assert d.alphas_cumprod[499] == pytest.approx(0.4938, abs=2e-3)


def test_linear_betas_endpoints():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and len(b) == 1000
    b = get_named_beta_schedule("linear", 250)  # improved-diffusion rescaling 1000/T
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)
    b = get_named_beta_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)  # DISYRE
    assert b[0] == pytest.approx(1e-3) and b[-1] == pytest.approx(0.2) and b.dtype == np.float64
    np.testing.assert_allclose(np.diff(b), (0.2 - 1e-3) / 99)
    with pytest.raises(ValueError):
        get_named_beta_schedule("sigmoid", 100)
    with pytest.raises(ValueError):
        get_named_beta_schedule("cosine", 100, beta_start=0.1)


# ---------------------------------------------------------------- forward process and posterior
def test_q_sample_monte_carlo_mean_and_variance():
    d = make_diffusion("linear", 1000)
    n = 20000
    x0 = torch.tensor([-0.8, 0.1, 0.6], dtype=F64).reshape(1, 1, 3).expand(n, 1, 3)
    t = torch.full((n,), 300, dtype=torch.long)
    xt = d.q_sample(x0, t, generator=torch.Generator().manual_seed(1))
    abar = d.alphas_cumprod[300]
    np.testing.assert_allclose(xt.mean(0).flatten().numpy(), math.sqrt(abar) * x0[0].flatten().numpy(), atol=0.03)
    np.testing.assert_allclose(xt.var(0).flatten().numpy(), 1 - abar, rtol=0.05)
    mean, var, log_var = d.q_mean_variance(x0[:2], t[:2])
    assert torch.allclose(mean, math.sqrt(abar) * x0[:2]) and var.flatten()[0].item() == pytest.approx(1 - abar)
    assert log_var.flatten()[0].item() == pytest.approx(math.log(1 - abar))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_strided_posterior_with_t_minus_1_equals_standard(schedule):
    d = make_diffusion(schedule, 1000)
    x0, xt = _x0((5, 2, 4, 4), 0), _x0((5, 2, 4, 4), 1)
    t = torch.tensor([0, 1, 17, 500, 999])
    standard = d.q_posterior_mean_variance(x0, xt, t)
    strided = d.q_posterior_mean_variance(x0, xt, t, t_prev=t - 1)
    for a, b in zip(standard, strided):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # DDPM eq. 7 written out at t = 17.
    beta, abar, abar_prev = d.betas[17], d.alphas_cumprod[17], d.alphas_cumprod[16]
    assert standard[1][2].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-12)
    # t = 0: mean = x0, variance 0, log variance clipped with β̃ at t = 1 (improved-diffusion).
    torch.testing.assert_close(standard[0][0], x0[0])
    assert standard[1][0].item() == 0.0
    assert standard[2][0].item() == pytest.approx(math.log(d.posterior_variance[1]))


def test_jump_posterior_is_bayes_product_of_gaussians():
    d = make_diffusion("linear", 1000)
    x0, xt = _x0((3, 1, 5), 2), _x0((3, 1, 5), 3)
    t, s = torch.tensor([400, 250, 63]), torch.tensor([200, 0, 17])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t, t_prev=s)
    for b in range(3):
        abar_t, abar_s = d.alphas_cumprod[t[b]], d.alphas_cumprod[s[b]]
        # q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, 1 − ᾱ_t/ᾱ_s), q(x_s | x_0) = N(√ᾱ_s x_0, 1 − ᾱ_s); Bayes in x_s.
        a, v_lik, v_prior = math.sqrt(abar_t / abar_s), 1 - abar_t / abar_s, 1 - abar_s
        precision = 1 / v_prior + a * a / v_lik
        expected_mean = (math.sqrt(abar_s) * x0[b] / v_prior + a * xt[b] / v_lik) / precision
        torch.testing.assert_close(mean[b], expected_mean, rtol=1e-10, atol=1e-12)
        assert var[b].item() == pytest.approx(1 / precision, rel=1e-10)
        assert log_var[b].item() == pytest.approx(-math.log(precision), rel=1e-10)
    # Jump straight to the data: mean is x0 exactly.
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t, t_prev=torch.full((3,), -1))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()
    with pytest.raises(ValueError):
        d.q_posterior_mean_variance(x0, xt, t, t_prev=t)


# ---------------------------------------------------------------- KL and likelihood
def test_normal_kl_closed_form():
    m1, m2 = torch.tensor([0.3, -1.0], dtype=F64), torch.tensor([-0.2, 0.5], dtype=F64)
    s1, s2 = torch.tensor([0.5, 2.0], dtype=F64), torch.tensor([1.5, 0.7], dtype=F64)
    manual = torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(m1, 2 * torch.log(s1), m2, 2 * torch.log(s2))
    torch.testing.assert_close(got, manual)
    torch.testing.assert_close(normal_kl(m1, 0.0, m1, 0.0), torch.zeros(2, dtype=F64))


def test_discretized_likelihood_sums_to_one_over_bins():
    centres = -1 + 2 * torch.arange(256, dtype=F64) / 255
    for mean, scale in ((0.1, 0.3), (-0.95, 0.05), (float(centres[100]), 1e-3)):
        log_p = discretized_gaussian_log_likelihood(
            centres, torch.full_like(centres, mean), torch.full_like(centres, math.log(scale))
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # A narrow Gaussian on a bin centre puts almost all mass in that bin.
    assert log_p[100].exp().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("shape", [(4, 2, 6, 6), (2, 1, 3, 4, 5)])
def test_kl_is_zero_when_p_equals_q(shape):
    d = make_diffusion("linear", 1000, var_type="fixed_small")
    x0 = _x0(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    b = shape[0]
    t = torch.tensor([1, 30, 500, 999][:b])
    xt = d.q_sample(x0, t, noise)
    out = d.vb_terms_bpd(noise, x0, xt, t, clip_denoised=False)  # exact ε -> p == q
    assert out["kl_map"].shape == shape and out["output"].shape == (b,)
    assert out["kl_map"].abs().max().item() < 1e-8
    torch.testing.assert_close(out["pred_x0"], x0)
    # Strided (respaced) chain: still zero.
    out = d.vb_terms_bpd(noise, x0, xt, t, clip_denoised=False, t_prev=t // 2)
    assert out["kl_map"].abs().max().item() < 1e-8
    # The final step is the decoder NLL instead: positive, finite.
    t0 = torch.zeros(b, dtype=torch.long)
    nll = d.vb_terms_bpd(noise, x0, d.q_sample(x0, t0, noise), t0)["output"]
    assert torch.isfinite(nll).all() and (nll > 0).all()
    # kl_map wrapper: one network evaluation, same map.
    calls = []
    kl = d.kl_map(lambda x, tt: calls.append(1) or noise, x0, t, noise=noise, clip_denoised=False)
    assert len(calls) == 1 and kl.abs().max().item() < 1e-8
    wrong = d.kl_map(lambda x, tt: torch.zeros_like(x), x0, t, noise=noise)
    assert (wrong.mean() > 1e-3).item()


# ---------------------------------------------------------------- reverse variances
def test_learned_range_endpoints():
    d = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    x = _x0((3, 2, 4))
    t = torch.tensor([0, 10, 700])
    eps = torch.zeros_like(x)
    low = d.p_mean_variance(torch.cat([eps, -torch.ones_like(x)], 1), x, t)
    high = d.p_mean_variance(torch.cat([eps, torch.ones_like(x)], 1), x, t)
    for b in range(3):
        assert low["log_variance"][b].flatten()[0].item() == pytest.approx(d.posterior_log_variance_clipped[t[b]])
        assert high["variance"][b].flatten()[0].item() == pytest.approx(d.betas[t[b]])
    mid = d.p_mean_variance(torch.cat([eps, torch.zeros_like(x)], 1), x, t)["log_variance"]
    torch.testing.assert_close(mid, 0.5 * (low["log_variance"] + high["log_variance"]))
    # Strided jump 700 -> 300: endpoints are the jump's posterior variance and β' = 1 − ᾱ_700/ᾱ_300.
    tj, sj = torch.tensor([700] * 3), torch.tensor([300] * 3)
    hi = d.p_mean_variance(torch.cat([eps, torch.ones_like(x)], 1), x, tj, sj)["variance"]
    lo = d.p_mean_variance(torch.cat([eps, -torch.ones_like(x)], 1), x, tj, sj)["variance"]
    beta_jump = 1 - d.alphas_cumprod[700] / d.alphas_cumprod[300]
    assert hi[0, 0, 0].item() == pytest.approx(beta_jump)
    assert lo[0, 0, 0].item() == pytest.approx(beta_jump * (1 - d.alphas_cumprod[300]) / (1 - d.alphas_cumprod[700]))
    with pytest.raises(ValueError):
        d.p_mean_variance(eps, x, t)  # C channels where 2C are needed


def test_fixed_variances_for_jumps():
    large = make_diffusion("cosine", 1000, var_type="fixed_large")
    small = make_diffusion("cosine", 1000, var_type="fixed_small")
    x = _x0((2, 1, 3, 3))
    t, s = torch.tensor([500, 40]), torch.tensor([250, -1])
    eps = torch.zeros_like(x)
    v_large = large.p_mean_variance(eps, x, t, s)["variance"]
    v_small = small.p_mean_variance(eps, x, t, s)["variance"]
    abar = large.alphas_cumprod
    assert v_large[0].max().item() == pytest.approx(1 - abar[500] / abar[250])
    assert v_large[1].max().item() == pytest.approx(large.posterior_variance[1])  # final step, improved-diffusion
    assert v_small[0].max().item() == pytest.approx((1 - abar[500] / abar[250]) * (1 - abar[250]) / (1 - abar[500]))
    assert v_small[1].max().item() == 0.0
    # Unstrided FIXED_LARGE is β_t, except β̃_1 at t = 0.
    v = large.p_mean_variance(eps, x, torch.tensor([0, 7]))["variance"]
    assert v[0].max().item() == pytest.approx(large.posterior_variance[1])
    assert v[1].max().item() == pytest.approx(large.betas[7])


def test_p_sample_adds_no_noise_on_final_step():
    d = make_diffusion("linear", 1000)
    x = _x0((2, 1, 4, 4))
    t, s = torch.tensor([5, 300]), torch.tensor([-1, 100])
    out = d.p_sample(torch.zeros_like(x), x, t, s, noise=torch.ones_like(x), clip_denoised=False)
    torch.testing.assert_close(out["sample"][0], out["pred_x0"][0])
    assert not torch.allclose(out["sample"][1], d.p_mean_variance(torch.zeros_like(x), x, t, s, False)["mean"][1])


# ---------------------------------------------------------------- restoration
def test_timesteps_for_restoration():
    d = make_diffusion("linear", 1000)
    assert d.timesteps_for_restoration(250, 5) == [250, 188, 125, 63, 0]
    assert d.timesteps_for_restoration(4, 5) == [4, 3, 2, 1, 0]
    assert d.timesteps_for_restoration(999, 1000) == list(range(999, -1, -1))
    assert d.timesteps_for_restoration(37, 1) == [37]
    for t_start in (1, 9, 100, 999):
        for n in range(1, min(t_start + 1, 40) + 1):
            steps = d.timesteps_for_restoration(t_start, n)
            assert len(steps) == n and steps[0] == t_start and all(a > b for a, b in zip(steps, steps[1:]))
            assert n == 1 or steps[-1] == 0
    with pytest.raises(ValueError):
        d.timesteps_for_restoration(4, 6)
    with pytest.raises(ValueError):
        d.timesteps_for_restoration(1000, 1)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small", "learned_range"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 4, 4, 4)])
def test_strided_restore_with_oracle_recovers_x0(var_type, shape):
    d = make_diffusion("cosine", 1000, var_type=var_type)
    x0 = _x0(shape, 5)
    calls = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        eps = d.predict_noise_from_start(x_t, t, x0)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if var_type == "learned_range" else eps

    g = torch.Generator().manual_seed(0)
    out = d.restore(oracle, x0, t_start=250, num_steps=5, noise_start=True, generator=g, return_trajectory=True)
    torch.testing.assert_close(out["restoration"], x0, rtol=0, atol=1e-9)
    assert out["network_evaluations"] == 5 == len(calls) == len(out["x_ts"]) == len(out["pred_x0s"])
    assert [int(c[0]) for c in calls] == [250, 188, 125, 63, 0] == out["timesteps"]
    assert not torch.allclose(out["x_ts"][0], x0)  # started from noise
    # "no diffusion": the input itself is x_{t_start}; every step from 7.
    calls.clear()
    out = d.restore(oracle, x0, t_start=7, num_steps=8, noise_start=False, generator=g)
    assert out["network_evaluations"] == 8 == len(calls) and out["x_ts"] == []
    torch.testing.assert_close(out["restoration"], x0, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- training losses
def test_sample_timesteps_max_timestep_range():
    d = make_diffusion("linear", 100)
    t = d.sample_timesteps(4000, generator=torch.Generator().manual_seed(0), max_timestep=25)
    assert int(t.min()) == 0 and int(t.max()) == 24  # uniform on [0, 25): every value drawn in 4000
    assert torch.equal(torch.bincount(t, minlength=25) > 0, torch.ones(25, dtype=torch.bool))
    assert int(d.sample_timesteps(4000, generator=torch.Generator().manual_seed(0)).max()) == 99
    for bad in (0, 101):
        with pytest.raises(ValueError, match="max_timestep"):
            d.sample_timesteps(1, max_timestep=bad)


@pytest.mark.parametrize("mean_type,loss_type", [("epsilon", "mse"), ("epsilon", "l1"), ("start_x", "mse")])
def test_training_losses_shapes_and_oracle(mean_type, loss_type):
    d = make_diffusion("linear", 100, mean_type, "fixed_large", loss_type, beta_start=1e-3, beta_end=0.2)
    x0 = _x0((3, 2, 5, 5, 5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = d.sample_timesteps(3, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3,) and t.dtype == torch.long and ((t >= 0) & (t < 100)).all()
    perfect = noise if mean_type == "epsilon" else x0
    terms = d.training_losses(lambda x, tt: perfect, x0, t, noise=noise)
    assert terms["loss"].shape == (3,) and terms["mse"].shape == (3,)
    assert terms["loss"].abs().max().item() < 1e-12
    terms = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise=noise)
    if loss_type == "l1":
        torch.testing.assert_close(terms["loss"], (perfect.abs()).mean(dim=(1, 2, 3, 4)))
    else:
        torch.testing.assert_close(terms["loss"], (perfect**2).mean(dim=(1, 2, 3, 4)))


def test_hybrid_loss_vb_trains_only_the_variance():
    d = make_diffusion("linear", 1000, var_type="learned_range", loss_type="hybrid")
    x0 = _x0((2, 1, 6, 6)).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 600])
    output = torch.cat([noise + 0.1, torch.full_like(x0, 0.3)], 1).requires_grad_(True)
    terms = d.training_losses(lambda x, tt: output, x0, t, noise=noise)
    assert set(terms) >= {"loss", "mse", "vb", "pred"} and terms["vb"].shape == (2,)
    # vb is λ·T·L_t (= improved-diffusion's T/1000 factor for λ = 0.001).
    frozen = output.detach()
    expected_vb = d.vb_terms_bpd(frozen, x0, terms["x_t"], t, clip_denoised=False)["output"] * (0.001 * 1000)
    torch.testing.assert_close(terms["vb"], expected_vb)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :1].abs().max().item() == 0.0  # stop-gradient on the mean
    assert grad[:, 1:].abs().max().item() > 0.0


def test_make_diffusion_and_configuration_errors():
    d = make_diffusion("cosine", 50, "START_X", "fixed_small", "L1")
    assert d.model_mean_type is ModelMeanType.START_X and d.model_var_type is ModelVarType.FIXED_SMALL
    assert d.loss_type is LossType.L1 and d.num_timesteps == 50 and d.output_channels(3) == 3
    assert make_diffusion(var_type="learned_range", loss_type="hybrid").output_channels(3) == 6
    with pytest.raises(ValueError):
        make_diffusion(mean_type="velocity")
    with pytest.raises(ValueError):
        make_diffusion(loss_type="hybrid")  # fixed variance
    with pytest.raises(ValueError):
        learned = make_diffusion(var_type="learned_range")  # fine for sampling, not for training with MSE
        learned.training_losses(lambda x, t: torch.cat([x, x], 1), _x0((1, 1, 2, 2)), torch.tensor([1]))
    with pytest.raises(ValueError):
        GaussianDiffusion(np.array([0.1]))
    with pytest.raises(ValueError):
        d.q_sample(_x0((2, 1, 3, 3)), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        d.q_sample(_x0((2, 1, 3, 3)), torch.tensor([1, 50]))


def _tiny_unet() -> AnomalyUNet:
    return AnomalyUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), num_res_blocks=1,
                       attention_levels=(False, False), num_head_channels=8, with_timestep=True)


# AnoDDPM restoration with simplex noise at every step (ADDM): the noise_fn hook of restore
def test_restore_draws_every_step_noise_from_noise_fn():
    diffusion = make_diffusion("linear", 1000)
    network = _tiny_unet().eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    calls = []

    def zeros(x_t: torch.Tensor) -> torch.Tensor:
        calls.append(x_t.shape)
        return torch.zeros_like(x_t)

    outs = [
        diffusion.restore(network, x, 20, 3, noise_start=False, generator=torch.Generator().manual_seed(s), noise_fn=zeros)
        for s in (0, 1)
    ]
    assert len(calls) == 4  # one draw per reverse step but the last (the step to x_0 adds no noise)
    torch.testing.assert_close(outs[0]["restoration"], outs[1]["restoration"])  # the generator is not used
    gaussian = [diffusion.restore(network, x, 20, 3, noise_start=False, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(gaussian[0]["restoration"], gaussian[1]["restoration"])


def test_check_trained_range_refuses_detection_above_the_training_timesteps():
    d = make_diffusion("linear", 1000)
    d.check_trained_range(249, 250)  # AnoDDPM at noise level 250 trained on t < 250: every timestep it uses
    d.check_trained_range(999, None)  # trained on all T
    with pytest.raises(ValueError, match=r"t = 250, .* t < 250"):
        d.check_trained_range(250, 250)

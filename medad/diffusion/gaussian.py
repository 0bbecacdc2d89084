"""Gaussian diffusion: forward process, posterior, reverse steps, losses and KL maps (one copy for all methods).

Follows improved-diffusion's ``gaussian_diffusion.py`` (Nichol & Dhariwal 2021): every schedule quantity is
computed once in float64 numpy at construction and gathered per timestep by :func:`_extract`.

Why not MONAI's ``DDPMScheduler``/``DiffusionInferer``: ``DDPMScheduler.step`` assumes the previous timestep is
``t - 1`` (partial diffusion restorations here take strided jumps ``t -> s`` from an arbitrary start), and
``DiffusionInferer.get_likelihood`` breaks with a learned variance (the KL score of seed 001 needs it). So the
math lives here, unit-tested against closed forms; the cosine schedule agrees with MONAI's (tested).

Conventions: tensors are ``(B, C, *spatial)`` with any number of spatial dims (2D or 3D). Timesteps are
LongTensors of shape ``(B,)`` holding 0-based indices: ``t = 0`` is the paper's x_1 and the reverse step from
``t = 0`` produces the data x_0; ``t_prev = -1`` therefore means "step to the data".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from medad.diffusion.enums import LossType, ModelMeanType, ModelVarType, as_enum
from medad.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from medad.diffusion.schedules import get_named_beta_schedule

__all__ = ["GaussianDiffusion", "make_diffusion", "mean_flat"]

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _extract(
    arr: np.ndarray, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gather ``arr[t]`` into a tensor of shape ``(B, 1, ..., 1)`` (``len(shape)`` dims) on ``t``'s device.

    Args:
        arr: per-timestep float64 numpy array of shape ``(T,)``.
        t: LongTensor of shape ``(B,)``.
        shape: shape of the tensor the result must broadcast against, ``(B, C, *spatial)``.
        dtype: dtype of the result (cast on the CPU first, so float64 schedules also work on devices without
            float64 support).
    """
    values = torch.as_tensor(arr, dtype=dtype).to(t.device)[t]
    return values.reshape((t.shape[0],) + (1,) * (len(shape) - 1))


def _batch_values(values: np.ndarray, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Turn a float64 numpy array of shape ``(B,)`` into a ``(B, 1, ..., 1)`` tensor."""
    return torch.as_tensor(values, dtype=dtype).to(device).reshape((len(values),) + (1,) * (len(shape) - 1))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; drawn on the generator's device so any generator works."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


class GaussianDiffusion:
    """Discrete Gaussian diffusion (DDPM) with strided reverse steps and improved-DDPM learned variances.

    Args:
        betas: β schedule, 1-D array of length T >= 2 with values in (0, 1], see
            :func:`~medad.diffusion.get_named_beta_schedule`.
        model_mean_type: what the network's first C output channels predict (:class:`ModelMeanType` or
            its string value). Default ``"epsilon"``.
        model_var_type: reverse variance (:class:`ModelVarType` or string). ``"learned_range"`` means the
            network outputs 2·C channels. Default ``"fixed_large"``.
        loss_type: training loss (:class:`LossType` or string). Default ``"mse"``.
        vlb_weight: λ of the hybrid loss L_simple + λ·L_vlb. Default 0.001 (improved-DDPM).
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType | str = ModelMeanType.EPSILON,
        model_var_type: ModelVarType | str = ModelVarType.FIXED_LARGE,
        loss_type: LossType | str = LossType.MSE,
        vlb_weight: float = 0.001,
    ) -> None:
        self.model_mean_type = as_enum(model_mean_type, ModelMeanType)
        self.model_var_type = as_enum(model_var_type, ModelVarType)
        self.loss_type = as_enum(loss_type, LossType)
        self.vlb_weight = float(vlb_weight)
        if self.loss_type == LossType.HYBRID and self.model_var_type != ModelVarType.LEARNED_RANGE:
            raise ValueError(
                "The hybrid loss needs model_var_type='learned_range': with a fixed variance and the stop-gradient "
                "on the mean its L_vlb term has no gradient."
            )

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1].")
        self.betas = betas
        self.num_timesteps = int(len(betas))

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃ is 0 at t = 0: improved-diffusion clips its log by reusing β̃ at t = 1.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # FIXED_LARGE uses β_t, except β̃_1 at the last step so the decoder variance is not β_0 ≈ 0
        # (improved-diffusion's choice).
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.log_betas = np.log(betas)

    # ------------------------------------------------------------------ helpers
    def output_channels(self, image_channels: int) -> int:
        """Number of network output channels for images with ``image_channels`` channels (2·C if learned)."""
        return 2 * image_channels if self.model_var_type == ModelVarType.LEARNED_RANGE else image_channels

    def sample_timesteps(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        max_timestep: int | None = None,
    ) -> torch.Tensor:
        """Uniform timesteps in [0, T) (or [0, ``max_timestep``)), LongTensor of shape ``(batch,)`` on ``device``."""
        high = self.num_timesteps if max_timestep is None else int(max_timestep)
        if not 1 <= high <= self.num_timesteps:
            raise ValueError(f"max_timestep must lie in [1, {self.num_timesteps}], got {max_timestep}.")
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, high, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def check_trained_range(self, detection_timestep: int, max_training_timestep: int | None) -> None:
        """Raise if detection would run the network at a timestep its training never drew.

        Args:
            detection_timestep: the highest timestep (0-based) detection evaluates the network at.
            max_training_timestep: training drew t uniformly in [0, ``max_training_timestep``)
                (:meth:`sample_timesteps`); None: all T timesteps, nothing to check.
        """
        if max_training_timestep is None:
            return
        if int(detection_timestep) >= int(max_training_timestep):
            raise ValueError(
                f"detection starts from t = {int(detection_timestep)}, but the network was trained on t < "
                f"{int(max_training_timestep)} only (max_training_timestep); set max_training_timestep above "
                f"{int(detection_timestep)} or detect from a lower noise level."
            )

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must be a LongTensor of shape (B,) = ({x.shape[0]},).")
        if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError("timesteps must be integer indices (a LongTensor), not floats.")
        if bool((t < 0).any()) or bool((t >= self.num_timesteps).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}.")

    def _step_coefficients(
        self, t: torch.Tensor, t_prev: torch.Tensor | None, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Posterior and reverse-variance coefficients of the step ``t -> t_prev`` as ``(B, 1, ..., 1)`` tensors.

        For ``t_prev = t - 1`` (``None``) the precomputed arrays are used. For a jump ``t -> s`` the step's own
        ᾱ ratio defines it (the respacing of improved-diffusion, computed per call): α' = ᾱ_t/ᾱ_s, β' = 1 − α',
        mean coefficients √ᾱ_s β'/(1−ᾱ_t) and √α' (1−ᾱ_s)/(1−ᾱ_t), variance β'(1−ᾱ_s)/(1−ᾱ_t), with ᾱ_{-1} = 1.
        """
        self._check_t(t, x)
        shape, dtype = x.shape, x.dtype
        if t_prev is None:
            return {
                "coef1": _extract(self.posterior_mean_coef1, t, shape, dtype),
                "coef2": _extract(self.posterior_mean_coef2, t, shape, dtype),
                "posterior_variance": _extract(self.posterior_variance, t, shape, dtype),
                "posterior_log_variance": _extract(self.posterior_log_variance_clipped, t, shape, dtype),
                "large_variance": _extract(self.fixed_large_variance, t, shape, dtype),
                "log_beta": _extract(self.log_betas, t, shape, dtype),
                "is_final": (t == 0).reshape((-1,) + (1,) * (len(shape) - 1)),
            }
        if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape:
            raise ValueError(f"t_prev must be a LongTensor of the same shape as t, {tuple(t.shape)}.")
        t_np, s_np = t.detach().cpu().numpy(), t_prev.detach().cpu().numpy()
        if (s_np < -1).any() or (s_np >= t_np).any():
            raise ValueError(f"t_prev must satisfy -1 <= t_prev < t, got t={t_np.tolist()}, t_prev={s_np.tolist()}.")
        final = s_np == -1
        abar_t = self.alphas_cumprod[t_np]
        abar_s = np.where(final, 1.0, self.alphas_cumprod[np.maximum(s_np, 0)])
        alpha = abar_t / abar_s
        beta = 1.0 - alpha
        posterior_variance = beta * (1.0 - abar_s) / (1.0 - abar_t)
        # Same clipping as the unstrided chain: the final step borrows β̃ of the base schedule at t = 1.
        floor_variance = self.posterior_variance[1]
        posterior_log_variance = np.log(np.where(final, floor_variance, np.maximum(posterior_variance, 1e-300)))
        values = {
            "coef1": np.sqrt(abar_s) * beta / (1.0 - abar_t),
            "coef2": np.sqrt(alpha) * (1.0 - abar_s) / (1.0 - abar_t),
            "posterior_variance": posterior_variance,
            "posterior_log_variance": posterior_log_variance,
            "large_variance": np.where(final, floor_variance, beta),
            "log_beta": np.log(beta),
        }
        out = {k: _batch_values(v, shape, dtype, x.device) for k, v in values.items()}
        out["is_final"] = (t_prev == -1).to(x.device).reshape((-1,) + (1,) * (len(shape) - 1))
        return out

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (DDPM eq. 4).

        Args:
            x0: clean images ``(B, C, *spatial)``.
            t: LongTensor ``(B,)``.

        Returns:
            ``(mean, variance, log_variance)``; mean has the shape of ``x0``, the others ``(B, 1, ..., 1)``.
        """
        self._check_t(t, x0)
        mean = _extract(self.sqrt_alphas_cumprod, t, x0.shape, x0.dtype) * x0
        variance = _extract(1.0 - self.alphas_cumprod, t, x0.shape, x0.dtype)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x0.shape, x0.dtype)
        return mean, variance, log_variance

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4).

        Shapes: ``x0`` and ``noise`` ``(B, C, *spatial)``, ``t`` ``(B,)``; returns the shape of ``x0``.
        """
        self._check_t(t, x0)
        if noise is None:
            noise = _randn_like(x0, generator)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}.")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.shape, x0.dtype) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape, x0.dtype) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_{t_prev} | x_t, x_0) (DDPM eqs. 6-7, generalised to any earlier ``t_prev``).

        Args:
            x0: clean images ``(B, C, *spatial)``.
            x_t: noisy images, same shape.
            t: LongTensor ``(B,)``.
            t_prev: LongTensor ``(B,)`` with ``-1 <= t_prev < t``; default ``t - 1``. ``-1`` steps to the data:
                mean = x_0 exactly and variance 0.

        Returns:
            ``(mean, variance, log_variance)``; variance and log variance ``(B, 1, ..., 1)``; the log variance
            is clipped at the final step (β̃ at t = 1, as improved-diffusion).
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} differs from x_t shape {tuple(x_t.shape)}.")
        c = self._step_coefficients(t, t_prev, x_t)
        mean = c["coef1"] * x0 + c["coef2"] * x_t
        return mean, c["posterior_variance"], c["posterior_log_variance"]

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t (inverse of DDPM eq. 4); shapes ``(B, C, *spatial)``."""
        self._check_t(t, x_t)
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype) * eps
        )

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), written as improved-diffusion does; shapes ``(B, C, *spatial)``."""
        self._check_t(t, x_t)
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype
        )

    # ------------------------------------------------------------------ reverse process
    def _split_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the network output into the mean parameterisation and (if learned) the variance values v."""
        channels = x_t.shape[1]
        expected = self.output_channels(channels)
        if model_output.shape[:1] + model_output.shape[2:] != x_t.shape[:1] + x_t.shape[2:] or (
            model_output.shape[1] != expected
        ):
            raise ValueError(
                f"The network output has shape {tuple(model_output.shape)} but {self.model_var_type.value} variance "
                f"needs {expected} channels and the spatial shape of x_t {tuple(x_t.shape)}."
            )
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor | None = None,
        clip_denoised: bool = True,
        clip_range: tuple[float, float] = (-1.0, 1.0),
    ) -> dict[str, torch.Tensor]:
        """Reverse step p_θ(x_{t_prev} | x_t) from a network output (improved-DDPM eqs. 11-15).

        The caller evaluates the network, so it controls and counts network evaluations.

        Args:
            model_output: network output ``(B, C or 2C, *spatial)`` for ``(x_t, t)``.
            x_t: noisy images ``(B, C, *spatial)``.
            t: LongTensor ``(B,)``.
            t_prev: LongTensor ``(B,)``, default ``t - 1``; any earlier timestep (or -1) for a strided jump.
                Variances of a jump: FIXED_SMALL the jump's posterior variance, FIXED_LARGE its β' (β̃_1 at the
                final step), LEARNED_RANGE log-interpolates between log β' and the jump's clipped log posterior
                variance.
            clip_denoised: clamp x̂_0 to ``clip_range`` before forming the mean.
            clip_range: ``(low, high)`` of the data.

        Returns:
            dict with ``mean`` ``(B, C, *spatial)``, ``variance`` and ``log_variance`` (same shape), ``pred_x0``
            (clipped if asked) and ``pred_eps``.
        """
        prediction, var_values = self._split_output(model_output, x_t)
        c = self._step_coefficients(t, t_prev, x_t)
        if self.model_var_type == ModelVarType.FIXED_SMALL:
            variance, log_variance = c["posterior_variance"], c["posterior_log_variance"]
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = c["large_variance"]
            log_variance = torch.log(variance)
        else:
            # v ∈ [-1, 1] -> frac ∈ [0, 1]: interpolate LOG variances (improved-DDPM eq. 15).
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * c["log_beta"] + (1.0 - frac) * c["posterior_log_variance"]
            variance = torch.exp(log_variance)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_x0 = self.predict_start_from_noise(x_t, t, prediction)
        else:
            pred_x0 = prediction
        if clip_denoised:
            pred_x0 = pred_x0.clamp(clip_range[0], clip_range[1])
        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_eps = prediction
        else:
            pred_eps = self.predict_noise_from_start(x_t, t, pred_x0)
        mean = c["coef1"] * pred_x0 + c["coef2"] * x_t
        return {
            "mean": mean,
            "variance": variance.expand_as(x_t),
            "log_variance": log_variance.expand_as(x_t),
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def p_sample(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draw x_{t_prev} ~ p_θ(x_{t_prev} | x_t) (DDPM Algorithm 2, line 4); no noise on the step to x_0.

        Args: as :meth:`p_mean_variance`; ``noise`` ``(B, C, *spatial)`` defaults to fresh standard normal noise.

        Returns:
            dict with ``sample`` and ``pred_x0``, both ``(B, C, *spatial)``.
        """
        out = self.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised=clip_denoised)
        if noise is None:
            noise = _randn_like(x_t, generator)
        is_final = (t == 0) if t_prev is None else (t_prev == -1)
        nonzero = (~is_final).to(x_t.dtype).reshape((-1,) + (1,) * (x_t.dim() - 1))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    def timesteps_for_restoration(self, t_start: int, num_steps: int) -> list[int]:
        """Descending timesteps at which a restoration evaluates the network, from ``t_start`` down to 0.

        ``num_steps`` values evenly spaced on [0, t_start] (rounded half up, so they stay distinct), first
        ``t_start``, last 0; the step after 0 produces x_0. Examples: ``(250, 5) -> [250, 188, 125, 63, 0]``;
        ``(4, 5) -> [4, 3, 2, 1, 0]`` (every step); ``(t, 1) -> [t]`` (one jump straight to x_0).
        Seed 000's "k reverse steps from x_k" (1-based paper index) is ``t_start = k - 1, num_steps = k``.
        """
        t_start, num_steps = int(t_start), int(num_steps)
        if not 0 <= t_start < self.num_timesteps:
            raise ValueError(f"t_start must lie in [0, {self.num_timesteps - 1}], got {t_start}.")
        if not 1 <= num_steps <= t_start + 1:
            raise ValueError(f"num_steps must lie in [1, t_start + 1] = [1, {t_start + 1}], got {num_steps}.")
        if num_steps == 1:
            return [t_start]
        n = num_steps - 1
        # round(t_start * (n - i) / n) half up, in exact integer arithmetic.
        return [(2 * t_start * (n - i) + n) // (2 * n) for i in range(num_steps)]

    @torch.no_grad()
    def restore(
        self,
        network: Network,
        x_start: torch.Tensor,
        t_start: int,
        num_steps: int,
        noise_start: bool,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Restore images by partial diffusion: start at ``t_start`` and take strided reverse steps to x_0.

        Args:
            network: called as ``network(x_t, t)`` with ``t`` a LongTensor ``(B,)``; returns
                ``(B, C or 2C, *spatial)``.
            x_start: images in the data range, ``(B, C, *spatial)``.
            t_start: first timestep (0-based).
            num_steps: number of reverse steps = network evaluations, see :meth:`timesteps_for_restoration`.
            noise_start: True: x_{t_start} ~ q(x_{t_start} | x_start) (seed 000 "diffusion"); False: x_start
                itself is taken as x_{t_start} (seed 000 "no diffusion").
            clip_denoised: clamp x̂_0 to [-1, 1] at each step.
            generator: random generator for the start noise and the step noises.
            return_trajectory: keep ``x_ts`` and ``pred_x0s`` (one per network evaluation); otherwise empty lists.
            noise_fn: ``x_t -> noise`` of the shape of ``x_t`` for every reverse step; default standard normal
                (AnoDDPM draws simplex noise here when it detects with simplex noise).

        Returns:
            dict with ``restoration`` ``(B, C, *spatial)``, ``pred_x0s``, ``x_ts``, ``timesteps`` (list of ints)
            and ``network_evaluations`` (int). Runs under ``torch.no_grad()``.
        """
        timesteps = self.timesteps_for_restoration(t_start, num_steps)
        batch, device = x_start.shape[0], x_start.device
        x = x_start
        if noise_start:
            t_first = torch.full((batch,), timesteps[0], dtype=torch.long, device=device)
            x = self.q_sample(x_start, t_first, generator=generator)
        pred_x0s: list[torch.Tensor] = []
        x_ts: list[torch.Tensor] = []
        for i, step in enumerate(timesteps):
            previous = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t = torch.full((batch,), step, dtype=torch.long, device=device)
            t_prev = torch.full((batch,), previous, dtype=torch.long, device=device)
            # the step to x_0 adds no noise (p_sample), so none is drawn for it: a simplex draw costs about a third of
            # the quick ADDM network's forward pass, and nothing in this restoration draws after the last step
            noise = torch.zeros_like(x) if previous < 0 else (noise_fn(x) if noise_fn is not None else None)
            out = self.p_sample(network(x, t), x, t, t_prev, noise=noise, clip_denoised=clip_denoised, generator=generator)
            if return_trajectory:
                x_ts.append(x)
                pred_x0s.append(out["pred_x0"])
            x = out["sample"]
        return {
            "restoration": x,
            "pred_x0s": pred_x0s,
            "x_ts": x_ts,
            "timesteps": timesteps,
            "network_evaluations": len(timesteps),
        }

    # ------------------------------------------------------------------ losses and KL maps
    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        t_prev: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Variational-bound term L_{t} in bits (improved-DDPM eq. 4-5; seed 001's pixel score).

        Per pixel: KL(q(x_{t_prev} | x_t, x_0) ‖ p_θ(x_{t_prev} | x_t)) / log 2; on the final step (``t_prev = -1``,
        i.e. ``t = 0`` by default) the decoder NLL −log p_θ(x_0 | x_1) / log 2 with 256 bins instead.

        Args:
            model_output: network output ``(B, C or 2C, *spatial)`` for ``(x_t, t)``.
            x0: clean images in [-1, 1], ``(B, C, *spatial)``.
            x_t: noisy images, same shape.
            t: LongTensor ``(B,)``.
            clip_denoised: clamp x̂_0 to [-1, 1].
            t_prev: earlier timesteps ``(B,)`` for a strided (respaced) chain; default ``t - 1``.

        Returns:
            dict with ``output`` ``(B,)`` (mean over pixels), ``kl_map`` ``(B, C, *spatial)`` and ``pred_x0``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t, t_prev)
        out = self.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        ) / math.log(2.0)
        is_final = (t == 0) if t_prev is None else (t_prev == -1)
        kl_map = torch.where(is_final.reshape((-1,) + (1,) * (x0.dim() - 1)), decoder_nll, kl)
        return {"output": mean_flat(kl_map), "kl_map": kl_map, "pred_x0": out["pred_x0"]}

    def kl_map(
        self,
        network: Network,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        t_prev: torch.Tensor | None = None,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-pixel L_t in bits for one noise draw: x_t ~ q(x_t | x_0), one network evaluation.

        Returns:
            ``(B, C, *spatial)`` map, see :meth:`vb_terms_bpd`.
        """
        x_t = self.q_sample(x0, t, noise=noise, generator=generator)
        return self.vb_terms_bpd(network(x_t, t), x0, x_t, t, clip_denoised=clip_denoised, t_prev=t_prev)["kl_map"]

    def training_losses(
        self,
        network: Network,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training loss for timesteps ``t`` (DDPM eq. 14, seed 000 eq. 7, improved-DDPM eq. 16).

        MSE / L1 compare the first C output channels with ε (EPSILON) or x_0 (START_X). HYBRID adds
        λ·L_vlb: L_vlb = Σ_t L_t ≈ T·E_t[L_t], so one sampled t contributes λ·T·L_t; with λ = 0.001 this is
        improved-diffusion's ``vb *= num_timesteps / 1000``. The mean is detached inside L_vlb so it only
        trains the variance (improved-DDPM Sec. 3.1).

        Args:
            network: called as ``network(x_t, t)``.
            x0: clean images ``(B, C, *spatial)``.
            t: LongTensor ``(B,)``.
            noise: ε, default standard normal.

        Returns:
            dict with ``loss`` ``(B,)``, ``mse`` ``(B,)``, ``l1`` (L1 loss) and ``vb`` (HYBRID) ``(B,)``, and the
            tensors ``pred`` (mean parameterisation), ``target``, ``x_t``, ``model_output`` for further losses.
        """
        if self.model_var_type == ModelVarType.LEARNED_RANGE and self.loss_type != LossType.HYBRID:
            raise ValueError(
                "A learned variance is only trained by loss_type='hybrid'; with this loss its channels stay untrained."
            )
        if noise is None:
            noise = _randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise=noise)
        model_output = network(x_t, t)
        prediction, var_values = self._split_output(model_output, x_t)
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x0
        terms: dict[str, torch.Tensor] = {
            "mse": mean_flat((target - prediction) ** 2),
            "pred": prediction,
            "target": target,
            "x_t": x_t,
            "model_output": model_output,
        }
        if self.loss_type == LossType.L1:
            terms["l1"] = mean_flat((target - prediction).abs())
            terms["loss"] = terms["l1"]
        else:
            terms["loss"] = terms["mse"]
        if self.loss_type == LossType.HYBRID:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)["output"]
            terms["vb"] = vb * (self.vlb_weight * self.num_timesteps)
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms


def make_diffusion(
    schedule: str = "linear",
    num_timesteps: int = 1000,
    mean_type: ModelMeanType | str = "epsilon",
    var_type: ModelVarType | str = "fixed_large",
    loss_type: LossType | str = "mse",
    vlb_weight: float = 0.001,
    **schedule_kwargs: float,
) -> GaussianDiffusion:
    """Build a :class:`GaussianDiffusion` from strings (for bundle JSON configs).

    Example: ``make_diffusion("linear", 100, "start_x", beta_start=1e-3, beta_end=0.2)`` (DISYRE);
    ``make_diffusion("cosine", 1000, loss_type="l1")`` (seed 000);
    ``make_diffusion(var_type="learned_range", loss_type="hybrid")`` (seed 001).
    """
    betas = get_named_beta_schedule(schedule, num_timesteps, **schedule_kwargs)
    return GaussianDiffusion(betas, mean_type, var_type, loss_type, vlb_weight=vlb_weight)

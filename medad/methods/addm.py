"""ADDM (seed 004, Yu, Oh & Yang): a DDPM trained with an extra adversarial loss on its denoised samples.

The paper's objective (eq. 5) is ``L_ADDM = L_DDPM + λ·L_adv`` with λ = 0.05, where a discriminator D separates
"virtually generated noised samples" x_{t-1} ~ q(x_{t-1} | x_0) (real) from model-denoised samples
x_{t-1} ~ p_θ(x_{t-1} | x_t) (fake). There is no public code; the choices below are ours and documented:

- Eq. 5 writes λ in front of the first log-term only, but the text calls λ "a balancing weight" of "the additional
  adversarial loss": λ weights the whole generator-side adversarial term here.
- Eq. 5 is the log-likelihood (BCE) GAN game; the generator uses the usual non-saturating form −log D(fake)
  (Goodfellow et al. 2014, Sec. 3), as MONAI's :class:`~monai.losses.PatchAdversarialLoss` does for
  ``for_discriminator=False``. ``"least_squares"`` and ``"hinge"`` are options.
- The fake sample reuses the DDPM loss's own network evaluation (no second forward pass), so the adversarial
  gradient reaches the generator through μ_θ(x_t, t). Both samples draw their noise with the training noise
  (Gaussian or AnoDDPM's simplex): otherwise D could tell them apart by the noise texture alone.
- At t = 0 the real sample is x_0 itself (q(x_{-1} | x_0) is the data) and the fake is p_θ's mean (no noise).
- D is the unconditional MONAI :class:`~monai.networks.nets.PatchDiscriminator` (the paper does not condition D
  on t); it is updated once per generator step on detached samples, before the generator's loss is formed.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn

from medad.diffusion import GaussianDiffusion
from medad.engine.distributed import is_distributed
from medad.methods.ddpm import DiffusionStep

__all__ = ["AdversarialDiffusionStep"]


def _logits(output: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The final map of a discriminator; MONAI's PatchDiscriminator returns every layer's output as a list."""
    return output[-1] if isinstance(output, (list, tuple)) else output


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Build the graph without gradients for ``module``'s weights (the generator's pass through D)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AdversarialDiffusionStep(DiffusionStep):
    """ADDM training step: the shared DDPM objective plus λ·L_adv, and one discriminator update per call.

    Called by :class:`medad.engine.Trainer` as ``step(network, batch)``; returns ``loss`` (= ``ddpm`` + λ·
    ``adversarial``, back-propagated into the network by the trainer) and the scalars ``ddpm``, ``mse``,
    ``adversarial`` (generator side) and ``discriminator`` (D's loss of this step, already applied).
    Being an ``nn.Module``, its state — the discriminator's weights and, through ``get_extra_state``, the
    discriminator's optimiser and LR scheduler — is checkpointed and resumed by the trainer.

    Args:
        diffusion: the shared :class:`~medad.diffusion.GaussianDiffusion` (ADDM: linear, T = 1000, ε, MSE).
        discriminator: D, ``(B, C, *spatial) -> logits`` (or a list whose last entry is the logits), e.g.
            ``medad.networks.PatchDiscriminator``. Move it to the training device before building the step.
        discriminator_optimizer: D's optimiser; default Adam with ``discriminator_lr`` (the paper: Adam, 1e-4).
        discriminator_lr_scheduler: optional scheduler of D's optimiser, stepped after every D update.
        adversarial_weight: λ (paper: 0.05).
        criterion: adversarial criterion of :class:`~monai.losses.PatchAdversarialLoss`: ``"bce"`` (eq. 5),
            ``"least_squares"`` or ``"hinge"``.
        discriminator_lr: learning rate of the default optimiser.
        clip_denoised: clamp x̂_0 to [-1, 1] inside the fake reverse step, as the test-time sampler does.
        data_range / noise / simplex_kwargs / image_key / max_timestep: as :class:`~medad.methods.DiffusionStep`;
            ``noise`` is the training noise (AnoDDPM trains with ``"simplex"`` to detect with it).
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        discriminator: nn.Module,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        discriminator_lr_scheduler: Any | None = None,
        adversarial_weight: float = 0.05,
        criterion: str = "bce",
        discriminator_lr: float = 1e-4,
        clip_denoised: bool = True,
        data_range: tuple[float, float] = (0.0, 1.0),
        noise: str = "gaussian",
        simplex_kwargs: dict[str, Any] | None = None,
        image_key: str = "image",
        max_timestep: int | None = None,
    ) -> None:
        super().__init__(
            diffusion,
            data_range=data_range,
            noise=noise,
            simplex_kwargs=simplex_kwargs,
            image_key=image_key,
            max_timestep=max_timestep,
        )
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight (λ) must be >= 0, got {adversarial_weight}.")
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer or torch.optim.Adam(
            discriminator.parameters(), lr=discriminator_lr
        )
        self.discriminator_lr_scheduler = discriminator_lr_scheduler
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_loss = PatchAdversarialLoss(criterion=criterion)
        self.clip_denoised = clip_denoised
        self._ddp_discriminator: list[nn.Module] = []  # a list keeps the DDP wrapper out of the state dict

    # -- checkpoint ----------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """D's optimiser (and scheduler) state, saved under ``training_step._extra_state`` by the trainer."""
        scheduler = self.discriminator_lr_scheduler
        return {
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "discriminator_lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        }

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        if self.discriminator_lr_scheduler is not None and state.get("discriminator_lr_scheduler") is not None:
            self.discriminator_lr_scheduler.load_state_dict(state["discriminator_lr_scheduler"])

    # -- samples -------------------------------------------------------------------------------------
    def real_sample(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_{t-1} ~ q(x_{t-1} | x_0) with the training noise; x_0 itself where t = 0. Shapes ``(B, C, *spatial)``."""
        noisy = self.diffusion.q_sample(x0, (t - 1).clamp_min(0), noise=self.sample_noise(x0))
        first = (t == 0).reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.where(first, x0, noisy)

    def fake_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_{t-1} ~ p_θ(x_{t-1} | x_t) from the network output, differentiable w.r.t. it (DDPM Algorithm 2)."""
        noise = self.sample_noise(x_t)
        return self.diffusion.p_sample(model_output, x_t, t, noise=noise, clip_denoised=self.clip_denoised)["sample"]

    # -- adversarial game ----------------------------------------------------------------------------
    def _discriminator_for_update(self) -> nn.Module:
        """D itself, or (under torchrun) a DDP wrapper so every rank applies the same averaged D gradient."""
        if not is_distributed():
            return self.discriminator
        if not self._ddp_discriminator:
            device = next(self.discriminator.parameters()).device
            self._ddp_discriminator.append(
                nn.parallel.DistributedDataParallel(self.discriminator, device_ids=[device] if device.type == "cuda" else None)
            )
        return self._ddp_discriminator[0]

    def update_discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One optimiser step of D on detached samples: maximise log D(real) + log(1 − D(fake)) (eq. 5)."""
        discriminator = self._discriminator_for_update()
        logits = _logits(discriminator(torch.cat([real.detach(), fake.detach()])))  # one pass: one DDP reduction
        logits_real, logits_fake = logits.split([real.shape[0], fake.shape[0]])
        loss = 0.5 * (
            self.adversarial_loss(logits_real, target_is_real=True, for_discriminator=True)
            + self.adversarial_loss(logits_fake, target_is_real=False, for_discriminator=True)
        )
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.discriminator_optimizer.step()
        if self.discriminator_lr_scheduler is not None:
            self.discriminator_lr_scheduler.step()
        return loss.detach()

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Non-saturating −log D(fake) (or the chosen criterion); gradients reach the generator only."""
        with _frozen(self.discriminator):
            logits = _logits(self.discriminator(fake))
        return self.adversarial_loss(logits, target_is_real=True, for_discriminator=False)

    def forward(self, network: Callable[..., torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``batch[image_key]`` ``(B, C, *spatial)`` in ``data_range`` -> the step's losses (scalars)."""
        terms = self.losses(network, batch)
        ddpm = terms["loss"].mean()
        fake = self.fake_sample(terms["model_output"], terms["x_t"], terms["t"])
        with torch.no_grad():
            real = self.real_sample(terms["x0"], terms["t"])
        discriminator_loss = self.update_discriminator(real, fake)
        adversarial = self.generator_loss(fake)
        return {
            "loss": ddpm + self.adversarial_weight * adversarial,
            "ddpm": ddpm.detach(),
            "mse": terms["mse"].mean().detach(),
            "adversarial": adversarial.detach(),
            "discriminator": discriminator_loss,
        }

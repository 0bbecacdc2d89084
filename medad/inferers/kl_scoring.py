"""KL scoring over a few noise scales (seed 001, Lu et al. ICCV 2023, "Removing Anomalies as Noises").

For each noise scale t: one noise draw, x_t ~ q(x_t | x_0), one network evaluation, and

* the pixel score s_t = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t)) in bits (seed 001 eq. 9), summed over
  channels, from :meth:`medad.diffusion.GaussianDiffusion.vb_terms_bpd`;
* the feature score: squared error between features of x_0 and of the network's restoration x̂_0 at that t,
  bilinearly upsampled to the image size and averaged over feature levels.

Each t's map is standardised, the maps are averaged over t (Fig. 2: "We take the average of results from different
noise scales as the outputs"), and the final map is ``kl_weight·KL + feature_weight·feature``.

Deviations from the official code (VandyLu/anomaly_diff), all documented in ``bundles/ddpm_kl/docs``:

* standardisation: the official ``calc_bpd_loop`` standardises each noise scale's KL map with that map's own
  mean and standard deviation (over the whole tensor, evaluated with batch size 1, i.e. per image) and averages the
  channels at the end; here the channels are summed first (the KL of the joint pixel), then each image's map is
  standardised over its own pixels (``standardize="image"``). ``"calibrated"`` uses per-t statistics of normal
  images instead (:meth:`KLScoringInferer.fit_statistics`), which keeps the absolute level of a map.
* feature term: the official backbone (an ImageNet EfficientNet-B4 / WideResNet) cannot be downloaded here. A
  local TorchScript backbone can be given (``feature_extractor_path``); without one, the encoder of the trained
  UNet itself (``AnomalyUNet.encoder_features`` at t = 0) is used. The official feature term is a PaDiM
  Mahalanobis distance, already in units of normal variation; a raw feature squared error is not, so the feature
  maps are standardised the same way as the KL maps, which keeps the paper's 1:1 weighting meaningful.
* noise scales: the official evaluation uses a 250-step respacing, so its "t = 5" is the KL of the jump
  t = 20 -> 16 of the 1000-step chain. ``stride=4`` reproduces that; ``stride=1`` is eq. 9 on the trained chain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from medad.diffusion import GaussianDiffusion

from .base import AnomalyInferer, from_model_range, to_model_range

__all__ = ["KLScoringInferer", "feature_distance_map", "load_feature_extractor"]

FeatureExtractor = Callable[[torch.Tensor], Any]
STANDARDIZE_MODES = ("image", "calibrated", None)
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _as_feature_list(features: Any) -> list[torch.Tensor]:
    if torch.is_tensor(features):
        return [features]
    if isinstance(features, Mapping):
        return [v for v in features.values() if torch.is_tensor(v)]
    return [f for f in features]


def feature_distance_map(
    extractor: FeatureExtractor, images: torch.Tensor, restorations: torch.Tensor,
    image_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-pixel squared feature error between images and restorations, upsampled and averaged over levels.

    Each level contributes the channel-mean of ``(f(x) − f(x̂))²`` (the official code's ``mean_flat`` MSE per
    level, kept per pixel), resized to the image size with (bi/tri)linear interpolation.

    Args:
        extractor: ``images -> feature maps`` (a tensor, a list/tuple, or a dict of ``(B, C_l, *spatial_l)``).
        images: ``(B, C, *spatial)``.
        restorations: same shape.
        image_features: precomputed ``extractor(images)`` (one backbone pass for several restorations).

    Returns:
        ``(B, 1, *spatial)``.
    """
    if images.shape != restorations.shape:
        raise ValueError(f"images {tuple(images.shape)} and restorations {tuple(restorations.shape)} differ in shape.")
    reference = _as_feature_list(extractor(images)) if image_features is None else list(image_features)
    restored = _as_feature_list(extractor(restorations))
    if not reference or len(reference) != len(restored):
        raise ValueError("the feature extractor must return the same non-empty list of feature maps for every input.")
    size = images.shape[2:]
    mode = _INTERPOLATION[len(size)]
    total = torch.zeros((images.shape[0], 1, *size), dtype=images.dtype, device=images.device)
    for a, b in zip(reference, restored):
        error = ((a.float() - b.float()) ** 2).mean(dim=1, keepdim=True)
        if tuple(error.shape[2:]) != tuple(size):
            error = F.interpolate(error, size=size, mode=mode, align_corners=False)
        total = total + error.to(total.dtype)
    return total / len(reference)


def load_feature_extractor(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a local TorchScript backbone (``images -> list of feature maps``); nothing is downloaded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: feature extractor file not found (expected a TorchScript .pt/.ts file).")
    module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module


def _unwrap(network: Any) -> Any:
    """The bare network inside CountingNetwork / DistributedDataParallel wrappers."""
    while True:
        inner = getattr(network, "network", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(network, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return network
        network = inner


def _standardize_per_image(maps: torch.Tensor, eps: float) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    mean = flat.mean(dim=1).reshape((-1,) + (1,) * (maps.dim() - 1))
    std = flat.std(dim=1).clamp_min(eps).reshape(mean.shape) if flat.shape[1] > 1 else torch.ones_like(mean)
    return (maps - mean) / std


class KLScoringInferer(AnomalyInferer):
    """Seed 001's anomaly map: standardised KL(q ‖ p_θ) plus feature-reconstruction error, averaged over noise scales.

    Args:
        diffusion: the :class:`~medad.diffusion.GaussianDiffusion` the network was trained with (seed 001: linear,
            T = 1000, ``var_type="learned_range"``, hybrid loss).
        timesteps: noise scales t (0-based, of T). Default ``(20, 200, 400)`` = 5/50/100 on a 250-step respacing.
        kl_weight / feature_weight: weights of the two maps in the final map (official: 1 and 1). A zero weight
            skips that term's computation.
        feature_extractor: callable ``images in the loaders' range (B, C, *spatial) -> list of feature maps``; it
            must handle C channels (e.g. repeat gray to RGB) and its own normalisation.
        feature_extractor_path: a local TorchScript file of such a backbone (used when ``feature_extractor`` is
            None). With neither, the trained UNet's own ``encoder_features`` (at t = 0, on [-1, 1] images) are used.
        standardize: ``"image"`` (each image's map minus its mean, over its std; the official choice),
            ``"calibrated"`` (per-t mean/std of normal images, from ``kl_statistics`` / ``feature_statistics`` or
            :meth:`fit_statistics`) or None (raw bits / raw squared feature error).
        kl_statistics / feature_statistics: ``[(mean, std), ...]``, one pair per timestep, for ``"calibrated"``.
        calibration_loader: normal images (batches with ``"image"`` as this inferer receives them) from which
            ``"calibrated"`` fits the statistics on its first call when none were given (in memory only, not in
            the checkpoint).
        calibration_batches: use at most this many batches of ``calibration_loader``.
        stride: the KL compares the step ``t -> t - stride`` (4 = the official 250-step respacing). Every t must be
            ``>= stride`` so the term is a KL, not the decoder likelihood of the last step.
        clip_denoised: clamp x̂_0 to [-1, 1] (official: True).
        data_range: range of the input images, mapped to the models' [-1, 1].
        seed: seed of the noise draws, for repeatable maps (None: global RNG).
        eps: lower bound of a standard deviation.
        max_training_timestep: the network's training drew t below this only (the bundle key of that name);
            a noise scale at or above it raises ValueError. None: trained on all T timesteps.

    Returns of ``inferer(images, network)``: ``anomaly_map`` ``(B, 1, *spatial)``; ``restoration`` ``(B, C, *spatial)``
    (x̂_0 of the smallest t, in the input range); ``kl_map`` and ``feature_map`` ``(B, 1, *spatial)`` (standardised,
    averaged over t, before weighting). Network evaluations: one per timestep (the feature backbone, when it is the
    UNet encoder, adds ``len(timesteps) + 1`` encoder passes that are not counted as network evaluations).
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        timesteps: Sequence[int] = (20, 200, 400),
        kl_weight: float = 1.0,
        feature_weight: float = 1.0,
        feature_extractor: FeatureExtractor | None = None,
        feature_extractor_path: str | os.PathLike | None = None,
        standardize: str | None = "image",
        kl_statistics: Sequence[Sequence[float]] | None = None,
        feature_statistics: Sequence[Sequence[float]] | None = None,
        calibration_loader: Iterable[Mapping[str, Any]] | None = None,
        calibration_batches: int | None = None,
        stride: int = 1,
        clip_denoised: bool = True,
        data_range: tuple[float, float] = (0.0, 1.0),
        seed: int | None = 0,
        eps: float = 1e-8,
        max_training_timestep: int | None = None,
    ) -> None:
        super().__init__()
        if standardize not in STANDARDIZE_MODES:
            raise ValueError(f"standardize must be 'image', 'calibrated' or None, got {standardize!r}.")
        self.timesteps = [int(t) for t in timesteps]
        self.stride = int(stride)
        if not self.timesteps:
            raise ValueError("timesteps must hold at least one noise scale.")
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}.")
        bad = [t for t in self.timesteps if not self.stride <= t < diffusion.num_timesteps]
        if bad:
            raise ValueError(
                f"timesteps {bad} must lie in [stride, T - 1] = [{self.stride}, {diffusion.num_timesteps - 1}] so each "
                "score is a KL term of the chain."
            )
        diffusion.check_trained_range(max(self.timesteps), max_training_timestep)
        if kl_weight == 0 and feature_weight == 0:
            raise ValueError("kl_weight and feature_weight are both 0: the anomaly map would be empty.")
        self.diffusion = diffusion
        self.kl_weight = float(kl_weight)
        self.feature_weight = float(feature_weight)
        if feature_extractor is None and feature_extractor_path:
            feature_extractor = load_feature_extractor(feature_extractor_path)
        self.feature_extractor = feature_extractor
        self.standardize = standardize
        self.kl_statistics = self._check_statistics(kl_statistics, "kl_statistics")
        self.feature_statistics = self._check_statistics(feature_statistics, "feature_statistics")
        self.calibration_loader = calibration_loader
        self.calibration_batches = calibration_batches
        self.clip_denoised = clip_denoised
        self.data_range = tuple(data_range)
        self.seed = seed
        self.eps = float(eps)

    # ------------------------------------------------------------------ helpers
    def _check_statistics(self, statistics: Sequence[Sequence[float]] | None, name: str) -> list[tuple[float, float]] | None:
        if statistics is None:
            return None
        pairs = [(float(m), float(s)) for m, s in statistics]
        if len(pairs) != len(self.timesteps):
            raise ValueError(f"{name} needs one (mean, std) pair per timestep ({len(self.timesteps)}), got {len(pairs)}.")
        return pairs

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def _extractor(self, network: Any) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """``images in the input range -> feature maps``: the given backbone, or the trained UNet's encoder."""
        if self.feature_extractor is not None:
            extractor = self.feature_extractor
            return lambda images: _as_feature_list(extractor(images))
        unet = _unwrap(network)
        if not hasattr(unet, "encoder_features"):
            raise ValueError(
                "feature_weight > 0 needs a feature_extractor, a feature_extractor_path, or a network with "
                "encoder_features (medad.networks.AnomalyUNet)."
            )

        def encoder(images: torch.Tensor) -> list[torch.Tensor]:
            t0 = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            return unet.encoder_features(to_model_range(images, self.data_range), t0)

        return encoder

    @torch.no_grad()
    def raw_maps(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Unstandardised per-timestep maps.

        Args:
            inputs: ``(B, C, *spatial)`` images in ``data_range``.
            network: called as ``network(x_t, t)``.

        Returns:
            dict of lists with one entry per timestep: ``kl`` ``(B, 1, *spatial)`` in bits (summed over channels),
            ``feature`` ``(B, 1, *spatial)`` (empty list when ``feature_weight == 0``), ``pred_x0``
            ``(B, C, *spatial)`` in [-1, 1].
        """
        x0 = to_model_range(inputs, self.data_range)
        generator = self._generator(inputs.device)
        batch = x0.shape[0]
        extractor = self._extractor(network) if self.feature_weight != 0 else None
        image_features = extractor(inputs) if extractor is not None else None
        maps: dict[str, list[torch.Tensor]] = {"kl": [], "feature": [], "pred_x0": []}
        for step in self.timesteps:
            t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
            t_prev = None if self.stride == 1 else t - self.stride
            x_t = self.diffusion.q_sample(x0, t, generator=generator)  # one noise draw per scale (official)
            out = self.diffusion.vb_terms_bpd(network(x_t, t), x0, x_t, t, clip_denoised=self.clip_denoised, t_prev=t_prev)
            maps["kl"].append(out["kl_map"].sum(dim=1, keepdim=True))
            maps["pred_x0"].append(out["pred_x0"])
            if extractor is not None:
                restored = from_model_range(out["pred_x0"], self.data_range)
                maps["feature"].append(feature_distance_map(extractor, inputs, restored, image_features))
        return maps

    def _standardize(self, maps: list[torch.Tensor], statistics: list[tuple[float, float]] | None, name: str) -> torch.Tensor:
        """Standardise each timestep's map (see ``standardize``) and average over timesteps."""
        out = []
        for i, m in enumerate(maps):
            if self.standardize == "image":
                m = _standardize_per_image(m, self.eps)
            elif self.standardize == "calibrated":
                if statistics is None:
                    raise ValueError(
                        f"standardize='calibrated' needs {name}: give a calibration_loader of normal images, call "
                        "fit_statistics(network, normal_loader) first, or pass the per-timestep (mean, std) pairs."
                    )
                mean, std = statistics[i]
                m = (m - mean) / max(std, self.eps)
            out.append(m)
        return torch.stack(out).mean(dim=0)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) images -> ``anomaly_map``/``kl_map``/``feature_map`` (B, 1, *spatial), ``restoration``."""
        if self.standardize == "calibrated" and self.kl_statistics is None and self.calibration_loader is not None:
            self.fit_statistics(network, self.calibration_loader, device=inputs.device, max_batches=self.calibration_batches)
        maps = self.raw_maps(inputs, network)
        kl_map = self._standardize(maps["kl"], self.kl_statistics, "kl_statistics")
        if maps["feature"]:
            feature_map = self._standardize(maps["feature"], self.feature_statistics, "feature_statistics")
        else:
            feature_map = torch.zeros_like(kl_map)
        anomaly_map = self.kl_weight * kl_map + self.feature_weight * feature_map
        smallest = min(range(len(self.timesteps)), key=lambda i: self.timesteps[i])
        restoration = from_model_range(maps["pred_x0"][smallest], self.data_range)
        return {"anomaly_map": anomaly_map, "restoration": restoration, "kl_map": kl_map, "feature_map": feature_map}

    @torch.no_grad()
    def fit_statistics(
        self,
        network: Callable[..., torch.Tensor],
        loader: Iterable[Mapping[str, Any]],
        image_key: str = "image",
        device: str | torch.device | None = None,
        max_batches: int | None = None,
    ) -> dict[str, list[tuple[float, float]]]:
        """Per-timestep pixel mean/std of the raw maps over normal images, for ``standardize="calibrated"``.

        Sets ``kl_statistics`` / ``feature_statistics`` and returns them. ``loader`` yields batches whose
        ``image_key`` holds ``(B, C, *spatial)`` images as this inferer receives them (2D slices for MRI, not whole
        volumes). Accumulates in float64 over every pixel of every image.
        """
        sums = {"kl": [[0.0, 0.0, 0] for _ in self.timesteps], "feature": [[0.0, 0.0, 0] for _ in self.timesteps]}
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            images = batch[image_key]
            if device is not None:
                images = images.to(device)
            maps = self.raw_maps(images, network)
            for name in ("kl", "feature"):
                for i, m in enumerate(maps[name]):
                    m = m.double()
                    sums[name][i][0] += float(m.sum())
                    sums[name][i][1] += float((m * m).sum())
                    sums[name][i][2] += m.numel()
        if sums["kl"][0][2] == 0:
            raise ValueError("fit_statistics got no images from the loader.")

        def pairs(acc: list[list[float]]) -> list[tuple[float, float]] | None:
            if acc[0][2] == 0:
                return None
            out = []
            for total, squares, count in acc:
                mean = total / count
                out.append((mean, max(squares / count - mean * mean, 0.0) ** 0.5))
            return out

        self.kl_statistics = pairs(sums["kl"])
        self.feature_statistics = pairs(sums["feature"])
        return {"kl": self.kl_statistics or [], "feature": self.feature_statistics or []}

"""Inferers of the two baselines (``zscore``, ``intensity``): the same ``{"anomaly_map", "restoration"}`` outputs.

Both work on whole images or volumes of any dimension (a per-voxel model and a per-volume normalisation need
the whole grid, so they are not used under slices or sliding windows).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from medad.scores.filters import masked_gaussian_filter

from .base import AnomalyInferer, nonzero_foreground

__all__ = ["GaussianScoreInferer", "IntensityScoreInferer", "signed_deviation"]

_SIGNS = {False: "abs", "abs": "abs", True: "positive", "positive": "positive", "negative": "negative"}


def _sign_mode(signed: bool | str) -> str:
    if signed not in _SIGNS:
        raise ValueError(f"signed must be false/'abs', true/'positive' or 'negative', got {signed!r}.")
    return _SIGNS[signed]


def signed_deviation(z: torch.Tensor, signed: bool | str = False) -> torch.Tensor:
    """|z| (``signed=False``/``"abs"``), max(z, 0) (``True``/``"positive"``: bright lesions) or max(−z, 0)
    (``"negative"``: dark lesions)."""
    mode = _sign_mode(signed)
    if mode == "abs":
        return z.abs()
    return z.clamp_min(0.0) if mode == "positive" else (-z).clamp_min(0.0)


def _reduce_channels(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "max":
        return values.amax(dim=1, keepdim=True)
    if reduction == "sum":
        return values.sum(dim=1, keepdim=True)
    raise ValueError(f"channel_reduction must be 'max' or 'sum', got {reduction!r}.")


class GaussianScoreInferer(AnomalyInferer):
    """z-score of each pixel / voxel under a per-pixel Gaussian (:class:`medad.networks.baselines.PixelGaussian`).

    ``network(images)`` gives ``(B, 2C, *spatial)``: mean (``:C``) and floored std (``C:``). Then
    ``z = (x − mean) / std`` per channel, the deviation per ``signed`` (:func:`signed_deviation`), reduced over
    channels by ``channel_reduction`` (``"max"``: the most deviating channel; ``"sum"``: the sum over channels).
    The restoration is the mean image, the "normal" the baseline compares with.

    Args:
        signed: ``False`` |z| (default), ``True``/``"positive"`` bright only, ``"negative"`` dark only.
        channel_reduction: ``"max"`` (default) or ``"sum"``.
        map_sigma: if > 0, the map is smoothed by a Gaussian of this standard deviation (voxels) inside the
            foreground (``foreground=`` given to the call, e.g. the brain mask, else the nonzero input voxels) and
            zeroed outside it (:func:`medad.scores.masked_gaussian_filter`), as the MRI methods' maps are.
    """

    def __init__(self, signed: bool | str = False, channel_reduction: str = "max", map_sigma: float = 0.0) -> None:
        super().__init__()
        _sign_mode(signed)
        _reduce_channels(torch.zeros(1, 1), channel_reduction)
        if map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0 (voxels), got {map_sigma}.")
        self.signed = signed
        self.channel_reduction = channel_reduction
        self.map_sigma = float(map_sigma)

    @torch.no_grad()
    def __call__(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        foreground: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) -> ``anomaly_map`` (B, 1, *spatial), ``restoration`` (B, C, *spatial).

        ``foreground``: optional (B, 1, *spatial) region for ``map_sigma`` smoothing.
        """
        params = network(inputs)
        channels = inputs.shape[1]
        mean, std = params[:, :channels], params[:, channels:]
        z = (inputs - mean) / std
        anomaly = _reduce_channels(signed_deviation(z, self.signed), self.channel_reduction)
        if self.map_sigma > 0:
            region = foreground if foreground is not None else nonzero_foreground(inputs)
            anomaly = masked_gaussian_filter(anomaly, region, self.map_sigma)
        return {"anomaly_map": anomaly, "restoration": mean}


class IntensityScoreInferer(AnomalyInferer):
    """Intensity thresholding within the brain: the normalised image is the anomaly map (Meissen et al. 2021).

    ``network(images)`` is :class:`medad.networks.baselines.BrainIntensity` (intensities normalised within the
    foreground, 0 outside). The map is the deviation per ``signed`` (default ``True``: bright lesions, as FLAIR
    hyperintensities), max over channels. The restoration is a flat brain at each image's mean foreground
    intensity (no model of normal anatomy exists here), so overlays show the image against its own average.

    Args:
        signed: ``True``/``"positive"`` (default), ``"negative"`` (dark lesions) or ``False``/``"abs"``.
        map_sigma: if > 0, the map is smoothed by a Gaussian of this standard deviation (voxels) inside the
            foreground (:func:`medad.scores.masked_gaussian_filter`), as :class:`GaussianScoreInferer` does.
    """

    def __init__(self, signed: bool | str = True, map_sigma: float = 0.0) -> None:
        super().__init__()
        _sign_mode(signed)
        if map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0 (voxels), got {map_sigma}.")
        self.signed = signed
        self.map_sigma = float(map_sigma)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) -> ``anomaly_map`` (B, 1, *spatial), ``restoration`` (B, C, *spatial)."""
        normalised = network(inputs)
        anomaly = signed_deviation(normalised, self.signed).amax(dim=1, keepdim=True)
        foreground = nonzero_foreground(inputs).to(inputs.dtype)
        dims = tuple(range(2, inputs.dim()))
        mean = (inputs * foreground).sum(dim=dims, keepdim=True) / foreground.sum(dim=dims, keepdim=True).clamp_min(1)
        anomaly = masked_gaussian_filter(anomaly, foreground, self.map_sigma)  # sigma 0: only zero outside
        return {"anomaly_map": anomaly, "restoration": mean * foreground}

"""Patch-wise inference for restoration inferers, with DISYRE's foreground weighting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch
from monai.inferers import sliding_window_inference

from .base import AnomalyInferer

__all__ = ["SlidingWindowAnomalyInferer"]

_WEIGHT_KEY = "__foreground_weight__"


class SlidingWindowAnomalyInferer(AnomalyInferer):
    """Run a restoration inferer on overlapping patches and blend them with MONAI's ``sliding_window_inference``.

    With ``foreground_weighting`` every patch's outputs are also weighted by the fraction of its pixels that are
    foreground (DISYRE: patches that are mostly background are unreliable). It is done by letting each patch
    return ``f · output`` and ``f`` and dividing the two blended results, so MONAI's Gaussian blending is reused
    unchanged: result = Σ w·f·output / Σ w·f.

    Args:
        inferer: the per-patch restoration inferer.
        roi_size: patch size, e.g. (128, 128).
        overlap: fraction of overlap between patches (DISYRE: 0.75).
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian σ as a fraction of the patch size (DISYRE: 0.125).
        sw_batch_size: patches per network call.
        foreground_weighting: weight patches by their foreground fraction.
        normalize_foreground_weight: True (default): a foreground-weighted average, Σ w·f·output / Σ w·f.
            False: DISYRE's official blending (``snavalm/disyre`` ``sliding_window_inference``), where only the
            anomaly map of each patch is multiplied by f and the blend divides by the Gaussian weights alone,
            Σ w·f·map / Σ w, so pixels seen mostly by background-heavy patches are damped (the restoration is
            blended unweighted).
        foreground_threshold: pixels above this (in the input's range) are foreground when no mask is given.
        zero_background: set the anomaly map to 0 where the input is background.
        whole_image: run the inferer once on the whole image instead of on patches (fully convolutional; the
            fast inference profile, one network call for a whole batch of images). An image smaller than
            ``roi_size`` is zero-padded up to it exactly as ``sliding_window_inference`` pads it (the networks
            are not shift-invariant, so this keeps the maps of the patch-wise setting) and its foreground weight
            is that of the one window; a larger image is no longer split (the network sees it all at once,
            weight = its foreground fraction; accuracy change measured in docs/results.md, "Speed").
        pad_to_roi: with ``whole_image``, pad an image smaller than ``roi_size`` up to it (default, as above); False
            runs the network on the image as given, for a network trained on whole images (whole slices padded only
            to the UNet's divisor): it then sees every image exactly as in training, because a padding that moves
            the image by a number of pixels that is not a multiple of the UNet's stride changes the maps.
    """

    def __init__(
        self,
        inferer: AnomalyInferer,
        roi_size: Sequence[int],
        overlap: float = 0.75,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        sw_batch_size: int = 8,
        foreground_weighting: bool = True,
        foreground_threshold: float = 0.0,
        zero_background: bool = True,
        normalize_foreground_weight: bool = True,
        whole_image: bool = False,
        pad_to_roi: bool = True,
    ) -> None:
        super().__init__()
        if not pad_to_roi and not whole_image:
            raise ValueError("pad_to_roi=False needs whole_image=True: the sliding window always pads to roi_size.")
        self.inferer = inferer
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = overlap
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.sw_batch_size = sw_batch_size
        self.foreground_weighting = foreground_weighting
        self.foreground_threshold = foreground_threshold
        self.zero_background = zero_background
        self.normalize_foreground_weight = normalize_foreground_weight
        self.whole_image = whole_image
        self.pad_to_roi = pad_to_roi

    def foreground(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, 1, *spatial) float foreground mask."""
        return (inputs.abs().amax(dim=1, keepdim=True) > self.foreground_threshold).to(inputs.dtype)

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

        ``foreground``: optional (B, 1, *spatial) mask (e.g. the brain mask); default: input above threshold.
        """
        channels = inputs.shape[1]
        fg = self.foreground(inputs) if foreground is None else (foreground > 0).to(inputs.dtype)

        def predictor(window: torch.Tensor) -> dict[str, torch.Tensor]:
            image, window_fg = window[:, :channels], window[:, channels:]
            out = self.inferer(image, network)
            if not self.foreground_weighting:
                return out
            fraction = window_fg.flatten(1).mean(dim=1).reshape((-1,) + (1,) * (image.dim() - 1))
            if not self.normalize_foreground_weight:
                return {**out, "anomaly_map": out["anomaly_map"] * fraction}
            weighted = {k: v * fraction for k, v in out.items()}
            weighted[_WEIGHT_KEY] = fraction.expand_as(out["anomaly_map"]).contiguous()
            return weighted

        if self.whole_image:
            return self._whole_image(inputs, fg, network)
        blended = sliding_window_inference(
            torch.cat([inputs, fg], dim=1),
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            padding_mode="constant",
            cval=0.0,
        )
        if self.foreground_weighting and self.normalize_foreground_weight:
            weight = blended.pop(_WEIGHT_KEY).clamp_min(1e-8)
            blended = {k: v / weight for k, v in blended.items()}
        if self.zero_background:
            blended["anomaly_map"] = blended["anomaly_map"] * fg
        return blended

    def _whole_image(
        self, inputs: torch.Tensor, fg: torch.Tensor, network: Callable[..., torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One window covering the whole (B, C, *spatial) image; the blend of a single window is the window itself."""
        spatial = inputs.shape[2:]
        pad: list[int] = []  # as sliding_window_inference: half before, the rest after, last axis first
        for size, roi in reversed(list(zip(spatial, self.roi_size))):
            diff = max(roi - int(size), 0) if self.pad_to_roi else 0
            pad += [diff // 2, diff - diff // 2]
        padded = torch.nn.functional.pad(inputs, pad) if any(pad) else inputs
        out = dict(self.inferer(padded, network))
        if any(pad):
            crop = tuple(slice(before, before + int(size)) for size, before in zip(spatial, reversed(pad[0::2])))
            out = {k: v[(slice(None), slice(None), *crop)] for k, v in out.items()}
        if self.foreground_weighting and not self.normalize_foreground_weight:
            # Σ w·f·map / Σ w over one window is f·map; with normalisation Σ w·f·out / Σ w·f is out itself
            window = math.prod(int(s) for s in padded.shape[2:])
            fraction = fg.flatten(1).sum(dim=1) / window
            out["anomaly_map"] = out["anomaly_map"] * fraction.reshape((-1,) + (1,) * (inputs.dim() - 1))
        if self.zero_background:
            out["anomaly_map"] = out["anomaly_map"] * fg
        return out

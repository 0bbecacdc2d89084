"""FAIR: restore an image from its high-frequency part and compare (seed 002; code ``liutongkun/FAIR``).

At test time the image is converted to gray (BT.601, as OpenCV's ``COLOR_BGR2GRAY`` in the official
``data_loaderbhpf.py``), high-pass filtered in the Fourier domain (2nd-order Butterworth, ``D0 = 30`` for
256² images; Gaussian / ideal filters or the Sobel ``(Gx, Gy)`` gradients are the paper's ablations, Tables
7-10), and a UNet restores the full (colour) image from it. The anomaly map compares the image with its
restoration (paper eqs. 8-10). The input extraction is one :class:`medad.transforms.HighFrequencyInput` shared
with the training step (:class:`medad.methods.FairTrainingStep`), so training and inference can never disagree.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from medad.scores import fair_anomaly_map, mean_filter, squared_error_map
from medad.transforms.frequency import HighFrequencyInput

from .base import AnomalyInferer

__all__ = ["MAP_KINDS", "FrequencyRestorationInferer"]

#: anomaly maps: FAIR's MSGMS + CIELAB colour difference, or the squared restoration error.
MAP_KINDS = ("fair", "squared")


class FrequencyRestorationInferer(AnomalyInferer):
    """FAIR's inference: image -> gray -> high-pass -> network -> restoration -> anomaly map.

    Composes with :class:`~medad.inferers.SlidingWindowAnomalyInferer` (the high-pass is then taken per patch)
    and with :class:`~medad.inferers.SliceAggregationInferer` (2D slices of MRI volumes, ``channels = 1``).

    Args:
        high_frequency: the network's input, the :class:`~medad.transforms.HighFrequencyInput` the network was
            trained with (the training step's); default ``HighFrequencyInput()``: FAIR's Butterworth filter,
            ``D0 = 30`` on 256² images, order 2, symmetric border extension.
        map: ``"fair"``: ``MSGMS + color_weight · ((Δa*)² + (Δb*)²)`` (eqs. 8-10), or ``"squared"``: the squared
            error summed over channels. Either map is smoothed by the ``mean_filter_size`` mean filter.
        color_weight: weight of the CIELAB term (FAIR: 0.0003; 0 for gray images anyway).
        mean_filter_size: odd side of the mean filter (FAIR: 21 on 256² images; 1 disables it).
        msgms_scales: MSGMS pyramid levels (FAIR: 2).
        channel_order: ``"rgb"`` (correct colour conversion, default) or ``"bgr"`` (reproduces the official code,
            which feeds OpenCV's BGR arrays to kornia's ``rgb_to_lab``).
        padding_mode: mean-filter padding: ``"zeros"`` (default, FAIR's code; damps the map near the border) or
            ``"reflect"``.
        gradient_padding_mode: Prewitt padding in MSGMS: ``"reflect"`` (default), ``"replicate"`` or ``"zeros"`` (FAIR's code).
        margin: restore on a canvas mirror-padded by this many pixels (default 8; 0: the official full-image
            restoration; see :meth:`HighFrequencyInput.restore <medad.transforms.HighFrequencyInput.restore>`); must
            be what the network was trained with (:class:`~medad.methods.FairTrainingStep` ``margin``).

    The defaults of the input's ``extension``, ``margin`` and ``gradient_padding_mode`` remove most of the bright frame
    along the image border that FAIR's settings put in the maps (issue #11; measured in ``docs/results.md``);
    ``HighFrequencyInput(extension="periodic"), margin=0, gradient_padding_mode="zeros"`` are the official code.
    """

    def __init__(
        self,
        high_frequency: HighFrequencyInput | None = None,
        map: str = "fair",
        color_weight: float = 0.0003,
        mean_filter_size: int = 21,
        msgms_scales: int = 2,
        channel_order: str = "rgb",
        padding_mode: str = "zeros",
        gradient_padding_mode: str = "reflect",
        margin: int = 8,
    ) -> None:
        super().__init__()
        if map not in MAP_KINDS:
            raise ValueError(f"frequency.py: unknown anomaly map {map!r}; use one of {MAP_KINDS}.")
        if mean_filter_size < 1 or mean_filter_size % 2 == 0:
            raise ValueError(f"frequency.py: mean_filter_size must be a positive odd number, got {mean_filter_size}.")
        self.high_frequency = high_frequency if high_frequency is not None else HighFrequencyInput()
        self.map = map
        self.color_weight = float(color_weight)
        self.mean_filter_size = int(mean_filter_size)
        self.msgms_scales = int(msgms_scales)
        self.channel_order = channel_order
        self.padding_mode = padding_mode
        self.gradient_padding_mode = gradient_padding_mode
        self.margin = int(margin)

    def anomaly_map(self, images: torch.Tensor, restoration: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` image and restoration -> ``(B, 1, *spatial)`` map."""
        if self.map == "fair":
            return fair_anomaly_map(
                images, restoration, self.color_weight, self.mean_filter_size, self.msgms_scales,
                self.channel_order, self.padding_mode, self.gradient_padding_mode,
            )
        return mean_filter(squared_error_map(images, restoration), self.mean_filter_size, self.padding_mode)

    @torch.no_grad()
    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """(B, C, *spatial) images in [0, 1] -> ``anomaly_map`` (B, 1, *spatial), ``restoration`` (B, C, *spatial)."""
        restoration = self.high_frequency.restore(network, inputs, self.margin)
        if restoration.shape != inputs.shape:
            raise ValueError(
                f"frequency.py: the network restored shape {tuple(restoration.shape)} for images of shape "
                f"{tuple(inputs.shape)}; its out_channels must equal the image channels."
            )
        restoration = restoration.to(inputs.dtype)
        return {"anomaly_map": self.anomaly_map(inputs, restoration).to(inputs.dtype), "restoration": restoration}

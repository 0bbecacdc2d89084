"""FAIR: restore an image from its high-frequency part and compare (seed 002; code ``liutongkun/FAIR``).

At test time the image is converted to gray (BT.601, as OpenCV's ``COLOR_BGR2GRAY`` in the official
``data_loaderbhpf.py``), high-pass filtered in the Fourier domain (2nd-order Butterworth, ``D0 = 30`` for
256² images; Gaussian / ideal filters or the Sobel ``(Gx, Gy)`` gradients are the paper's ablations, Tables
7-10), and a UNet restores the full (colour) image from it. The anomaly map compares the image with its
restoration (paper eqs. 8-10). The same input extraction is used by the training step
(:class:`medad.methods.fair.FairTrainingStep`), so training and inference can never disagree.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from medad.scores import fair_anomaly_map, mean_filter, squared_error_map
from medad.transforms.frequency import EXTENSIONS, FILTER_KINDS, highpass, sobel_gradients, to_grayscale

from .base import AnomalyInferer

__all__ = [
    "EXTRACTORS",
    "MAP_KINDS",
    "high_frequency_input",
    "restore_from_high_frequency",
    "extractor_channels",
    "FrequencyRestorationInferer",
]

#: high-frequency extractors: the Fourier high-pass filters and the spatial Sobel gradients.
EXTRACTORS = (*FILTER_KINDS, "sobel")
#: anomaly maps: FAIR's MSGMS + CIELAB colour difference, or the squared restoration error.
MAP_KINDS = ("fair", "squared")


def extractor_channels(filter_kind: str = "butterworth") -> int:
    """Channels of the network input made by :func:`high_frequency_input`: 2 for ``"sobel"`` (Gx, Gy), else 1."""
    if filter_kind not in EXTRACTORS:
        raise ValueError(f"frequency.py: unknown high-frequency extractor {filter_kind!r}; use one of {EXTRACTORS}.")
    return 2 if filter_kind == "sobel" else 1


def high_frequency_input(
    images: torch.Tensor,
    filter_kind: str = "butterworth",
    cutoff: float = 30.0,
    order: int = 2,
    cutoff_reference_size: int | None = 256,
    extension: str = "symmetric",
) -> torch.Tensor:
    """FAIR's network input: gray image -> high-pass (paper eqs. 1-6) or Sobel gradients (eq. 12).

    Training (:class:`medad.methods.fair.FairTrainingStep`) and inference both call this function, so the
    network always sees the same border handling.

    Args:
        images: ``(B, C, *spatial)`` with C = 1 (gray) or 3 (RGB), values in [0, 1].
        filter_kind: ``"butterworth"`` (default), ``"gaussian"``, ``"ideal"`` or ``"sobel"`` (2D only).
        cutoff: ``D0`` for a ``cutoff_reference_size``-long axis (see :mod:`medad.transforms.frequency`).
        order: Butterworth order ``n``.
        cutoff_reference_size: the image size ``cutoff`` is meant for (256 in the paper); None: raw index units.

    Returns:
        ``(B, 1, *spatial)``, or ``(B, 2, H, W)`` for ``"sobel"``.
    """
    extractor_channels(filter_kind)  # validates the name
    gray = to_grayscale(images.float())
    if filter_kind == "sobel":
        return sobel_gradients(gray)
    return highpass(gray, filter_kind, cutoff, order, cutoff_reference_size, extension)


def restore_from_high_frequency(
    network: Callable[..., torch.Tensor],
    images: torch.Tensor,
    filter_kind: str = "butterworth",
    cutoff: float = 30.0,
    order: int = 2,
    cutoff_reference_size: int | None = 256,
    extension: str = "symmetric",
    margin: int = 0,
) -> torch.Tensor:
    """``network(high_frequency_input(images))``, optionally on a mirror-padded canvas cropped back.

    With ``margin > 0`` the images are reflect-padded by ``margin`` pixels on every side before the high-pass and
    the network, and the restoration is cropped back: the image's border pixels are then restored with context
    on both sides, away from the zero padding of the network's convolutions. Training and inference call this one
    function, so the network learns with the same canvas it is used with. ``2 * margin`` must keep the size
    divisible by the network's ``2 ** (levels - 1)``.

    Returns:
        ``(B, out_channels, *spatial)``, the spatial size of ``images``.
    """
    spatial = images.shape[2:]
    if margin > 0:
        if any(margin >= s for s in spatial):
            raise ValueError(f"frequency.py: border margin {margin} must be smaller than the image size {tuple(spatial)}.")
        images = F.pad(images, (margin,) * (2 * len(spatial)), mode="reflect")
    restoration = network(high_frequency_input(images, filter_kind, cutoff, order, cutoff_reference_size, extension))
    if margin > 0:
        restoration = restoration[(..., *(slice(margin, margin + s) for s in spatial))]
    return restoration


class FrequencyRestorationInferer(AnomalyInferer):
    """FAIR's inference: image -> gray -> high-pass -> network -> restoration -> anomaly map.

    Composes with :class:`~medad.inferers.SlidingWindowAnomalyInferer` (the high-pass is then taken per patch)
    and with :class:`~medad.inferers.SliceAggregationInferer` (2D slices of MRI volumes, ``channels = 1``).

    Args:
        filter_kind: ``"butterworth"`` (FAIR), ``"gaussian"``, ``"ideal"`` or ``"sobel"``.
        cutoff: high-pass cutoff ``D0`` (FAIR: 30 on 256² images).
        order: Butterworth order (FAIR: 2).
        cutoff_reference_size: image size ``cutoff`` refers to; smaller images keep the same relative cutoff.
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
        extension: Fourier filter border handling, ``"symmetric"`` (default) or ``"periodic"`` (FAIR's code); must
            be what the network was trained with (:class:`medad.methods.fair.FairTrainingStep` ``extension``).
        margin: restore on a canvas mirror-padded by this many pixels (default 8; 0: the official full-image
            restoration; see :func:`restore_from_high_frequency`); must be what the network was trained with
            (``FairTrainingStep`` ``margin``).

    The defaults of ``extension``, ``margin`` and ``gradient_padding_mode`` remove most of the bright frame along the
    image border that FAIR's settings put in the maps (issue #11; measured in ``docs/results.md``);
    ``extension="periodic", margin=0, gradient_padding_mode="zeros"`` are the official code.
    """

    def __init__(
        self,
        filter_kind: str = "butterworth",
        cutoff: float = 30.0,
        order: int = 2,
        cutoff_reference_size: int | None = 256,
        map: str = "fair",
        color_weight: float = 0.0003,
        mean_filter_size: int = 21,
        msgms_scales: int = 2,
        channel_order: str = "rgb",
        padding_mode: str = "zeros",
        gradient_padding_mode: str = "reflect",
        extension: str = "symmetric",
        margin: int = 8,
    ) -> None:
        super().__init__()
        extractor_channels(filter_kind)
        if map not in MAP_KINDS:
            raise ValueError(f"frequency.py: unknown anomaly map {map!r}; use one of {MAP_KINDS}.")
        if mean_filter_size < 1 or mean_filter_size % 2 == 0:
            raise ValueError(f"frequency.py: mean_filter_size must be a positive odd number, got {mean_filter_size}.")
        self.filter_kind = filter_kind
        self.cutoff = float(cutoff)
        self.order = int(order)
        self.cutoff_reference_size = cutoff_reference_size
        self.map = map
        self.color_weight = float(color_weight)
        self.mean_filter_size = int(mean_filter_size)
        self.msgms_scales = int(msgms_scales)
        self.channel_order = channel_order
        if extension not in EXTENSIONS:
            raise ValueError(f"frequency.py: unknown Fourier-filter extension {extension!r}; use one of {EXTENSIONS}.")
        self.padding_mode = padding_mode
        self.gradient_padding_mode = gradient_padding_mode
        self.extension = extension
        self.margin = int(margin)

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` images -> the network's high-frequency input ``(B, 1 or 2, *spatial)``."""
        return high_frequency_input(
            images, self.filter_kind, self.cutoff, self.order, self.cutoff_reference_size, self.extension
        )

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
        restoration = restore_from_high_frequency(
            network, inputs, self.filter_kind, self.cutoff, self.order, self.cutoff_reference_size, self.extension,
            self.margin,
        )
        if restoration.shape != inputs.shape:
            raise ValueError(
                f"frequency.py: the network restored shape {tuple(restoration.shape)} for images of shape "
                f"{tuple(inputs.shape)}; its out_channels must equal the image channels."
            )
        restoration = restoration.to(inputs.dtype)
        return {"anomaly_map": self.anomaly_map(inputs, restoration).to(inputs.dtype), "restoration": restoration}

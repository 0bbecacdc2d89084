"""Frequency-domain high-pass filters and image gradients: the inputs of FAIR (seed 002), made by
:class:`HighFrequencyInput`.

FAIR restores an image from its high-frequency part: the grayscale image goes through
``fft2 -> fftshift -> multiply by a high-pass transfer function H -> ifftshift -> ifft2 -> real``
(paper eq. 5; official code ``liutongkun/FAIR``, ``data_loaderbhpf.py``). The paper's default is a
second-order Butterworth high-pass filter (BHPF) with cutoff ``D0 = 30`` on 256x256 images;
Gaussian (GHPF) and ideal (IHPF) high-pass filters and the Sobel gradients ``(Gx, Gy)`` are the
ablations of its Tables 7 and 10.

Distances ``D`` are measured on the *centred* frequency grid (DC at index ``N // 2`` of every
axis, where ``torch.fft.fftshift`` puts it), in frequency-index units. Because FAIR's ``D0 = 30``
was chosen for 256x256 images, every function here takes ``cutoff_reference_size`` (default 256):
each axis' distance is rescaled by ``cutoff_reference_size / N_axis`` so the cutoff removes the
same *fraction* of the spectrum at any size (``D0 = 30`` on 256^2 acts like ``D0 = 15`` on 128^2;
on non-square images the pass band becomes an ellipse, exactly what resizing to 256^2 would give).
Pass ``cutoff_reference_size=None`` to use raw frequency-index distances.

Border handling: the discrete Fourier transform treats the image as one tile of a periodic pattern, so the
left edge meets the right edge. Unless the two match (rarely), that seam is a step edge, and a high-pass
turns it into a bright band along every border of the network's input: the restoration is worse there and
every FAIR anomaly map gets a frame whose maximum is often the image score (issue #11). :func:`highpass`
therefore filters the half-sample symmetric extension of the image (the image and its mirror copies, which
tile seamlessly: the DCT's implicit extension) and crops the result, by default (``extension="symmetric"``);
``extension="periodic"`` is the plain FFT of the paper's code (``liutongkun/FAIR``). The cutoff is the same
physical frequency either way (cycles per image side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medad.scores.color import to_grayscale

__all__ = [
    "FILTER_KINDS",
    "EXTRACTORS",
    "EXTENSIONS",
    "symmetric_extension",
    "frequency_distance",
    "butterworth_highpass_filter",
    "gaussian_highpass_filter",
    "ideal_highpass_filter",
    "highpass_transfer_function",
    "highpass",
    "to_grayscale",
    "sobel_gradients",
    "HighFrequencyInput",
]

FILTER_KINDS = ("butterworth", "gaussian", "ideal")
#: high-frequency extractors of :class:`HighFrequencyInput`: the Fourier high-pass filters and the Sobel gradients.
EXTRACTORS = (*FILTER_KINDS, "sobel")
#: how the image is extended beyond its borders by the Fourier filter (see the module docstring).
EXTENSIONS = ("symmetric", "periodic")

def frequency_distance(
    shape: Sequence[int],
    cutoff_reference_size: int | None = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Distance of every frequency sample from the centre of the fftshift-ed spectrum.

    Args:
        shape: spatial shape ``(*spatial)`` of the image (2D or 3D).
        cutoff_reference_size: if given, distances along an axis of length ``N`` are multiplied by
            ``cutoff_reference_size / N`` (see the module docstring); ``None`` keeps index units.
        device: device of the returned tensor.

    Returns:
        float32 tensor of shape ``shape``; 0 at the DC sample ``(N_0 // 2, N_1 // 2, ...)``.
    """
    squared = torch.zeros((), dtype=torch.float64, device=device)
    for axis, size in enumerate(shape):
        scale = 1.0 if cutoff_reference_size is None else cutoff_reference_size / size
        coord = (torch.arange(size, dtype=torch.float64, device=device) - size // 2) * scale
        view = [1] * len(shape)
        view[axis] = size
        squared = squared + coord.view(view) ** 2
    return squared.sqrt().float()


def butterworth_highpass_filter(
    shape: Sequence[int], cutoff: float = 30.0, order: int = 2, cutoff_reference_size: int | None = 256
) -> torch.Tensor:
    """Butterworth high-pass transfer function ``H = 1 / (1 + (D0 / D)^(2n))`` (FAIR eq. 4).

    ``H`` is defined as 0 at ``D = 0`` (the limit; FAIR's code adds ``1e-6`` to ``D`` instead).

    Returns:
        tensor of shape ``shape`` with values in ``[0, 1)``; ``H = 0.5`` where ``D = D0``.
    """
    distance = frequency_distance(shape, cutoff_reference_size)
    ratio = cutoff / distance.clamp_min(torch.finfo(distance.dtype).tiny)
    response = 1.0 / (1.0 + ratio ** (2 * order))
    return torch.where(distance > 0, response, torch.zeros_like(response))


def gaussian_highpass_filter(
    shape: Sequence[int], cutoff: float = 30.0, cutoff_reference_size: int | None = 256
) -> torch.Tensor:
    """Gaussian high-pass transfer function ``H = 1 - exp(-D^2 / (2 D0^2))`` (FAIR eq. 3).

    Returns:
        tensor of shape ``shape``; ``H = 1 - exp(-1/2)`` where ``D = D0``.
    """
    distance = frequency_distance(shape, cutoff_reference_size)
    return 1.0 - torch.exp(-(distance**2) / (2.0 * cutoff**2))


def ideal_highpass_filter(
    shape: Sequence[int], cutoff: float = 30.0, cutoff_reference_size: int | None = 256
) -> torch.Tensor:
    """Ideal high-pass transfer function: 0 for ``D <= D0``, 1 beyond (FAIR eq. 2).

    Returns:
        tensor of shape ``shape`` with values in ``{0, 1}``.
    """
    distance = frequency_distance(shape, cutoff_reference_size)
    return (distance > cutoff).float()


def highpass_transfer_function(
    shape: Sequence[int],
    kind: str = "butterworth",
    cutoff: float = 30.0,
    order: int = 2,
    cutoff_reference_size: int | None = 256,
) -> torch.Tensor:
    """The transfer function of ``kind`` (one of :data:`FILTER_KINDS`) on the centred grid of ``shape``."""
    if kind == "butterworth":
        return butterworth_highpass_filter(shape, cutoff, order, cutoff_reference_size)
    if kind == "gaussian":
        return gaussian_highpass_filter(shape, cutoff, cutoff_reference_size)
    if kind == "ideal":
        return ideal_highpass_filter(shape, cutoff, cutoff_reference_size)
    raise ValueError(f"frequency.py: unknown high-pass filter kind {kind!r}; use one of {FILTER_KINDS}.")


def symmetric_extension(image: torch.Tensor) -> torch.Tensor:
    """Half-sample symmetric extension: ``[x, flip(x)]`` along every spatial axis of ``(B, C, *spatial)``.

    The result is twice as long on every spatial axis and continuous when tiled periodically, so an FFT
    filter sees no seam at the image borders. The original image is the leading ``spatial`` corner.
    """
    for dim in range(2, image.ndim):
        image = torch.cat([image, image.flip(dim)], dim=dim)
    return image


def highpass(
    image: torch.Tensor,
    kind: str = "butterworth",
    cutoff: float = 30.0,
    order: int = 2,
    cutoff_reference_size: int | None = 256,
    extension: str = "symmetric",
) -> torch.Tensor:
    """High-pass filter every channel of a batch in the Fourier domain (FAIR eq. 5).

    Args:
        image: ``(B, C, *spatial)`` real tensor, 2D or 3D spatial.
        kind: ``"butterworth"`` (default, order ``order``), ``"gaussian"`` or ``"ideal"``.
        cutoff: ``D0`` in units of a ``cutoff_reference_size``-long axis (see module docstring).
        order: Butterworth order ``n``.
        cutoff_reference_size: image size for which ``cutoff`` is meant; ``None`` for raw units.
        extension: ``"symmetric"`` (default: filter the mirrored extension and crop, no border artefact) or
            ``"periodic"`` (plain FFT as the official FAIR code; the image borders wrap around).

    Returns:
        ``(B, C, *spatial)`` real part of the filtered image, same dtype as ``image``.
    """
    if image.ndim < 3:
        raise ValueError(f"frequency.py: highpass expects a (B, C, *spatial) tensor, got shape {tuple(image.shape)}.")
    if extension not in EXTENSIONS:
        raise ValueError(f"frequency.py: unknown Fourier-filter extension {extension!r}; use one of {EXTENSIONS}.")
    spatial = tuple(image.shape[2:])
    dims = tuple(range(2, image.ndim))
    signal = image.float()
    if extension == "symmetric":
        # Every axis doubles, so one cycle per image side is frequency index 2: a raw-index cutoff doubles, while
        # reference-size scaling (distance x reference / axis length) already accounts for the longer axis.
        signal = symmetric_extension(signal)
        if cutoff_reference_size is None:
            cutoff = 2.0 * cutoff
    transfer = highpass_transfer_function(tuple(signal.shape[2:]), kind, cutoff, order, cutoff_reference_size)
    spectrum = torch.fft.fftshift(torch.fft.fftn(signal, dim=dims), dim=dims)
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * transfer.to(image.device), dim=dims), dim=dims).real
    return filtered[(..., *(slice(0, s) for s in spatial))].to(image.dtype)


def sobel_gradients(image: torch.Tensor) -> torch.Tensor:
    """3x3 Sobel derivatives of every channel, concatenated as ``(Gx, Gy)`` (FAIR's gradient ablation).

    Matches OpenCV ``cv2.Sobel(img, CV_64F, 1, 0, ksize=3)`` / ``(0, 1)`` as used by FAIR: unnormalised
    kernels (a ramp of slope 1 along x gives ``Gx = 8``) and reflect-101 borders.

    Args:
        image: ``(B, C, H, W)``.

    Returns:
        ``(B, 2C, H, W)``: the C ``Gx`` channels (derivative along W) then the C ``Gy`` channels.
    """
    if image.ndim != 4:
        raise ValueError(f"frequency.py: sobel_gradients expects (B, C, H, W), got shape {tuple(image.shape)}.")
    channels = image.shape[1]
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype, device=image.device)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3)
    padded = F.pad(image, (1, 1, 1, 1), mode="reflect")
    grads = [F.conv2d(padded, k[None].expand(channels, 1, 3, 3), groups=channels) for k in kernels]
    return torch.cat(grads, dim=1)


class HighFrequencyInput:
    """FAIR's network input: gray image -> high-pass (paper eqs. 1-6) or Sobel gradients (eq. 12).

    One object is configured once and handed to the training step (:class:`medad.methods.FairTrainingStep`), the
    inferer (:class:`medad.inferers.FrequencyRestorationInferer`) and the network's ``in_channels``
    (:attr:`channels`), so training and inference can never disagree on the input or its border handling.

    Args:
        filter_kind: ``"butterworth"`` (FAIR), ``"gaussian"``, ``"ideal"`` (Fourier high-pass filters) or
            ``"sobel"`` (the spatial ``(Gx, Gy)`` gradients, 2D only); see :data:`EXTRACTORS`.
        cutoff: ``D0`` for a ``cutoff_reference_size``-long axis (FAIR: 30 on 256² images; see the module docstring).
        order: Butterworth order ``n`` (FAIR: 2).
        cutoff_reference_size: the image size ``cutoff`` is meant for (256 in the paper); smaller images keep the same
            relative cutoff; None: raw frequency-index units.
        extension: Fourier filter border handling, ``"symmetric"`` (default) or ``"periodic"`` (FAIR's code), see
            :func:`highpass`.
    """

    def __init__(
        self,
        filter_kind: str = "butterworth",
        cutoff: float = 30.0,
        order: int = 2,
        cutoff_reference_size: int | None = 256,
        extension: str = "symmetric",
    ) -> None:
        if filter_kind not in EXTRACTORS:
            raise ValueError(f"unknown high-frequency extractor {filter_kind!r}; use one of {EXTRACTORS}.")
        if extension not in EXTENSIONS:
            raise ValueError(f"unknown Fourier-filter extension {extension!r}; use one of {EXTENSIONS}.")
        self.filter_kind = filter_kind
        self.cutoff = float(cutoff)
        self.order = int(order)
        self.cutoff_reference_size = cutoff_reference_size
        self.extension = extension

    @property
    def channels(self) -> int:
        """Channels of the input it makes (the network's ``in_channels``): 2 for ``"sobel"`` (Gx, Gy), else 1."""
        return 2 if self.filter_kind == "sobel" else 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` images (C = 1 gray or 3 RGB, values in [0, 1]) -> ``(B, 1, *spatial)``, or
        ``(B, 2, H, W)`` for ``"sobel"``."""
        gray = to_grayscale(images.float())
        if self.filter_kind == "sobel":
            return sobel_gradients(gray)
        return highpass(gray, self.filter_kind, self.cutoff, self.order, self.cutoff_reference_size, self.extension)

    def restore(self, network: Callable[..., torch.Tensor], images: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """``network(self(images))``, optionally on a mirror-padded canvas cropped back.

        With ``margin > 0`` the images are reflect-padded by ``margin`` pixels on every side before the high-pass and
        the network, and the restoration is cropped back: the image's border pixels are then restored with context
        on both sides, away from the zero padding of the network's convolutions. Training and inference call this one
        method, so the network learns with the same canvas it is used with. ``2 * margin`` must keep the size
        divisible by the network's ``2 ** (levels - 1)``.

        Returns:
            ``(B, out_channels, *spatial)``, the spatial size of ``images``.
        """
        spatial = images.shape[2:]
        if margin > 0:
            if any(margin >= s for s in spatial):
                raise ValueError(f"the border margin {margin} must be smaller than the image size {tuple(spatial)}.")
            images = F.pad(images, (margin,) * (2 * len(spatial)), mode="reflect")
        restoration = network(self(images))
        if margin > 0:
            restoration = restoration[(..., *(slice(margin, margin + s) for s in spatial))]
        return restoration

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(filter_kind={self.filter_kind!r}, cutoff={self.cutoff}, order={self.order}, "
                f"cutoff_reference_size={self.cutoff_reference_size}, extension={self.extension!r})")

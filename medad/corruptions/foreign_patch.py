"""Foreign-patch interpolation with soft random-shape masks: DISYRE's corruption (seed 003, eq. 1).

``x_tilde = (1 - alpha * m) * x + alpha * m * x_f`` where ``x_f`` comes from another healthy sample,
``alpha`` in ``[0, 1]`` is the corruption strength (DISYRE maps it to a diffusion time step) and
``m`` in ``[0, 1]`` gives the anomaly its shape and softens the interpolation towards its edges
(Naval Marimont & Tarroni, MOOD 2022). The official code (``snavalm/disyre``,
``preprocessing/{fpi,mask_generation,bias}.py``) draws squares, spheres or lesion-shaped masks from
a folder, optionally Gaussian-blurs them, places them at a foreground voxel, and also offers an
intensity-bias corruption ``x + alpha * sign * m`` clipped to ``[0, 1]``. Here the shapes are
generated procedurally (ellipsoids, boxes and Perlin blobs, randomly oriented), so no shape folder
is needed.

The official default anomaly type is ``dag`` (``preprocessing/preprocessing.py`` ``get_ag_transforms``): the
foreign patch, then an intensity bias in the same shape with its own strength, restricted to a random subset of
the intensity classes of a 5-centroid codebook (``preprocessing/bias.py``); the trainer conditions on the larger
of the two strengths. ``bias_after_prob=1`` with ``bias_codebook=OFFICIAL_BIAS_CODEBOOK`` reproduces these two
stages; one difference remains: in ``dag`` mode the official FPI also rescales the foreign patch so that its
minimum and maximum inside the shape match the destination's (``preprocessing/fpi.py``, ``normalize_fp='minmax'``:
texture from the patch, intensity change from the bias); here the patch keeps its own intensities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from medad.corruptions._common import bernoulli, gaussian_blur, gaussian_blur_each, randint, uniform
from medad.corruptions.perlin import perlin_noise

__all__ = [
    "SHAPE_KINDS",
    "random_shape_mask",
    "foreign_patch_blend",
    "intensity_bias",
    "quantized_range_mask",
    "OFFICIAL_BIAS_CODEBOOK",
    "ForeignPatchCorruption",
]

# k-means intensity centroids of percentile-scaled T1 brains used by the official ``dag`` corruption.
OFFICIAL_BIAS_CODEBOOK = (0.00565079, 0.38283867, 0.61224216, 0.76920754, 0.9385473)

SHAPE_KINDS = ("ellipsoid", "box", "blob")


def _random_rotation(ndim: int, generator: torch.Generator | None) -> torch.Tensor:
    if ndim == 2:
        angle = float(uniform(0.0, 2 * math.pi, generator))
        return torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(ndim, ndim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix


def _centred_coordinates(shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    """Pixel coordinates relative to a jittered patch centre, in units of the patch side, randomly rotated."""
    axes = []
    for size in shape:
        centre = (size - 1) / 2 + float(uniform(-0.05, 0.05, generator)) * size
        axes.append((torch.arange(size, dtype=torch.float64) - centre) / size)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return coords @ _random_rotation(len(shape), generator).T


def random_shape_mask(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    smooth_sigma: float | tuple[float, float] = (1.0, 3.0),
    kinds: Sequence[str] = SHAPE_KINDS,
) -> torch.Tensor:
    """A soft random shape filling part of a patch, the ``m`` of DISYRE's eq. 1.

    The hard shape (a randomly oriented ellipsoid, box, or thresholded low-frequency Perlin blob;
    semi-axes 10-35 % of the patch side, so it stays inside the patch) is Gaussian-blurred with
    ``sigma`` pixels and divided by its maximum.

    Args:
        shape: spatial shape of the patch (2D or 3D), e.g. ``(64, 64)``.
        generator: torch random generator.
        smooth_sigma: blur standard deviation in pixels, or a range it is drawn from uniformly.
        kinds: shape kinds to choose from uniformly (subset of :data:`SHAPE_KINDS`).

    Returns:
        float32 tensor of shape ``shape`` with values in ``[0, 1]`` and maximum exactly 1.
    """
    hard, sigma = _random_hard_shape(shape, generator, smooth_sigma, kinds)
    return _soften(hard[None], [sigma])[0]


def _random_hard_shape(
    shape: Sequence[int],
    generator: torch.Generator | None,
    smooth_sigma: float | tuple[float, float],
    kinds: Sequence[str],
) -> tuple[torch.Tensor, float]:
    """The draws of :func:`random_shape_mask`: the hard shape (float 0/1) and the blur sigma."""
    unknown = set(kinds) - set(SHAPE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"foreign_patch.py: shape kinds must be a non-empty subset of {SHAPE_KINDS}, got {tuple(kinds)}.")
    kind = kinds[randint(0, len(kinds), generator)]
    coords = _centred_coordinates(shape, generator)
    semi_axes = uniform(0.10, 0.35, generator, (len(shape),))
    scaled = coords / semi_axes
    if kind == "box":
        hard = scaled.abs().amax(dim=-1) <= 1
    elif kind == "blob":
        res = [min(randint(2, 5, generator), s) for s in shape]
        wobble = perlin_noise(shape, res, generator).double()
        hard = (1 - (scaled**2).sum(-1)) + 0.6 * wobble > 0.3
    else:
        hard = (scaled**2).sum(-1) <= 1
    if not hard.any():  # a tiny or thin draw on a small patch: fall back to the centre pixel's neighbourhood
        hard = (coords**2).sum(-1) <= (coords**2).sum(-1).min()
    sigma = float(uniform(*smooth_sigma, generator)) if isinstance(smooth_sigma, (tuple, list)) else float(smooth_sigma)
    return hard.float(), sigma


def _soften(hard: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Blur hard shapes ``(B, *spatial)``, each with its own sigma, and scale each to a maximum of exactly 1."""
    soft = gaussian_blur_each(hard[:, None], sigmas)[:, 0].clamp_min(0)
    return soft / soft.flatten(1).amax(1).view(-1, *[1] * (soft.ndim - 1))


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` tensor against ``(B, C, *spatial)``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *[1] * (like.ndim - 1))


def foreign_patch_blend(
    x: torch.Tensor, x_foreign: torch.Tensor, mask: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """DISYRE eq. 1: ``(1 - alpha * m) * x + alpha * m * x_foreign``.

    Args:
        x: ``(B, C, *spatial)`` healthy images.
        x_foreign: ``(B, C, *spatial)`` foreign content (only read where ``mask > 0``).
        mask: ``(B, 1, *spatial)`` soft mask in ``[0, 1]``.
        alpha: scalar or ``(B,)`` interpolation factor in ``[0, 1]``.

    Returns:
        ``(B, C, *spatial)`` corrupted images.
    """
    weight = _per_sample(alpha, x) * mask
    return (1 - weight) * x + weight * x_foreign


def intensity_bias(
    x: torch.Tensor,
    mask: torch.Tensor,
    alpha: float | torch.Tensor,
    bias: float | torch.Tensor = 1.0,
    clip_range: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """DISYRE's intensity-bias corruption ``x + alpha * bias * m``, clipped to ``clip_range``.

    Args:
        x: ``(B, C, *spatial)``.
        mask: ``(B, 1, *spatial)`` soft mask in ``[0, 1]``.
        alpha: scalar or ``(B,)`` strength.
        bias: scalar or ``(B,)`` signed bias (the official code uses ``+1`` or ``-1``).
        clip_range: output range, or ``None`` for no clipping.

    Returns:
        ``(B, C, *spatial)`` corrupted images.
    """
    out = x + _per_sample(alpha, x) * _per_sample(bias, x) * mask
    return out if clip_range is None else out.clamp(*clip_range)


def quantized_range_mask(
    image: torch.Tensor, shape: torch.Tensor, codebook: Sequence[float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Where the intensity bias of the official ``dag`` corruption applies inside a shape.

    Each voxel is assigned its nearest codebook centroid; centroid k is kept with probability
    ``n_k / (n + 1000)`` (``n_k`` of the ``n`` voxels inside the shape belong to it; all are kept when none is
    drawn), and the kept classes' indicator is blurred with sigma 1 so the bias has no sharp transitions
    (``preprocessing/bias.py``).

    Args:
        image: ``(C, *spatial)`` image (channel 0 is quantised).
        shape: ``(*spatial)`` soft shape mask.
        codebook: intensity centroids.
        generator: torch random generator.

    Returns:
        ``(*spatial)`` mask in ``[0, 1]``.
    """
    draws = torch.rand(len(codebook), generator=generator, dtype=torch.float64)
    return _quantized_ranges(image[None], shape[None], codebook, draws[None])[0]


def _quantized_ranges(
    images: torch.Tensor, shapes: torch.Tensor, codebook: Sequence[float], draws: torch.Tensor
) -> torch.Tensor:
    """:func:`quantized_range_mask` of a batch, given each sample's uniform draws ``(B, K)`` for keeping a class.

    Args:
        images: ``(B, C, *spatial)``; shapes: ``(B, *spatial)``.

    Returns:
        ``(B, *spatial)`` masks in ``[0, 1]``.
    """
    centroids = torch.as_tensor(codebook, dtype=images.dtype, device=images.device)
    classes = (images[:, 0].unsqueeze(-1) - centroids).abs().argmin(dim=-1)  # (B, *spatial)
    k = len(centroids)
    inside = (shapes > 0).flatten(1)
    offsets = torch.arange(images.shape[0], device=images.device)[:, None] * k
    counts = torch.bincount((classes.flatten(1) + offsets)[inside], minlength=images.shape[0] * k)
    counts = counts.view(-1, k).to(torch.float64)
    keep = draws.to(counts.device) < counts / (counts.sum(1, keepdim=True) + 1e3)
    keep[~keep.any(1)] = True
    ranges = torch.gather(keep.to(images.dtype), 1, classes.flatten(1)).view(classes.shape)
    return gaussian_blur(ranges[:, None], 1.0)[:, 0].clamp(0.0, 1.0)


def _foreground_corner(
    foreground: torch.Tensor, patch: Sequence[int], generator: torch.Generator | None
) -> list[int]:
    """Top-left corner of a patch whose centre is a random foreground voxel and which fits in the image."""
    spatial = foreground.shape
    indices = torch.nonzero(foreground)
    if indices.numel():
        low = torch.tensor([p // 2 for p in patch])
        high = torch.tensor([s - p + p // 2 for s, p in zip(spatial, patch)])
        indices = indices[((indices >= low) & (indices <= high)).all(dim=1)]
    if indices.numel() == 0:
        return [randint(0, s - p + 1, generator) for s, p in zip(spatial, patch)]
    centre = indices[randint(0, indices.shape[0], generator)]
    return [int(c) - p // 2 for c, p in zip(centre, patch)]


class ForeignPatchCorruption:
    """DISYRE's synthetic anomaly: a soft random shape filled with a patch of another healthy sample.

    Args:
        patch_size: side of the region holding the shape (int or per-axis; DISYRE: 64 inside 128^2
            training patches); clipped to the image size.
        foreground_only: centre the shape on a foreground voxel and zero the mask on background
            (DISYRE: no anomalies in the background).
        intensity_bias_prob: probability that a sample gets the intensity-bias corruption
            ``x + alpha * (+-1) * m`` instead of the foreign patch (0 disables it).
        smooth_sigma: blur of the shape's edges in pixels (value or range, see :func:`random_shape_mask`).
        foreign_location: ``"random"`` (default, as DISYRE: the foreign patch is cut at a random
            foreground location of ``x_foreign``) or ``"same"`` (cut at the anomaly's own location).
        clip_range: value range the intensity-bias output is clipped to (``None``: no clipping).
        bias_after_prob: probability that a sample gets, after its foreign patch, an intensity bias
            ``+-alpha_b`` (``alpha_b ~ U(0, 1)``, its own draw) in the same shape: the official ``dag`` corruption
            (official: 1.0). The effective strength of such a sample is ``max(alpha, alpha_b')`` where
            ``alpha_b'`` is the largest change the clipped bias made, as the official trainer conditions on.
        bias_codebook: intensity centroids restricting that bias to some intensity classes
            (:func:`quantized_range_mask`; official: :data:`OFFICIAL_BIAS_CODEBOOK`); ``None``: the whole shape.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 64,
        foreground_only: bool = True,
        intensity_bias_prob: float = 0.0,
        smooth_sigma: float | tuple[float, float] = (1.0, 3.0),
        foreign_location: str = "random",
        clip_range: tuple[float, float] | None = (0.0, 1.0),
        bias_after_prob: float = 0.0,
        bias_codebook: Sequence[float] | None = None,
    ) -> None:
        if foreign_location not in ("random", "same"):
            raise ValueError(f"foreign_patch.py: foreign_location must be 'random' or 'same', got {foreign_location!r}.")
        self.patch_size = patch_size
        self.foreground_only = foreground_only
        self.intensity_bias_prob = intensity_bias_prob
        self.smooth_sigma = smooth_sigma
        self.foreign_location = foreign_location
        self.clip_range = clip_range
        if not 0.0 <= float(bias_after_prob) <= 1.0:
            raise ValueError(f"foreign_patch.py: bias_after_prob must lie in [0, 1], got {bias_after_prob}.")
        self.bias_after_prob = float(bias_after_prob)
        self.bias_codebook = None if bias_codebook is None else tuple(float(c) for c in bias_codebook)

    def __call__(
        self,
        x: torch.Tensor,
        x_foreign: torch.Tensor,
        alpha: float | torch.Tensor,
        foreground: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_alpha: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Corrupt a batch.

        Args:
            x: ``(B, C, *spatial)`` healthy images (2D or 3D).
            x_foreign: ``(B, C, *spatial)`` other healthy images (e.g. ``x.roll(1, 0)``).
            alpha: scalar or ``(B,)`` interpolation factors in ``[0, 1]``.
            foreground: optional ``(B, 1, *spatial)`` foreground masks; if ``None`` and
                ``foreground_only``, the foreground is where any channel of ``x`` is non-zero.
            generator: torch random generator.
            return_alpha: also return the ``(B,)`` effective strengths (``alpha``, or the larger of ``alpha`` and
                the after-patch bias's strength, see ``bias_after_prob``).

        Returns:
            ``(x_tilde (B, C, *spatial), mask (B, 1, *spatial))`` where ``mask`` is the soft shape
            ``m`` (not multiplied by ``alpha``), zero outside the foreground when ``foreground_only``;
            with ``return_alpha``, the ``(B,)`` effective strengths as a third element.
        """
        if x.shape != x_foreign.shape:
            raise ValueError(f"foreign_patch.py: x {tuple(x.shape)} and x_foreign {tuple(x_foreign.shape)} differ in shape.")
        spatial = tuple(x.shape[2:])
        patch = self._patch_shape(spatial)
        batch = x.shape[0]
        alphas = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).expand(batch)
        mask = torch.zeros((batch, 1, *spatial), dtype=x.dtype, device=x.device)
        foreign_full = x.clone()
        use_bias = torch.zeros(batch, dtype=torch.bool)
        bias_sign = torch.ones(batch, dtype=x.dtype, device=x.device)
        hard_shapes, sigmas, placements = [], [], []
        for b in range(batch):
            fg = self._foreground(x[b], None if foreground is None else foreground[b])
            corner = _foreground_corner(fg, patch, generator)
            region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            hard, sigma = _random_hard_shape(patch, generator, self.smooth_sigma, SHAPE_KINDS)
            hard_shapes.append(hard)
            sigmas.append(sigma)
            placements.append((region, fg))
            if self.intensity_bias_prob > 0 and bernoulli(self.intensity_bias_prob, generator):
                use_bias[b] = True
                bias_sign[b] = 1.0 if bernoulli(0.5, generator) else -1.0
                continue
            if self.foreign_location == "same":
                source = region
            else:
                source_fg = self._foreground(x_foreign[b], None)
                src_corner = _foreground_corner(source_fg, patch, generator)
                source = tuple(slice(c, c + p) for c, p in zip(src_corner, patch))
            foreign_full[(b, slice(None), *region)] = x_foreign[(b, slice(None), *source)]
        # the shapes are blurred together (no draw in between): one grouped convolution instead of one per sample
        shapes = _soften(torch.stack(hard_shapes), sigmas).to(x.device, x.dtype)
        for b, (region, fg) in enumerate(placements):
            mask[(b, 0, *region)] = shapes[b]
            if self.foreground_only:
                mask[b, 0] = mask[b, 0] * fg.to(x.device, x.dtype)
        x_tilde = foreign_patch_blend(x, foreign_full, mask, alphas)
        if use_bias.any():
            biased = intensity_bias(x, mask, alphas, bias_sign, self.clip_range)
            x_tilde = torch.where(use_bias.to(x.device).view(-1, *[1] * (x.ndim - 1)), biased, x_tilde)
        effective = alphas.clone()
        if self.bias_after_prob > 0:
            x_tilde, effective = self._bias_after_patch(x_tilde, mask, use_bias, effective, generator)
        return (x_tilde, mask, effective) if return_alpha else (x_tilde, mask)

    def _bias_after_patch(
        self,
        x_tilde: torch.Tensor,
        mask: torch.Tensor,
        skip: torch.Tensor,
        effective: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``dag`` second stage: an intensity bias with its own strength in each sample's shape.

        The draws are made sample by sample (as one loop would), the biases are then applied to all at once."""
        rows, strengths, signs, class_draws = [], [], [], []
        for b in range(x_tilde.shape[0]):
            if bool(skip[b]) or not bernoulli(self.bias_after_prob, generator) or not bool((mask[b] > 0).any()):
                continue
            rows.append(b)
            strengths.append(float(uniform(0.0, 1.0, generator)))
            signs.append(1.0 if bernoulli(0.5, generator) else -1.0)
            if self.bias_codebook is not None:
                class_draws.append(torch.rand(len(self.bias_codebook), generator=generator, dtype=torch.float64))
        if not rows:
            return x_tilde, effective
        index = torch.tensor(rows, device=x_tilde.device)
        before = x_tilde[index]
        shapes = mask[index, 0]
        if self.bias_codebook is not None:
            shapes = shapes * _quantized_ranges(before, shapes, self.bias_codebook, torch.stack(class_draws))
        biased = intensity_bias(before, shapes[:, None], torch.tensor(strengths), torch.tensor(signs), self.clip_range)
        change = (biased - before).abs().flatten(1).amax(1).to(effective.dtype)
        x_tilde = x_tilde.clone()
        x_tilde[index] = biased
        effective = effective.clone()
        effective[index] = torch.maximum(effective[index], change)
        return x_tilde, effective

    def _patch_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        sizes = [self.patch_size] * len(spatial) if isinstance(self.patch_size, int) else list(self.patch_size)
        if len(sizes) != len(spatial):
            raise ValueError(f"foreign_patch.py: patch_size {self.patch_size} does not match the image's {len(spatial)}D shape.")
        return tuple(min(int(p), s) for p, s in zip(sizes, spatial))

    def _foreground(self, image: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        if given is not None:
            return (given[0] > 0).cpu()
        if self.foreground_only:
            return (image != 0).any(dim=0).cpu()
        return torch.ones(image.shape[1:], dtype=torch.bool)

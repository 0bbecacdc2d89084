"""Perlin-noise masks filled with a texture: DRAEM's synthetic anomalies as used by FAIR (seed 002).

DRAEM (Zavrtanik et al., ICCV 2021, ``perlin.py``/``data_loader.py``) thresholds a 2D gradient
Perlin noise whose lattice resolution is ``2^k`` per axis (``k`` uniform in ``[0, 6)``), rotated by
an angle in ``[-90, 90]`` degrees, at 0.5, and fills the mask with an augmented DTD texture ``T``::

    x' = (1 - m) * x + m * ((1 - beta) * T + beta * x),   beta ~ U[0, 0.8)

FAIR uses the same recipe, and its "no extra data" variant takes the texture from the training
images themselves; here that variant is a randomly shifted / flipped / rotated copy of the image
being corrupted (``texture_source=None``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from medad.corruptions._common import bernoulli, randint, rotate_2d, uniform

__all__ = [
    "IMAGE_EXTENSIONS",
    "perlin_fade",
    "perlin_noise",
    "perlin_noise_2d",
    "perlin_mask",
    "PerlinTextureCorruption",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def perlin_fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade curve ``6t^5 - 15t^4 + 10t^3``."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def _random_gradients(res: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    lattice = tuple(r + 1 for r in res)
    if len(res) == 2:
        # DRAEM draws one uniform angle per lattice node.
        angles = 2 * math.pi * torch.rand(lattice, generator=generator, dtype=torch.float64)
        return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    gradients = torch.randn((*lattice, len(res)), generator=generator, dtype=torch.float64)
    return gradients / gradients.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def perlin_noise(
    shape: Sequence[int],
    res: Sequence[int],
    generator: torch.Generator | None = None,
    fade: Callable[[torch.Tensor], torch.Tensor] = perlin_fade,
) -> torch.Tensor:
    """Classic gradient Perlin noise on an n-D grid (n = 2 or 3).

    Pixel ``i`` along an axis of length ``s`` with ``r`` lattice cells sits at lattice coordinate
    ``i * r / s`` (DRAEM's ``rand_perlin_2d_np`` when ``s`` is divisible by ``r``; other sizes are
    allowed here). The result is scaled by ``2 / sqrt(n)`` so it lies in ``[-1, 1]`` (DRAEM's
    ``sqrt(2)`` in 2D).

    Args:
        shape: spatial shape of the output.
        res: number of lattice cells per axis, ``1 <= res[i] <= shape[i]``.
        generator: torch random generator (for reproducible draws).
        fade: interpolation curve.

    Returns:
        float32 tensor of shape ``shape``.
    """
    if len(shape) != len(res):
        raise ValueError(f"perlin.py: shape {tuple(shape)} and res {tuple(res)} have different lengths.")
    if any(r < 1 or r > s for r, s in zip(res, shape)):
        raise ValueError(f"perlin.py: res {tuple(res)} must be between 1 and the shape {tuple(shape)} per axis.")
    ndim = len(shape)
    gradients = _random_gradients(res, generator)
    cells, fracs = [], []
    for size, r in zip(shape, res):
        u = torch.arange(size, dtype=torch.float64) * (r / size)
        cell = u.floor().long()
        cells.append(cell)
        fracs.append(u - cell)
    frac_grid = torch.stack(torch.meshgrid(*fracs, indexing="ij"), dim=-1)  # (*shape, n)
    weights = fade(frac_grid)
    noise = torch.zeros(tuple(shape), dtype=torch.float64)
    for corner in itertools.product((0, 1), repeat=ndim):
        index = torch.meshgrid(*[c + o for c, o in zip(cells, corner)], indexing="ij")
        offset = frac_grid - torch.tensor(corner, dtype=torch.float64)
        dot = (gradients[index] * offset).sum(-1)
        weight = torch.ones_like(dot)
        for axis, o in enumerate(corner):
            weight = weight * (weights[..., axis] if o else 1 - weights[..., axis])
        noise = noise + weight * dot
    return (noise * (2.0 / math.sqrt(ndim))).float()


def perlin_noise_2d(
    shape: Sequence[int], res: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """2D gradient Perlin noise ``(H, W)`` in ``[-1, 1]``, DRAEM's ``rand_perlin_2d_np`` in torch."""
    if len(shape) != 2:
        raise ValueError(f"perlin.py: perlin_noise_2d needs a 2D shape, got {tuple(shape)}.")
    return perlin_noise(shape, res, generator)


def perlin_mask(
    shape: Sequence[int],
    scale_range: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
    rotate: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DRAEM's Perlin mask: noise with ``2^k`` cells per axis (``k`` uniform in ``[lo, hi)``), thresholded.

    Args:
        shape: spatial shape (2D or 3D).
        scale_range: exponent range ``[lo, hi)`` of the lattice resolution (DRAEM: ``(0, 6)``).
        threshold: noise level above which the mask is 1 (DRAEM: 0.5).
        rotate: 2D only: rotate the noise by an angle in ``[-90, 90]`` degrees before thresholding,
            filling uncovered corners with 0 (DRAEM's ``iaa.Affine(rotate=(-90, 90))``).
        generator: torch random generator.

    Returns:
        float32 tensor of shape ``shape`` with values in ``{0, 1}``; it may be empty.
    """
    res = [min(2 ** randint(scale_range[0], scale_range[1], generator), size) for size in shape]
    noise = perlin_noise(shape, res, generator)
    if rotate and len(shape) == 2:
        angle = uniform(-math.pi / 2, math.pi / 2, generator, (1,))
        noise = rotate_2d(noise[None, None], angle)[0, 0]
    return (noise > threshold).float()


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"perlin.py: texture folder {folder} does not exist or is not a folder.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"perlin.py: texture folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


class PerlinTextureCorruption:
    """DRAEM/FAIR synthetic anomaly: a Perlin-noise mask filled with a blended texture.

    ``x' = (1 - m) x + m ((1 - beta) T + beta x)`` with ``beta ~ U[beta_range)`` per sample. Images are
    expected in ``[0, 1]`` (the texture augmentations clip to that range).

    Args:
        texture_source: a folder of texture images (DTD-style, searched recursively; loaded with PIL,
            randomly cropped to 50-100 % of each side and resized to the image size; 2D only), or
            ``None`` for FAIR's "no extra data" variant: the texture is a copy of the image itself,
            randomly rolled, flipped and (square 2D images) rotated by a multiple of 90 degrees.
        beta_range: range of the blend factor ``beta`` (DRAEM: ``[0, 0.8)``).
        p_clean: probability that a sample is left unchanged with an empty mask (FAIR: 0.5).
        scale_range: Perlin lattice exponent range (see :func:`perlin_mask`).
        threshold: Perlin threshold (0.5).
        rotate_mask: rotate 2D Perlin noise by ``[-90, 90]`` degrees (DRAEM).
        augment_texture: apply 3 random photometric/geometric augmentations to the texture, a subset
            of DRAEM's imgaug list (gamma, brightness, solarize, posterize, invert, autocontrast,
            rotation by ``[-45, 45]`` degrees); imgaug's sharpness, hue and equalize are not reproduced.
        max_mask_tries: an empty Perlin mask is redrawn up to this many times. DRAEM keeps empty masks
            (and labels the sample normal); redrawing makes ``p_clean`` the real fraction of clean samples.
    """

    def __init__(
        self,
        texture_source: str | Path | None = None,
        beta_range: tuple[float, float] = (0.0, 0.8),
        p_clean: float = 0.5,
        scale_range: tuple[int, int] = (0, 6),
        threshold: float = 0.5,
        rotate_mask: bool = True,
        augment_texture: bool = True,
        max_mask_tries: int = 10,
    ) -> None:
        self.texture_files = None if texture_source is None else _list_images(Path(texture_source))
        self.beta_range = beta_range
        self.p_clean = p_clean
        self.scale_range = scale_range
        self.threshold = threshold
        self.rotate_mask = rotate_mask
        self.augment_texture = augment_texture
        self.max_mask_tries = max(1, int(max_mask_tries))

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a batch.

        Args:
            image: ``(B, C, *spatial)`` in ``[0, 1]`` (2D, or 3D with ``texture_source=None``).
            generator: torch random generator.

        Returns:
            ``(corrupted (B, C, *spatial), mask (B, 1, *spatial))``, mask values in ``{0, 1}``.
        """
        if image.ndim not in (4, 5):
            raise ValueError(f"perlin.py: expected a (B, C, H, W) or (B, C, D, H, W) batch, got {tuple(image.shape)}.")
        if self.texture_files is not None and image.ndim != 4:
            raise ValueError("perlin.py: a texture folder can only corrupt 2D images; use texture_source=None for 3D.")
        corrupted = image.clone()
        mask = torch.zeros((image.shape[0], 1, *image.shape[2:]), dtype=image.dtype, device=image.device)
        for b in range(image.shape[0]):
            if bernoulli(self.p_clean, generator):
                continue
            m = self._draw_mask(tuple(image.shape[2:]), generator)
            if m.sum() == 0:
                continue
            texture = self.texture(image[b], generator)
            beta = float(uniform(*self.beta_range, generator))
            m = m.to(image.device, image.dtype)
            blended = (1 - beta) * texture + beta * image[b]
            corrupted[b] = (1 - m) * image[b] + m * blended
            mask[b, 0] = m
        return corrupted, mask

    def _draw_mask(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        m = torch.zeros(shape)
        for _ in range(self.max_mask_tries):
            m = perlin_mask(shape, self.scale_range, self.threshold, self.rotate_mask, generator)
            if m.sum() > 0:
                break
        return m

    def texture(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A texture for one sample ``image (C, *spatial)``, same shape, dtype and device."""
        if self.texture_files is None:
            texture = self._own_texture(image, generator)
        else:
            texture = self._folder_texture(image, generator)
        if self.augment_texture:
            texture = _augment(texture, generator)
        return texture.to(image.device, image.dtype)

    def _folder_texture(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        from PIL import Image

        path = self.texture_files[randint(0, len(self.texture_files), generator)]
        channels, height, width = image.shape
        with Image.open(path) as pil:
            pil = pil.convert("RGB" if channels == 3 else "L")
            crop_w = max(1, round(pil.width * float(uniform(0.5, 1.0, generator))))
            crop_h = max(1, round(pil.height * float(uniform(0.5, 1.0, generator))))
            left = randint(0, pil.width - crop_w + 1, generator)
            top = randint(0, pil.height - crop_h + 1, generator)
            pil = pil.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
            array = np.asarray(pil, dtype=np.float32) / 255.0
        texture = torch.from_numpy(array.copy())
        texture = texture.permute(2, 0, 1) if texture.ndim == 3 else texture[None]
        if texture.shape[0] != channels:  # e.g. a 2-channel image: repeat the gray texture
            texture = texture[:1].expand(channels, height, width)
        return texture

    @staticmethod
    def _own_texture(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        texture = image.detach().cpu().float()
        spatial = texture.shape[1:]
        shifts = [randint(0, s, generator) for s in spatial]
        texture = torch.roll(texture, shifts=shifts, dims=tuple(range(1, texture.ndim)))
        for dim in range(1, texture.ndim):
            if bernoulli(0.5, generator):
                texture = texture.flip(dim)
        if spatial[-1] == spatial[-2]:
            texture = torch.rot90(texture, k=randint(0, 4, generator), dims=(-2, -1))
        return texture


# --- texture augmentations (DRAEM picks 3 of its imgaug augmenters per texture) ---------------------


def _aug_gamma(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    gamma = uniform(0.5, 2.0, g, (t.shape[0],)).float().view(-1, *[1] * (t.ndim - 1))
    return t.clamp(0, 1) ** gamma


def _aug_brightness(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return (t * float(uniform(0.8, 1.2, g)) + float(uniform(-30 / 255, 30 / 255, g))).clamp(0, 1)


def _aug_solarize(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    level = float(uniform(32 / 255, 128 / 255, g))
    return torch.where(t >= level, 1 - t, t)


def _aug_posterize(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    levels = 2 ** randint(1, 8, g)
    return torch.floor(t.clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1)


def _aug_invert(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return 1 - t


def _aug_autocontrast(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *[1] * (t.ndim - 1))
    high = flat.max(dim=1).values.view(-1, *[1] * (t.ndim - 1))
    return (t - low) / (high - low).clamp_min(1e-6)


def _aug_rotate(t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    if t.ndim != 3:
        return t
    return rotate_2d(t[None], uniform(-math.pi / 4, math.pi / 4, g, (1,)))[0]


_AUGMENTERS = (_aug_gamma, _aug_brightness, _aug_solarize, _aug_posterize, _aug_invert, _aug_autocontrast, _aug_rotate)


def _augment(texture: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    chosen = torch.randperm(len(_AUGMENTERS), generator=generator)[:3].tolist()
    for index in chosen:
        texture = _AUGMENTERS[index](texture, generator)
    return texture


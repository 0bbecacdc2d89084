"""FAIR's large CutPaste (seed 002, Sec. 3.1; official ``CutpasteAugment.py``).

A patch whose sides are 80-90 % of the image's is cut from the image, rotated, and pasted back at a
random location, so more than half of the image content is corrupted with texture that is
homologous to the training set (it forces the restoration network to use global context).

Deviations from the official code, for correctness: the official patch is rotated about its top-left
corner by an integer number of radians (``random.randrange(-6, 6)``) with ``cv2.warpAffine``, which
moves most of it out of its frame and pastes black pixels with mask 1; here the patch is rotated
about its centre by a uniform angle and the mask is exactly the rotated patch's footprint (pixels
outside it keep their original values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medad.corruptions._common import bernoulli, randint, uniform

__all__ = ["LargeCutPaste", "cut_paste"]


def cut_paste(
    image: torch.Tensor,
    source: tuple[int, int],
    destination: tuple[int, int],
    patch_size: tuple[int, int],
    angle: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a rectangle of one image, rotate it about its centre and paste it elsewhere.

    Args:
        image: ``(C, H, W)``.
        source: top-left ``(row, col)`` of the patch in ``image``.
        destination: top-left ``(row, col)`` where the (unrotated) patch would be pasted.
        patch_size: ``(height, width)`` of the patch.
        angle: rotation in radians, counter-clockwise as displayed (``pi / 2`` is ``torch.rot90(patch, 1)``).

    Returns:
        ``(pasted (C, H, W), mask (1, H, W))``: mask is 1 on the rotated patch's footprint.
    """
    channels, height, width = image.shape
    ph, pw = patch_size
    rows = torch.arange(height, dtype=torch.float64, device=image.device) + 0.5
    cols = torch.arange(width, dtype=torch.float64, device=image.device) + 0.5
    rel_y = (rows - (destination[0] + ph / 2)).view(-1, 1)
    rel_x = (cols - (destination[1] + pw / 2)).view(1, -1)
    # Inverse rotation: where in the unrotated patch each destination pixel comes from.
    cos, sin = math.cos(angle), math.sin(angle)
    src_x = cos * rel_x - sin * rel_y
    src_y = sin * rel_x + cos * rel_y
    inside = (src_y.abs() < ph / 2) & (src_x.abs() < pw / 2)
    coord_y = src_y + source[0] + ph / 2
    coord_x = src_x + source[1] + pw / 2
    grid = torch.stack((2 * coord_x / width - 1, 2 * coord_y / height - 1), dim=-1)[None].float()
    sampled = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    mask = inside[None].to(image.dtype)
    pasted = torch.where(inside[None], sampled.to(image.dtype), image)
    return pasted, mask


class LargeCutPaste:
    """FAIR's large CutPaste corruption on a batch of 2D images.

    Args:
        patch_fraction: range of each patch side as a fraction of the image side, drawn per axis
            (FAIR: ``[0.8, 0.9)``).
        rotate: rotate the patch by a uniform angle in ``[0, 360)`` degrees about its centre.
        p_clean: probability that a sample is left unchanged with an empty mask (FAIR: 0.5).
    """

    def __init__(
        self, patch_fraction: tuple[float, float] = (0.8, 0.9), rotate: bool = True, p_clean: float = 0.5
    ) -> None:
        if not 0 < patch_fraction[0] <= patch_fraction[1] <= 1:
            raise ValueError(f"cutpaste.py: patch_fraction {patch_fraction} must satisfy 0 < low <= high <= 1.")
        self.patch_fraction = patch_fraction
        self.rotate = rotate
        self.p_clean = p_clean

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a batch.

        Args:
            image: ``(B, C, H, W)``.
            generator: torch random generator.

        Returns:
            ``(corrupted (B, C, H, W), mask (B, 1, H, W))``, mask values in ``{0, 1}``.
        """
        if image.ndim != 4:
            raise ValueError(f"cutpaste.py: LargeCutPaste expects a (B, C, H, W) batch, got {tuple(image.shape)}.")
        corrupted = image.clone()
        mask = torch.zeros((image.shape[0], 1, *image.shape[2:]), dtype=image.dtype, device=image.device)
        height, width = image.shape[2:]
        for b in range(image.shape[0]):
            if bernoulli(self.p_clean, generator):
                continue
            ph = self._side(height, generator)
            pw = self._side(width, generator)
            source = (randint(0, height - ph + 1, generator), randint(0, width - pw + 1, generator))
            destination = (randint(0, height - ph + 1, generator), randint(0, width - pw + 1, generator))
            angle = float(uniform(0.0, 2 * math.pi, generator)) if self.rotate else 0.0
            corrupted[b], mask[b] = cut_paste(image[b], source, destination, (ph, pw), angle)
        return corrupted, mask

    def _side(self, size: int, generator: torch.Generator | None) -> int:
        side = round(size * float(uniform(*self.patch_fraction, generator)))
        return min(max(side, 1), size)

"""Spherical lesions of constant intensity: the synthetic test anomalies of the MRI benchmark.

A sphere of radius r (voxels) is set to one intensity inside the brain, the way simulated lesion benchmarks
insert hypo-/hyperintense blobs into healthy scans. Used to build held-out test sets from healthy volumes
(``scripts/make_lesion_testset.py``), never in training, so no method has seen them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medad.corruptions._common import uniform

__all__ = ["insert_spheres", "SPHERE_INTENSITY"]

#: default intensities on images scaled to [0, 1] (percentile scaling inside the brain): "dark" is CSF-like,
#: "bright" is above white matter.
SPHERE_INTENSITY = {"dark": 0.1, "bright": 1.0}


def insert_spheres(
    image: torch.Tensor,
    brain_mask: torch.Tensor,
    count: int = 3,
    radius_range: Sequence[float] = (4.0, 6.0),
    kind: str = "dark",
    intensity: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert ``count`` spheres fully inside the brain.

    Args:
        image: ``(C, *spatial)`` healthy image (2D or 3D), values in [0, 1].
        brain_mask: ``(1, *spatial)`` or ``(*spatial)`` brain mask; sphere centres are drawn where a ball of the
            largest radius fits inside it, and the lesion mask is cut to it.
        count: number of spheres (they may overlap).
        radius_range: radius in voxels, uniform in this range.
        kind: ``"dark"`` or ``"bright"`` (selects the default intensity).
        intensity: value of the lesion voxels (default ``SPHERE_INTENSITY[kind]``).
        generator: torch random generator.

    Returns:
        ``(lesioned image (C, *spatial), lesion mask (1, *spatial) float 0/1)``; the input is not modified.
    """
    if kind not in SPHERE_INTENSITY:
        raise ValueError(f"kind must be one of {tuple(SPHERE_INTENSITY)}, got {kind!r}.")
    value = SPHERE_INTENSITY[kind] if intensity is None else float(intensity)
    brain = (brain_mask.reshape(image.shape[1:]) > 0).to(torch.float32)
    spatial = brain.shape
    r_max = float(radius_range[1])
    k = 2 * int(r_max) + 1
    pool = torch.nn.functional.max_pool3d if brain.ndim == 3 else torch.nn.functional.max_pool2d
    # centres where the whole ball of the largest radius lies inside the brain (erosion by a cube, conservative)
    inside = pool((1 - brain)[None, None], k, 1, k // 2)[0, 0] < 0.5
    centres = inside.nonzero()
    if len(centres) == 0:
        raise ValueError(f"the brain mask has no room for a sphere of radius {r_max} voxels.")
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij")
    lesion = torch.zeros(spatial, dtype=torch.bool)
    for _ in range(int(count)):
        centre = centres[int(torch.randint(len(centres), (1,), generator=generator))].to(torch.float32)
        radius = float(uniform(radius_range[0], radius_range[1], generator))
        dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        lesion |= dist2 <= radius**2
    lesion &= brain > 0
    out = image.clone()
    out[:, lesion] = value
    return out, lesion[None].to(torch.float32)

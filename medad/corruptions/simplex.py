"""Vectorised simplex noise, the spatially correlated noise of AnoDDPM (Wyatt et al., 2022) used by ADDM.

AnoDDPM replaces the Gaussian noise of ``q(x_t | x_0)`` with fractal simplex noise: 6 octaves,
persistence 0.8, starting frequency 64, where octave ``o`` samples the noise at pixel coordinates
divided by ``64 / 2^o`` with amplitude ``0.8^o``; for 2D images it takes a 2D slice of 3D noise
(their comment: 2D simplex noise showed directional artefacts). This module implements Stefan
Gustavson's classic 2D/3D simplex noise, vectorised over all pixels in torch (not OpenSimplex,
which AnoDDPM's ``simplex.py`` ports), with a random permutation table per draw.

Deviations from AnoDDPM's code, on purpose: every sample and channel gets its own noise field
(AnoDDPM broadcasts one field over the batch), and :func:`simplex_noise` standardises each sample
to zero mean and unit variance so it can stand in for ``torch.randn`` in ``q_sample`` (AnoDDPM
uses the raw fractal sum, whose variance depends on the octave settings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["simplex_noise_2d", "simplex_noise_3d", "random_permutation", "fractal_simplex_noise", "simplex_noise"]

_GRAD3 = torch.tensor(
    [[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
     [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
    dtype=torch.float64,
)  # fmt: skip

# Output scales that bring each noise to about [-1, 1] with falloff radius^2 = 0.5 (measured maxima ~1/70, ~1/76.9).
_SCALE = {2: 70.0, 3: 76.883}


def random_permutation(generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of 0..255 repeated twice (length 512), the hash table of simplex noise."""
    perm = torch.randperm(256, generator=generator)
    return torch.cat([perm, perm])


def _simplex(points: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Simplex noise at ``points (..., n)``, n = 2 or 3 (Gustavson, "Simplex noise demystified")."""
    ndim = points.shape[-1]
    coords = points.unbind(-1)
    skew = (math.sqrt(ndim + 1) - 1) / ndim
    unskew = (1 - 1 / math.sqrt(ndim + 1)) / ndim
    skewed = sum(coords) * skew
    cells = [torch.floor(c + skewed) for c in coords]
    unskewed = sum(cells) * unskew
    offsets0 = [c - (k - unskewed) for c, k in zip(coords, cells)]
    # Rank of each axis by its offset (ties go to the lower axis); the simplex is traversed by
    # stepping along axes from the highest rank to the lowest.
    ranks = []
    for a in range(ndim):
        rank = torch.zeros_like(offsets0[a], dtype=torch.long)
        for b in range(ndim):
            if a != b:
                rank += (offsets0[a] >= offsets0[b]) if a < b else (offsets0[a] > offsets0[b])
        ranks.append(rank)
    cell_index = [k.long() & 255 for k in cells]
    perm = perm.to(points.device)
    # 3D: the 12 cube-edge directions; 2D: the first 8 rows of _GRAD3 restricted to (x, y), as Gustavson. The
    # gradient of hash h is looked up through one table per axis indexed by the last hashing step's index, so the
    # modulo runs on 512 table entries instead of on every point. This loop is most of ADDM's corruption time:
    # 1-D ``take`` instead of advanced indexing and in-place arithmetic make it ~2x faster (same values to 4e-7).
    table = _GRAD3.to(points.device, points.dtype)[perm % (12 if ndim == 3 else 8), :ndim]  # (512, ndim)
    gradients = [table[:, axis].contiguous() for axis in range(ndim)]
    total = torch.zeros_like(coords[0])
    for corner in range(ndim + 1):
        steps = [r >= ndim - corner for r in ranks]
        offsets = [torch.sub(o, s.to(o.dtype)).add_(corner * unskew) for o, s in zip(offsets0, steps)]
        hashed = cell_index[ndim - 1] + steps[ndim - 1]
        for axis in reversed(range(ndim - 1)):
            hashed = perm.take(hashed).add_(cell_index[axis]).add_(steps[axis])
        dot = gradients[0].take(hashed).mul_(offsets[0])  # gradient of perm[hashed] · offset
        radius = offsets[0] * offsets[0]
        for gradient, offset in zip(gradients[1:], offsets[1:]):
            dot.addcmul_(gradient.take(hashed), offset)
            radius.addcmul_(offset, offset)
        # falloff radius^2 0.5 keeps the noise continuous (Gustavson's 0.6 leaves small seams in 3D)
        falloff = radius.neg_().add_(0.5).clamp_min_(0).square_()
        total.addcmul_(falloff.square_(), dot)
    return total * _SCALE[ndim]


def simplex_noise_2d(points: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """2D simplex noise at ``points (..., 2)``; returns ``(...)``, roughly within ``[-1, 1]``."""
    if points.shape[-1] != 2:
        raise ValueError(f"simplex.py: simplex_noise_2d needs points of shape (..., 2), got {tuple(points.shape)}.")
    return _simplex(points.float(), perm)


def simplex_noise_3d(points: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """3D simplex noise at ``points (..., 3)``; returns ``(...)``, roughly within ``[-1, 1]``."""
    if points.shape[-1] != 3:
        raise ValueError(f"simplex.py: simplex_noise_3d needs points of shape (..., 3), got {tuple(points.shape)}.")
    return _simplex(points.float(), perm)


def fractal_simplex_noise(
    points: torch.Tensor,
    perm: torch.Tensor,
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    offset: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """AnoDDPM's octave sum ``sum_o persistence^o * simplex(points / (frequency / 2^o) + offset)``.

    Args:
        points: ``(..., n)`` pixel coordinates, n = 2 or 3.
        perm: permutation table from :func:`random_permutation`.
        octaves: number of octaves (AnoDDPM: 6).
        persistence: amplitude ratio between octaves (AnoDDPM: 0.8).
        frequency: the first octave's period in pixels (AnoDDPM: 64; halved at every octave).
        offset: translation in lattice units broadcastable to ``points`` (selects an independent field).

    Returns:
        ``(...)`` float32 noise (not normalised).
    """
    noise = torch.zeros(points.shape[:-1], dtype=torch.float32, device=points.device)
    amplitude = 1.0
    for _ in range(octaves):
        noise = noise + amplitude * _simplex((points / frequency + offset).float(), perm)
        frequency /= 2
        amplitude *= persistence
    return noise


def simplex_noise(
    shape: Sequence[int],
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 64.0,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fractal simplex noise for a batch, a drop-in for ``torch.randn(shape)`` in ``q_sample``.

    2D images get a random 2D slice of 3D noise (as AnoDDPM); 3D volumes get 3D noise. Each sample
    and channel is an independent field (a random translation of one random permutation table).

    Args:
        shape: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        octaves: number of octaves (AnoDDPM: 6).
        persistence: amplitude ratio between octaves (AnoDDPM: 0.8).
        frequency: the first octave's period in pixels (AnoDDPM: 64).
        generator: torch random generator (CPU).
        normalize: standardise every sample (over channels and space) to zero mean, unit variance.
        device: device of the result (the noise is computed there).
        dtype: dtype of the result.

    Returns:
        tensor of shape ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"simplex.py: simplex_noise needs a (B, C, H, W) or (B, C, D, H, W) shape, got {shape}.")
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    perm = random_permutation(generator)
    # Offsets in [0, 256) lattice units (the hash period) make each (sample, channel) field independent;
    # for 2D images the third offset is the depth of the 2D slice through 3D noise.
    offsets = torch.rand((batch, channels, 3), generator=generator) * 256.0
    axes = [torch.arange(s, dtype=torch.float32) for s in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*spatial, n)
    if len(spatial) == 2:
        grid = torch.cat([grid, torch.zeros((*spatial, 1))], dim=-1)
    points = grid.to(device)[None, None].expand(batch, channels, *spatial, 3)
    offsets = offsets.to(device).view(batch, channels, *[1] * len(spatial), 3)
    noise = fractal_simplex_noise(points, perm, octaves, persistence, frequency, offsets)
    if normalize:
        flat = noise.reshape(batch, -1)
        flat = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-12)
        noise = flat.reshape(shape)
    return noise.to(dtype)

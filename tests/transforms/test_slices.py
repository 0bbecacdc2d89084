"""RandBrainSlicesd: training slices are drawn through the brain as ``RandCropByPosNegLabeld`` did, patched and padded."""

from __future__ import annotations

import numpy as np
import torch

from medad.transforms.slices import RandBrainSlicesd


def test_brain_slices_are_drawn_through_the_brain_patched_and_padded():
    volume = torch.arange(6, dtype=torch.float32).reshape(1, 1, 1, 6).expand(1, 9, 7, 6).clone()
    brain = torch.zeros(1, 9, 7, 6)
    brain[..., 2] = 1
    brain[0, :3, :3, 4] = 1  # slice 4 holds 9 brain voxels, slice 2 holds 63
    sampler = RandBrainSlicesd(["image", "brain_mask"], "brain_mask", num_samples=400, patch_size=(5, 8),
                               size_divisor=4)
    sampler.set_random_state(0)
    samples = sampler({"image": volume, "brain_mask": brain, "case_id": "x", "mask": brain})
    assert len(samples) == 400 and set(samples[0]) == {"image", "brain_mask"}
    assert all(s["image"].shape == (1, 8, 8) for s in samples)  # 9x7 -> pad 7 to 8 -> crop 5x8 -> pad to 8x8
    drawn = np.array([int(s["image"].max()) for s in samples])
    assert set(drawn) == {2, 4} and 0.8 < (drawn == 2).mean() < 0.95  # 63 / 72 = 0.875
    again = RandBrainSlicesd(["image", "brain_mask"], "brain_mask", num_samples=400, patch_size=(5, 8), size_divisor=4)
    again.set_random_state(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, again({"image": volume, "brain_mask": brain})))

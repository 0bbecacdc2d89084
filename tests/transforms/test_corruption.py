"""The MONAI dictionary wrappers of the corruptions (medad.transforms.corruption)."""

from __future__ import annotations

import pytest
import torch

from medad.transforms.corruption import (
    RandFairCorruptiond,
    RandLargeCutPasted,
    RandPerlinTextured,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "transform",
    [RandPerlinTextured(keys="image", p_clean=0.0), RandLargeCutPasted(keys="image", p_clean=0.0)],
)
def test_dictionary_transforms_write_corruption_keys(transform):
    image = torch.rand(3, 48, 48, generator=gen())
    transform.set_random_state(seed=0)
    out = transform({"image": image})
    assert out["corrupted"].shape == (3, 48, 48) and out["corruption_mask"].shape == (1, 48, 48)
    assert out["corruption_mask"].sum() > 0
    mask = out["corruption_mask"]
    assert torch.equal(out["corrupted"] * (1 - mask), image * (1 - mask))
    assert torch.equal(out["image"], image)
    transform.set_random_state(seed=0)
    again = transform({"image": image})
    assert torch.equal(again["corrupted"], out["corrupted"])


def test_fair_corruption_mixes_branches_and_rotates_target():
    transform = RandFairCorruptiond(keys="image", p_clean=0.0, rotate_prob=1.0)
    transform.set_random_state(seed=3)
    image = torch.rand(1, 40, 40, generator=gen()) * 0.8 + 0.1
    for _ in range(4):
        out = transform({"image": image})
        mask = out["corruption_mask"]
        assert mask.sum() > 0
        assert not torch.equal(out["image"], image)  # the clean target was rotated (zero corners)
        assert torch.equal(out["corrupted"] * (1 - mask), out["image"] * (1 - mask))

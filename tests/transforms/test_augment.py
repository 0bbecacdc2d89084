"""DISYRE's batched slice augmentation (medad.transforms.augment): each operation against its closed form or MONAI's
per-sample transform, the firing rates of the official probabilities, image and mask moved together, and the
random stream that a resumed run repeats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, GaussianSmooth

from medad.engine.random_state import capture_random_state, restore_random_state
from medad.scores.filters import gaussian_filter_each
from medad.transforms.augment import AugmentingCollate, RandFlipBatch, RandSliceAugmentation, _gamma

OFF = {"flip_prob": 0.0, "elastic_prob": 0.0, "rotate_prob": 0.0, "zoom_prob": 0.0, "intensity_prob": 0.0}


def _batch(n: int = 6, side: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2, indexing="ij")
    brain = ((yy / (side * 0.4)) ** 2 + (xx / (side * 0.3)) ** 2 <= 1).float()
    image = brain * (0.3 + 0.5 * torch.rand(n, 1, side, side, generator=g))
    return {"image": image, "brain_mask": brain.expand(n, 1, side, side).clone(), "case_id": ["a"] * n}


def test_nothing_fires_at_probability_zero():
    batch = _batch()
    out = RandSliceAugmentation(**OFF)(batch)
    assert torch.equal(out["image"], batch["image"]) and torch.equal(out["brain_mask"], batch["brain_mask"])
    assert out["case_id"] == batch["case_id"]


def test_mirroring_is_exact_and_moves_the_mask_with_the_image():
    batch = _batch()
    out = RandSliceAugmentation(**{**OFF, "flip_prob": 1.0})(batch)
    assert torch.equal(out["image"], batch["image"].flip(-1).flip(-2))
    assert torch.equal(out["brain_mask"], batch["brain_mask"].flip(-1).flip(-2))


def test_rotation_by_a_right_angle_and_zoom_one_are_exact_resamplings():
    # a 90-degree rotation of a square grid lands on pixel centres: bilinear resampling must equal rot90
    batch = _batch(n=4, side=16)
    aug = RandSliceAugmentation(**{**OFF, "rotate_prob": 1.0, "rotate_degrees": 90.0})
    draw = aug._draw(4, (16, 16))
    draw["angle"][:] = math.pi / 2
    grid = aug._sampling_grid(draw, np.arange(4), (16, 16))
    turned = torch.nn.functional.grid_sample(batch["image"], grid, align_corners=True)
    assert torch.allclose(turned, torch.rot90(batch["image"], 1, (-2, -1)), atol=1e-5) or torch.allclose(
        turned, torch.rot90(batch["image"], -1, (-2, -1)), atol=1e-5)
    draw["angle"][:] = 0.0
    draw["zoom"][:] = True
    draw["zoom_factor"][:] = 1.0
    same = torch.nn.functional.grid_sample(batch["image"], aug._sampling_grid(draw, np.arange(4), (16, 16)),
                                           align_corners=True)
    assert torch.allclose(same, batch["image"], atol=1e-5)


def test_spatial_transforms_move_image_and_mask_together():
    batch = _batch(n=32, side=32)
    aug = RandSliceAugmentation(**{**OFF, "elastic_prob": 1.0, "rotate_prob": 1.0, "zoom_prob": 1.0},
                                elastic_spacing=4, elastic_magnitude=(0.0, 2.0))
    aug.set_random_state(seed=3)
    out = aug(batch)
    assert set(torch.unique(out["brain_mask"]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out["brain_mask"], batch["brain_mask"])
    inside = out["brain_mask"] > 0
    # the tissue (≥ 0.3 inside the brain) followed the mask: bilinear edges aside, bright pixels are brain pixels
    bright = out["image"] > 0.25
    iou = (inside & bright).sum((1, 2, 3)).float() / (inside | bright).sum((1, 2, 3)).clamp_min(1).float()
    assert float(iou.mean()) > 0.85


def test_gamma_and_inverted_gamma_equal_monai_adjust_contrast():
    images = torch.rand(3, 1, 8, 9) * 0.8 + 0.1
    gammas = torch.tensor([0.5, 1.3, 2.0])
    for invert in (False, True):
        ours = _gamma(images, gammas, invert=invert)
        for k in range(3):
            ref = AdjustContrast(float(gammas[k]), invert_image=invert, retain_stats=invert)(images[k])
            assert torch.allclose(ours[k], torch.as_tensor(ref), atol=1e-5)


def test_blur_equals_monai_gaussian_smooth_per_image():
    images = torch.rand(3, 2, 12, 15)
    sigmas = torch.tensor([[0.5, 1.5], [1.0, 0.7], [1.4, 1.4]])
    ours = gaussian_filter_each(images, sigmas, approx="erf", normalize=False)  # as RandSliceAugmentation blurs
    for k in range(3):
        ref = GaussianSmooth(sigma=tuple(float(s) for s in sigmas[k]))(images[k])
        assert torch.allclose(ours[k], torch.as_tensor(ref), atol=1e-5)


def test_each_operation_fires_at_its_official_rate_and_the_image_stays_in_range():
    aug = RandSliceAugmentation()
    aug.set_random_state(seed=0)
    draws = [aug._draw(64, (32, 32)) for _ in range(50)]  # 3,200 slices
    for name, rate in (("elastic", 0.1), ("rotate", 0.1), ("zoom", 0.1), ("brightness", 0.15), ("gamma", 0.15),
                       ("inverted_gamma", 0.15), ("noise", 0.15), ("blur", 0.15)):
        observed = np.mean([d[name].mean() for d in draws])
        assert abs(observed - rate) < 0.025, (name, observed)
    assert abs(np.mean([d["flip"].mean() for d in draws]) - 0.5) < 0.03
    out = aug(_batch(n=64, side=32))
    assert out["image"].dtype == torch.float32 and out["image"].shape == (64, 1, 32, 32)
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0


def test_a_seed_fixes_the_stream_and_a_captured_state_repeats_it():
    collate = AugmentingCollate(RandSliceAugmentation())
    collate.augmentation.set_random_state(seed=7)
    samples = [{"image": s["image"], "brain_mask": s["brain_mask"]} for s in
               [{k: v[i] for k, v in _batch(n=8).items() if k != "case_id"} for i in range(8)]]
    state = capture_random_state(collate, global_state=False)
    first = collate(samples)
    second = collate(samples)
    assert not torch.equal(first["image"], second["image"])  # the stream moves on
    restore_random_state(state, collate)
    again = collate(samples)
    assert torch.equal(again["image"], first["image"]) and torch.equal(again["brain_mask"], first["brain_mask"])


def test_loader_workers_do_not_repeat_each_others_draws():
    from torch.utils.data import DataLoader

    batch = _batch(n=8)
    items = [{"image": batch["image"][0], "brain_mask": batch["brain_mask"][0]}] * 8
    aug = RandSliceAugmentation(**{**OFF, "intensity_prob": 1.0})
    aug.set_random_state(seed=0)
    loader = DataLoader(items, batch_size=4, num_workers=2, collate_fn=AugmentingCollate(aug))
    first, second = list(loader)
    assert not torch.allclose(first["image"], second["image"])


@pytest.mark.parametrize("side", [32, 64])
def test_a_batch_costs_milliseconds(side):
    # the MONAI chain of twelve Rand*d transforms took ~3 ms per slice; the batched form must stay well below that
    import time

    aug = RandSliceAugmentation()
    batch = _batch(n=16, side=side)
    aug(batch)
    start = time.perf_counter()
    for _ in range(10):
        aug(batch)
    assert (time.perf_counter() - start) / 10 < 16 * 3e-3 / 2


def test_batch_flips_move_image_and_mask_alike_at_their_rate():
    batch = {"image": torch.rand(400, 3, 6, 7), "mask": (torch.rand(400, 1, 6, 7) > 0.5).float(), "label": [0] * 400}
    assert torch.equal(RandFlipBatch(prob=0.0)(batch)["image"], batch["image"])
    both = RandFlipBatch(prob=1.0)(batch)
    assert torch.equal(both["image"], batch["image"].flip(-1).flip(-2))
    assert torch.equal(both["mask"], batch["mask"].flip(-1).flip(-2)) and both["label"] == batch["label"]
    flip = RandFlipBatch(prob=0.5)
    flip.set_random_state(seed=0)
    out = flip(batch)
    variants = {(r, c): batch["image"].flip([d for d, on in ((-2, r), (-1, c)) if on]) if (r or c) else batch["image"]
                for r in (False, True) for c in (False, True)}
    found = [next(rc for rc, v in variants.items() if torch.equal(out["image"][i], v[i])) for i in range(400)]
    rows, cols = torch.tensor([r for r, _ in found]), torch.tensor([c for _, c in found])
    assert 0.4 < rows.float().mean() < 0.6 and 0.4 < cols.float().mean() < 0.6
    # the mask went wherever its image went
    for i in range(50):
        dims = [d for d, moved in ((-2, bool(rows[i])), (-1, bool(cols[i]))) if moved]
        assert torch.equal(out["mask"][i], batch["mask"][i].flip(dims) if dims else batch["mask"][i])


def test_industrial_training_batches_are_flipped_in_the_collate(tmp_path):
    from medad.engine.builders import image_loaders

    loaders = image_loaders(None, image_size=16, channels=1, batch_size=4, augment=True, demo_dir=tmp_path / "demo",
                            demo_kwargs={"num_train": 8, "num_test_good": 1, "num_test_defect": 1, "image_size": 16})
    assert isinstance(loaders["train"].collate_fn, AugmentingCollate)
    assert isinstance(loaders["train"].collate_fn.augmentation, RandFlipBatch)
    assert not isinstance(loaders["test"].collate_fn, AugmentingCollate)
    batch = next(iter(loaders["train"]))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)

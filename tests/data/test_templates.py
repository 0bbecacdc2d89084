"""The MNI152 template (medad.data.load_mni152), offline, and the masked template registration uses."""

from __future__ import annotations

import numpy as np

from medad.data import load_mni152


def test_mni152_loads_offline():
    from medad.transforms.mri import _load_template

    template, mask, affine = load_mni152(2)
    assert template.shape == mask.shape == (99, 117, 95) and affine[0, 0] == 2.0
    assert 0.15 < float(mask.mean()) < 0.3 and 0.95 < template.max() <= 1.0  # resampled from a maximum of 1
    np.testing.assert_array_equal(mask, template > 0.2)
    brain, brain_mask = _load_template("mni152", None, 2)  # registration sees the template inside the brain only
    assert tuple(brain.shape) == (1, 99, 117, 95)
    assert float(brain[brain_mask == 0].abs().max()) == 0.0

"""Learning-rate schedules (medad.engine.schedules) outside a trainer: FAIR's multi-step decay and the training length.

Their behaviour under a trainer's time budget is tested in ``tests/engine/test_trainer.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from medad.engine import multi_step_schedule, training_length


def test_lr_is_multiplied_by_0_2_at_80_and_90_percent_of_training():
    assert training_length(max_steps=None, max_epochs=10, steps_per_epoch=7) == 70
    assert training_length(max_steps=50, max_epochs=10, steps_per_epoch=7) == 50
    with pytest.raises(ValueError):
        training_length()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = multi_step_schedule(optimizer, (0.8, 0.9), 0.2, max_epochs=10, steps_per_epoch=10)
    lrs = []
    with warnings.catch_warnings():  # no optimizer.step() here: only the schedule is under test
        warnings.simplefilter("ignore")
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    assert lrs[79] == pytest.approx(1e-4) and lrs[80] == pytest.approx(2e-5)
    assert lrs[89] == pytest.approx(2e-5) and lrs[90] == pytest.approx(4e-6)

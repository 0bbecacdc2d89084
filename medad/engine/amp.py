"""Mixed precision for training and inference: one switch, ``amp``, shared by the trainer and the evaluator.

``amp="bf16"`` runs the network's forward passes (and a method's losses) under :func:`torch.autocast` with
bfloat16: matrix products and convolutions in bf16 on GPUs that have it (Ampere and later) and on CPUs with
AVX-512-BF16/AMX, everything numerically sensitive (norms, softmax, losses) in float32 as autocast decides.
bf16 has float32's range, so no loss scaling is needed (float16 would need a ``GradScaler`` around every
backward, including ADDM's discriminator step inside its training step, so it is not offered). Parameters,
optimiser state and checkpoints stay float32.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_CHOICES", "autocast", "check_amp"]

#: ``amp`` setting -> autocast dtype (None: full precision)
AMP_CHOICES: dict[str | None, torch.dtype | None] = {None: None, "none": None, "bf16": torch.bfloat16}


def check_amp(amp: str | None) -> str | None:
    """The canonical ``amp`` setting (None or ``"bf16"``); anything else is a ValueError naming the choices."""
    value = amp.strip().lower() if isinstance(amp, str) else amp
    if value in ("", False, "false", "off", "no"):
        value = None
    if value not in AMP_CHOICES:
        raise ValueError(f"amp must be null (full precision) or 'bf16', got {amp!r}.")
    return None if AMP_CHOICES[value] is None else value


def autocast(device: str | torch.device, amp: str | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type with the ``amp`` dtype, or a no-op context for full precision."""
    dtype = AMP_CHOICES[check_amp(amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

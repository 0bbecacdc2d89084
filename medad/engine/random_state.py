"""Capture and restore every random state a training run draws from, so a resumed run repeats the same draws.

A run draws from the global generators (torch, CUDA, NumPy, Python, MONAI's shared ``Randomizable.R``) and from
private ones held by objects: a MONAI transform's ``R`` (``numpy.random.RandomState``), a corruption's
``torch.Generator``, a ``numpy.random.Generator``. :func:`capture_random_state` walks an object graph (a data
loader, a training step, an inferer) the way :func:`monai.data.utils.set_rnd` does and records each private
generator under its attribute path; :func:`restore_random_state` walks the same graph again and puts them back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable

__all__ = ["capture_random_state", "restore_random_state", "preserved_random_state"]

_GENERATORS = (np.random.RandomState, np.random.Generator, torch.Generator)
_MAX_DEPTH = 12


def _walk(obj: Any, path: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, generator)`` for every random generator reachable from ``obj`` (each once, stable order)."""
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, type)):
        return  # data, not generators; skipping tensors keeps cached datasets cheap to walk
    seen.add(id(obj))
    if isinstance(obj, _GENERATORS):
        yield path, obj
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{path}[{i}]", seen, depth + 1)
        return
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            if isinstance(key, str):
                yield from _walk(item, f"{path}[{key!r}]", seen, depth + 1)
        return
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        for key, item in list(attributes.items()):
            if not key.startswith("__"):
                yield from _walk(item, f"{path}.{key}", seen, depth + 1)


def _get(generator: Any) -> Any:
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    return generator.get_state()


def _set(generator: Any, state: Any) -> None:
    if isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    else:
        generator.set_state(state)


def capture_random_state(*objects: Any, global_state: bool = True) -> dict[str, Any]:
    """The states of the global generators (if ``global_state``) and of every generator held by ``objects``.

    Returns:
        a picklable dict: ``{"global": {...}, "objects": [{path: state}, ...]}`` (one dict per object).
    """
    state: dict[str, Any] = {"objects": []}
    if global_state:
        state["global"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "monai": Randomizable.R.get_state(),  # the class-level state of transforms never seeded
        }
    for obj in objects:
        state["objects"].append({path: _get(generator) for path, generator in _walk(obj, "", set())})
    return state


def restore_random_state(state: Mapping[str, Any], *objects: Any) -> None:
    """Put back what :func:`capture_random_state` recorded, for the same ``objects`` (built the same way)."""
    saved_global = state.get("global")
    if saved_global is not None:
        torch.set_rng_state(saved_global["torch"])
        if saved_global.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved_global["cuda"])
        np.random.set_state(saved_global["numpy"])
        random.setstate(saved_global["python"])
        Randomizable.R.set_state(saved_global["monai"])
    for obj, saved in zip(objects, state.get("objects", [])):
        for path, generator in _walk(obj, "", set()):
            if path in saved:
                _set(generator, saved[path])


@contextmanager
def preserved_random_state(*objects: Any) -> Iterator[None]:
    """Run a block (e.g. a validation pass) without changing any random stream that training or evaluation uses."""
    state = capture_random_state(*objects)
    try:
        yield
    finally:
        restore_random_state(state, *objects)

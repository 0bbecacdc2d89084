"""Shared pytest fixtures: paths to the real data in ../shared/data (tests skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (pyproject's ``-n 2``): each worker, and the runs it starts, computes on one thread;
    # more threads than cores made the small networks several times slower (docs/results.md, first paragraph)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDAD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mvtec_bottle() -> Path:
    return _require(SHARED_DATA / "mvtec_ad" / "bottle")


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    return _require(SHARED_DATA / "ixi_t1_2mm")


@pytest.fixture(scope="session")
def open_ms_patient() -> Path:
    return _require(SHARED_DATA / "open_ms" / "patient26")

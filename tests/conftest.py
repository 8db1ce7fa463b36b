"""Shared fixtures. Tests never touch the network: W&B runs offline, caches go to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# idle OpenMP threads sleep instead of spinning: much faster when cores are oversubscribed
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where the real datasets live: $DEFECTSEG_DATA_ROOT or ../shared/datasets."""
    return Path(os.environ.get("DEFECTSEG_DATA_ROOT", REPO.parent / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEFECTSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def real_data_root() -> Path:
    """The real datasets' root; skips the test with a reason when it is absent."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root} (set DEFECTSEG_DATA_ROOT)")
    return root


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module of tiny models: they gain nothing from more, and the CPU is
    shared. Use with ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

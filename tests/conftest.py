"""Shared test configuration: the GPU marker and small fixtures."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where no CUDA device is present (the one place this is decided)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory):
    """A small embedded 360° scene (24 views at 32x32)."""
    from mmstyle_ns.data.scene import generate_scene

    return generate_scene("object360", tmp_path_factory.mktemp("scene") / "object360", num_views=24, resolution=32)

"""Tiny random RadGrounder checkpoints shared by the modeling tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radgrounder.modeling import init_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {v: init_model("tiny", v, root / v, seed=0) for v in ("detection", "segmentation")}


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and two OpenMP threads on two busy
    cores spin-wait each other into 50x slowdowns; one thread keeps timings stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Tiny random models of the real classes for the inference tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from radgrounder.modeling import init_model

    root = tmp_path_factory.mktemp("inference-models")
    return {v: init_model("tiny", v, root / v, seed=0) for v in ("detection", "segmentation")}


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Tiny random RadGrounder checkpoints shared by the modeling tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from radgrounder.modeling import init_model
from tests.helpers import single_torch_thread


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {v: init_model("tiny", v, root / v, seed=0) for v in ("detection", "segmentation")}


_one_torch_thread = pytest.fixture(autouse=True, scope="package")(single_torch_thread)

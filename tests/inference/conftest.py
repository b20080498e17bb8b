"""Tiny random models of the real classes for the inference tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import single_torch_thread


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from radgrounder.modeling import init_model

    root = tmp_path_factory.mktemp("inference-models")
    return {v: init_model("tiny", v, root / v, seed=0) for v in ("detection", "segmentation")}


_one_torch_thread = pytest.fixture(autouse=True, scope="package")(single_torch_thread)

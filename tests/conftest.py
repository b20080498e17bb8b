from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "totalseg_example"


@pytest.fixture(scope="session")
def examples() -> Path:
    return EXAMPLES

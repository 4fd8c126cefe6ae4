from pathlib import Path

import pytest

from corsa.datasets import default_data_root

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = ROOT / "training" / "split.json"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not root.is_dir():
        pytest.fail(f"the shared Sentinel-2 data is not at {root}: tests run on real scenes")
    return root

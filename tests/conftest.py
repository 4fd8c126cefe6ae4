from pathlib import Path

import pytest

from corsa.formats.datasets import default_data_root

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = ROOT / "training" / "split.json"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not root.is_dir():
        pytest.fail(f"the shared Sentinel-2 data is not at {root}: tests run on real scenes")
    return root


def stored_files(folder: Path) -> list[Path]:
    """A product's or output folder's data files, without the STAC documents beside them."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix != ".json")

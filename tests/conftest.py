from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _need(path: Path) -> Path:
    if not path.exists():
        # CI lays ../shared/data beside the checkout; a missing copy is a setup error,
        # not a reason to skip silently.
        raise FileNotFoundError(
            f"real test data {path} is missing: the checkout's parent must hold shared/data"
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def isbi(data_dir) -> np.ndarray:
    import tifffile

    return tifffile.imread(_need(data_dir / "em" / "isbi2012_sstem_train.tif"))


@pytest.fixture(scope="session")
def isbi_path(data_dir) -> Path:
    return _need(data_dir / "em" / "isbi2012_sstem_train.tif")

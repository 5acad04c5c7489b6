"""Shared pytest options (`--runslow` enables slow tests; `cuda` tests are skipped without a GPU) and the fixtures
for the reference data in tests/data (never skipped: a missing folder fails)."""

from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # see tests/data/README.md
GOLDEN = REFERENCE / "golden"
OFFICIAL = REFERENCE / "official"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


def _reference(folder: Path, what: str) -> Path:
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.fail(f"{what} missing at {folder}: it is part of the repository (tests/data/README.md); restore it "
                    "with git checkout -- tests/data", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def golden_dir():
    """Golden inputs/outputs of the reference implementation (tests/data/reference/golden)."""
    return _reference(GOLDEN, "golden reference data")


@pytest.fixture(scope="session")
def official_dir():
    """State-dict key lists of the published checkpoints (tests/data/reference/official)."""
    return _reference(OFFICIAL, "official checkpoint key lists")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny alignment problems: one torch thread avoids OpenMP contention on the shared 2-core CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

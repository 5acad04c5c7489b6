"""Shared pytest options: `--runslow` enables slow tests; `cuda` tests are skipped without a GPU."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUST3R_NS_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "reference" / "golden"
OFFICIAL = SHARED / "reference" / "official"


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


@pytest.fixture(scope="session")
def golden_dir():
    if not GOLDEN.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def official_dir():
    if not OFFICIAL.is_dir():
        pytest.skip(f"official key lists not found at {OFFICIAL}")
    return OFFICIAL


@pytest.fixture(scope="module")
def one_thread():
    """Tiny alignment problems: one torch thread avoids OpenMP contention on the shared 2-core CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Shared test settings."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: torch's intra-op threads only add synchronisation (on a shared 2-core machine a
    small denoiser call went from 0.3 ms on one thread to 12-16 ms on two).  Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """``shared_data("saxs/lysozyme/lyzexp.dat")`` -> the path under ../shared/data, or skip the test with the reason
    (the shared data folder sits beside the checkout; it is not part of a fresh clone)."""

    def get(relpath: str):
        path = SHARED_DATA / relpath
        if not path.exists():
            pytest.skip(f"reference data not found: {path} (../shared/data is not part of a fresh clone)")
        return path

    return get

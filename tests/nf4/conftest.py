import pytest


@pytest.fixture(scope="session")
def bnb_functional():
    """bitsandbytes.functional, the live reference (CPU)."""
    return pytest.importorskip("bitsandbytes.functional")

"""Fixtures for the LoRA tests."""

import pytest
import torch


@pytest.fixture
def input_ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))

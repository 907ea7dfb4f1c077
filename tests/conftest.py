"""Shared fixtures."""
import pytest

@pytest.fixture
def one_thread():
    "One intra-op thread for the test: tiny models run faster and steadier on a busy 2-core machine."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

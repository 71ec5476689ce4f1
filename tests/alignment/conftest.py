import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster than two (no thread hand-offs) and
    keeps the timings stable on a shared 2-core CI runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""HAMT tests run single-threaded: the models are tiny, and on a shared 2-core machine OpenMP
threads spinning at barriers make them 10x slower than one thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures of the lrpx.eval tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: the images here are tiny, and on a busy machine the thread pool's
    start-up per operation costs more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""The lrpx.eval tests work on tiny images: one intra-op thread for all of them."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _eval_one_thread(one_thread):
    yield

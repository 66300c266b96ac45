"""Test-wide settings: Ray without auth or telemetry, quiet progress bars, few threads."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# Under pytest-xdist (`-n 2`, pyproject's addopts) each of the two workers gets one core's worth
# of torch threads: two workers with two threads each would spin-wait on each other.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny matmuls on shared cores spin-wait with more (up to 100x slower), and one thread keeps
    in-process reference builds bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Modules that start Ray clusters or sweep crashes (marked ``ray`` / ``slow``) first, each
    module's tests in their own order: pytest-xdist (``-n 2 --dist loadfile``) hands modules out
    in this order, so the longest ones start first rather than last."""
    heavy = {item.module.__name__ for item in items if {"ray", "slow"} & {m.name for m in item.iter_markers()}}  # fmt: skip
    items.sort(key=lambda item: item.module.__name__ not in heavy)

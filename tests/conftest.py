"""Settings for the whole test session."""

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker would start one torch thread per core: share the cores instead of
    # oversubscribing them (2 workers on CI's 2 cores get 1 thread each).
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))

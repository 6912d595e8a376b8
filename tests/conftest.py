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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # CI has no GPU: tests marked `gpu` run where one is present (a lent GPU machine), and are reported as skipped
    # elsewhere.
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device: run it on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)

"""Settings for the whole test session."""

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--heavy",
        action="store_true",
        help="also run the tests marked `heavy` (full-size SDXL: about 11 GB of memory and a few minutes)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker would start one torch thread per core: share the cores instead of
    # oversubscribing them (2 workers on CI's 2 cores get 1 thread each).
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `heavy` do not fit CI's machine beside the rest (memory): they run with --heavy, by hand.
    if not config.getoption("--heavy"):
        heavy = pytest.mark.skip(reason="heavy (about 11 GB): run it with --heavy")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(heavy)
    # CI has no GPU: tests marked `gpu` run where one is present (a lent GPU machine), and are reported as skipped
    # elsewhere.
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device: run it on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)

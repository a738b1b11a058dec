import pytest
import torch

import ugd_ops  # noqa: F401  (registers the operators once for every test module)

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Devices every op test runs on: the CPU always, CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU models run fastest on one thread (and far slower on oversubscribed shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    torch.manual_seed(0)

import pytest
import torch

import ugd_ops  # noqa: F401  (registers the operators once for every test module)

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Devices every op test runs on: the CPU always, CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_configure(config):
    torch.manual_seed(0)

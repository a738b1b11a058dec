"""ugd_ops.cuda_attention: which devices the compiled attention kernels may serve (no GPU needed).

The build embeds machine code (no PTX) for the archs of UGD_CUDA_ARCHS, so a device the code cannot
run on must go to the other paths, never fail with "no kernel image"."""

import pytest

from ugd_ops import cuda_attention


@pytest.mark.parametrize("arch, cap, runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (8, 9), True), ("86", (8, 0), False),
    ("80", (9, 0), False), ("90", (9, 0), True), ("90", (10, 0), False), ("90", (12, 0), False),
    ("90a", (9, 0), True), ("90a", (9, 1), False), ("100", (10, 0), True), ("100a", (10, 0), True),
    ("120", (12, 0), True), ("bogus", (8, 0), False), ("8", (8, 0), False),
])
def test_arch_runs_on(arch, cap, runs):
    assert cuda_attention.arch_runs_on(arch, cap) is runs


def test_built_archs_read_from_build_info():
    archs = cuda_attention.built_archs()
    assert isinstance(archs, list)
    if cuda_attention.compiled():  # a CUDA build names what it compiled for
        assert archs and all(a[:2].isdigit() for a in archs)

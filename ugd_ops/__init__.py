"""ugd_ops: the operators of UGD matching models as PyTorch custom ops.

    partitioned_attention  attention where each query row reads one key interval (SPEC section 3)
    detached_kl            KL(P || sg(Q)) of the single-to-two-tower distillation (SPEC section 5)
    row_intervals          span lengths -> cu_seqlens, kv_start, kv_end
    dense_mask             the same layout as a [T, T] bool mask (for references and peers)

Kernels: C++ on the CPU, CUDA on NVIDIA GPUs, the pure-PyTorch ``ugd_ops.reference`` where
nothing was compiled. ``python -m ugd_ops.info`` says which serve this installation.
"""

from . import _backend

_backend.load()

from . import reference  # noqa: E402
from .ops import build_info, dense_mask, detached_kl, partitioned_attention, row_intervals  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "dense_mask",
    "detached_kl",
    "partitioned_attention",
    "reference",
    "row_intervals",
]

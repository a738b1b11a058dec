"""ugd_ops: the operators of UGD matching models as PyTorch custom ops.

    partitioned_attention  attention where each query row reads one key interval (docs/spec.md section 3)
    detached_kl            KL(P || sg(Q)) of the single-to-two-tower distillation (docs/spec.md section 5)
    linear_cross_entropy   cross-entropy of hidden @ weight.T without the [N, V] logits (L_gen: paper eq. 3,
                           docs/spec.md section 5)
    row_intervals          span lengths -> cu_seqlens, kv_start, kv_end
    dense_mask             the same layout as a [T, T] bool mask (for references and peers)

Kernels: C++ on the CPU, CUDA on NVIDIA GPUs, the pure-PyTorch ``ugd_ops.reference`` where
nothing was compiled. Partitioned attention on CUDA runs the compiled kernel where it serves
(``ugd_ops.cuda_attention``), else FlexAttention (``ugd_ops.flex``), else the reference. The public
functions follow ``torch.autocast`` as PyTorch's own ops do. ``python -m ugd_ops.info`` says which
path serves this installation.
"""

from . import _backend

_backend.load()

from . import reference  # noqa: E402
from .ops import (  # noqa: E402
    build_info,
    dense_mask,
    detached_kl,
    linear_cross_entropy,
    partitioned_attention,
    row_intervals,
)

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "dense_mask",
    "detached_kl",
    "linear_cross_entropy",
    "partitioned_attention",
    "reference",
    "row_intervals",
]

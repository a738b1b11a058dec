"""Whether the compiled CUDA partitioned-attention kernels serve a call.

The kernels (csrc/cuda/attention/) are defined as the internal operators
``ugd_ops::_cuda_attention_fwd`` and ``ugd_ops::_cuda_attention_bwd``, with the schemas of
``partitioned_attention_fwd`` / ``partitioned_attention_bwd`` and a CUDA kernel only. The public
operators route to them when this module says so, and otherwise to the FlexAttention path
(``ugd_ops.flex``) or the pure-PyTorch reference.

Until a GPU run has verified the kernels they serve calls only when ``UGD_CUDA_ATTENTION=1``
(``VERIFIED`` below flips the default once one has). ``UGD_CUDA_ATTENTION=0`` always switches them off.
"""

from __future__ import annotations

import os

import torch

ENV = "UGD_CUDA_ATTENTION"
# No GPU run has checked the kernels yet: opt-in only.
VERIFIED = False
FWD_OP = "_cuda_attention_fwd"
BWD_OP = "_cuda_attention_bwd"
DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)


def compiled(op: str = FWD_OP) -> bool:
    """The build holds the CUDA kernel of ``op``. Looked up once per op: every CUDA attention call asks,
    and the answer is fixed once ugd_ops has loaded (importing this module loads it first)."""
    if op not in _compiled_ops:
        try:
            _compiled_ops[op] = torch._C._dispatch_has_kernel_for_dispatch_key(f"ugd_ops::{op}", "CUDA")
        except RuntimeError:  # the operator is not defined at all (no CUDA build)
            _compiled_ops[op] = False
    return _compiled_ops[op]


_compiled_ops: dict[str, bool] = {}


def switch() -> str:
    """'on', 'off' or 'default' as the environment sets it."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("1", "on", "true", "yes"):
        return "on"
    if v in ("0", "off", "false", "no"):
        return "off"
    return "default"


def enabled() -> bool:
    s = switch()
    return s == "on" or (s == "default" and VERIFIED)


def case_reason(dtype: torch.dtype, head_dim: int, op: str = FWD_OP) -> str | None:
    """None when the compiled kernel ``op`` serves a CUDA call of this dtype (q, k, v alike) and head
    dim, else why not."""
    if not compiled(op):
        return "this build has no CUDA attention kernel"
    if not enabled():
        return f"switched off (set {ENV}=1 to use the unverified kernel)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernel serves bf16 and fp16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the kernel serves {HEAD_DIMS})"
    return None


def unserved_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = FWD_OP) -> str | None:
    """None when the compiled kernel ``op`` serves these inputs, else why not (for ugd_ops.info)."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if q.dim() != 3:
        return "q is not [T, H, D]"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (q, k and v must be alike)"
    return case_reason(q.dtype, q.shape[-1], op) or device_reason(q.device)


def built_archs() -> list[str]:
    """The compute capabilities the CUDA part of this build holds machine code for, e.g. ['80', '90']."""
    global _archs
    if _archs is None:
        import json

        try:
            cuda = json.loads(torch.ops.ugd_ops.build_info()).get("cuda") or {}
        except (RuntimeError, ValueError, AttributeError):
            cuda = {}
        _archs = [a.strip() for a in str(cuda.get("archs", "")).replace(",", ";").split(";") if a.strip()]
    return _archs


_archs: list[str] | None = None


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Machine code for ``arch`` ('80', '90', '90a', '100f') runs on a device of ``capability``: the
    same major version and a minor version no higher than the device's ('a'/'f' variants: exactly
    that chip). The build embeds no PTX, so a newer major version (sm_100, sm_120) is not served."""
    digits = arch.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        return False
    major, minor = int(digits[:-1]), int(digits[-1])
    if arch != digits:
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]


def device_reason(device: torch.device) -> str | None:
    """None when the build holds machine code for ``device``'s architecture."""
    cap = torch.cuda.get_device_capability(device)
    archs = built_archs()
    if any(arch_runs_on(a, cap) for a in archs):
        return None
    return (f"built for sm_{', sm_'.join(archs) or '?'}, not for this device (sm_{cap[0]}{cap[1]}); rebuild with "
            f"UGD_CUDA_ARCHS={cap[0]}{cap[1]}")


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = FWD_OP) -> bool:
    return unserved_reason(q, k, v, op) is None

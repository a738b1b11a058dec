"""How the op tests compare numbers: one error measure, the 2x rule, one tolerance table, NaN poisoning.

tests/oracles.py holds the float64 references; this module holds how results are held to them.

Error measure. ``rel_err(got, ref, scale)`` is max |got - ref| / scale, computed in float64 on the
reference's device (a NaN in ``got`` is an infinite error). The scale is the magnitude of the reference, max |ref| (at
least ``TINY``), unless a test names another: 1.0 for absolute errors of quantities of order 1, a
tensor (``ref.abs()``) for element-wise relative errors.

The 2x rule (``assert_within_2x_of_torch``). A result in bf16 / fp16, or anywhere a fixed tolerance
would have to guess at the rounding of a particular shape, must be within twice the error of
PyTorch's own computation of the same thing in the same dtype on the same rounded inputs, both
measured against the float64 reference, plus a small floor relative to the scale (so that a case
where PyTorch happens to be exact does not demand that the kernel be exact too).

Tolerance table (``TOL[dtype][purpose]``). Fixed tolerances, one row per purpose: each value is the
one its tests used before the table was made (none was loosened).

NaN poisoning (``nan_fill_cuda_memory``, ``poison_for_outputs``). NaN-filled blocks left in the CUDA
caching allocator, so that an output element a kernel does not write reads as NaN.
"""

from __future__ import annotations

import torch

TINY = 1e-30  # the smallest magnitude errors are divided by (an all-zero reference)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# the tolerance table
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# A number is atol = rtol (for assert_close); a pair is (atol, rtol); None: no test compares so.
_GRID = {
    #                 float64  float32  bfloat16        float16
    # partitioned_attention (any backend) against the float64 oracle: out and lse; float32 gradients at 5x
    # (tests/ops/test_attention.py), bf16 / fp16 gradients by the 2x rule; the bf16 / fp16 values are those
    # of the CUDA kernel path through the public operator (tests/ops/test_flex_attention.py)
    "attention":     (1e-10,   2e-5,    2e-2,           2e-2),
    # the FlexAttention path: flex's eager math in float64, its CUDA kernels in fp32 / bf16 (out and lse;
    # bf16 gradients by the 2x rule, not at 5x this), and a transformers model run through it on CUDA
    # against the same model on the CPU kernels (fp32)
    "flex":          (1e-9,    1e-4,    2e-2,           None),
    # lse of the CUDA forward kernel from bf16 / fp16 inputs (tests/ops/test_attention_cuda_fwd.py): (atol, rtol)
    "attention_lse": (None,    None,    (2e-3, 1e-3),   (2e-3, 1e-3)),
    # the CUDA backward kernel: a ceiling on rel_err of dq / dk / dv against float64, relative to the
    # largest gradient, on top of the 2x rule (tests/ops/test_attention_cuda_bwd.py)
    "attention_bwd": (None,    None,    3e-2,           4e-3),
    # two implementations of the same math in the same dtype: the compiled op and ugd_ops.reference,
    # the CUDA and CPU KL kernels, a transformers model with attn_implementation="ugd" and "eager"
    "agreement":     (None,    1e-5,    2e-2,           None),
    # detached_kl against the float64 F.kl_div oracle: loss and gradients (tests/ops/test_kl.py)
    "kl":            (1e-12,   1e-5,    2e-2,           5e-3),
    # linear_cross_entropy against float64 F.cross_entropy: loss and gradients, atol relative to
    # max(1, max |reference|) (tests/ops/test_linear_cross_entropy.py)
    "cross_entropy": (1e-12,   1e-5,    2e-2,           3e-3),
}
TOL = {dtype: {purpose: row[i] for purpose, row in _GRID.items() if row[i] is not None}
       for i, dtype in enumerate(_DTYPES)}


def tol(dtype: torch.dtype, purpose: str):
    """TOL[dtype][purpose], with an error that names both when the table has no such entry."""
    try:
        return TOL[dtype][purpose]
    except KeyError:
        raise KeyError(f"tests/numerics.py has no {purpose!r} tolerance for {dtype}") from None


def eps(dtype: torch.dtype) -> float:
    """The dtype's machine epsilon (the spacing of numbers at 1)."""
    return torch.finfo(dtype).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to the dtype: eps / 2 (2^-8 for bf16, 2^-11 for fp16)."""
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------------------------
# error measure
# ---------------------------------------------------------------------------------------------


def f64(x: torch.Tensor, device=None) -> torch.Tensor:
    """x detached, in float64, on ``device`` (default: the CPU)."""
    return x.detach().to(device=device or "cpu", dtype=torch.float64)


def magnitude(ref: torch.Tensor, at_least: float = TINY) -> float:
    """max |ref| (0 for an empty tensor), at least ``at_least``."""
    return max(ref.detach().abs().max().item() if ref.numel() else 0.0, at_least)


def rel_err(got: torch.Tensor, ref: torch.Tensor, scale=None) -> float:
    """max |got - ref| / scale in float64 on ref's device (0 for empty tensors; a NaN in ``got`` is an
    infinite error).

    ``scale``: the magnitude of ``ref`` (default), a number (1.0: the absolute error), or a tensor
    broadcast against ``ref`` (``ref.abs()``: the largest element-wise relative error)."""
    ref = f64(ref, ref.device)
    got = f64(got, ref.device)
    if not ref.numel():
        return 0.0
    if scale is None:
        scale = magnitude(ref)
    elif isinstance(scale, torch.Tensor):
        scale = f64(scale, ref.device)
    return ((got - ref).abs().nan_to_num(nan=float("inf")) / scale).max().item()


def max_abs_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| (the absolute error: ``rel_err`` with scale 1)."""
    return rel_err(got, ref, 1.0)


def assert_within_2x_of_torch(got, torch_result, ref, *, floor: float, scale=None, torch_nan_ok=False, what=""):
    """The 2x rule: rel_err(got) <= 2 * rel_err(torch_result) + floor, both against the float64
    ``ref`` and relative to the same ``scale`` (see ``rel_err``; default max |ref|), so ``floor`` is
    relative to that scale too. ``got`` must be finite. A NaN in PyTorch's result fails the test,
    unless ``torch_nan_ok``: then it counts as an infinite error (PyTorch's own computation broke down
    where the kernel did not). Returns both errors."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if not torch_nan_ok:
        assert not torch_result.isnan().any(), f"{what}: NaN in PyTorch's own result (the baseline of the 2x rule)"
    if scale is None:
        scale = magnitude(ref)
    err, base = rel_err(got, ref, scale), rel_err(torch_result, ref, scale)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 x PyTorch's {base:.3g} + {floor:.3g}"
    return err, base


# ---------------------------------------------------------------------------------------------
# fixed tolerances
# ---------------------------------------------------------------------------------------------


def assert_close(got, ref, tol, *, rtol=None, scale=1.0, what=""):
    """torch.testing.assert_close in float64 on the CPU: element-wise |got - ref| <= atol * scale +
    rtol * |ref|, where ``tol`` is a number (atol = rtol = tol) or an (atol, rtol) pair (a TOL entry)
    and ``rtol`` overrides the relative part. ``scale=magnitude(ref, at_least=1.0)`` makes atol relative
    to the size of what is compared. Shapes must match; dtypes are not compared (check them apart)."""
    atol, rt = (tol, tol) if isinstance(tol, (int, float)) else tol
    rt = rt if rtol is None else rtol
    torch.testing.assert_close(f64(got), f64(ref), atol=atol * scale, rtol=rt,
                               msg=(lambda m: f"{what}: {m}") if what else None)


# ---------------------------------------------------------------------------------------------
# NaN poisoning of CUDA memory
# ---------------------------------------------------------------------------------------------


def nan_fill_cuda_memory(*nbytes: int, device="cuda") -> None:
    """Allocates one float32 block full of NaN per size (in bytes) and frees them all: the caching
    allocator hands that memory to the next allocations that fit, so an output element a kernel does
    not write reads as NaN instead of a stale plausible value."""
    blocks = [torch.full((max(n // 4, 1),), float("nan"), device=device) for n in nbytes]
    del blocks


def poison_for_outputs(nbytes: int, device="cuda") -> None:
    """NaN-filled blocks for outputs of about ``nbytes`` in all (at::empty takes its memory from these
    blocks): two of ``nbytes`` and one of ``nbytes / 2``, each 4 KiB more."""
    whole, half = 4 * max(nbytes // 4, 1) + 4096, 4 * max(nbytes // 8, 1) + 4096
    nan_fill_cuda_memory(whole, whole, half, device=device)

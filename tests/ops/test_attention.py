"""partitioned_attention against float64 references: forward, lse, backward, dtypes, strides, GQA."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DEVICES
from tests.numerics import LOW_PRECISION, assert_close, assert_within_2x_of_torch, eps, tol
from tests.oracles import attention_dense, intervals_from_table, mask_from_intervals, torch_attention_grads_in_dtype

import ugd_ops
from ugd_ops import reference
from ugd_ops.workloads import make_attention_inputs, random_spans

MASKS = ["ttm", "stm", "causal", "bidirectional"]
SHAPES = {"gqa6": (6, 1, 64), "mha": (2, 2, 128), "gqa3-d16": (6, 2, 16)}


def layout(spans, mask_kind, device="cpu"):
    cu, ks, ke = intervals_from_table(spans, mask_kind)
    return [torch.tensor(x, dtype=torch.int32, device=device) for x in (cu, ks, ke)], mask_from_intervals(cu, ks, ke)


def randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def check_against_oracle(q, k, v, lay, mask, *, scale=None, purpose="attention", with_grad=True, seed=0):
    """Forward, lse and all gradients (with a random upstream gradient for out and lse) against the float64
    oracle: out and lse within numerics.TOL[q.dtype][purpose]; gradients, sums over many more terms,
    within 5x that for float32 / float64 inputs (the kernels accumulate in fp32), and for bf16 / fp16
    inputs within the 2x rule: twice the error of PyTorch's own dense attention backward in that dtype
    on the same inputs, plus one epsilon of the dtype (a fixed 5x TOL would be 0.1 there)."""
    cu, ks, ke = lay
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    t = tol(q.dtype, purpose)
    q, k, v = (x.detach().requires_grad_(with_grad) for x in (q, k, v))
    out, lse = ugd_ops.partitioned_attention(q, k, v, cu, ks, ke, softmax_scale=scale, return_lse=True)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_(with_grad) for x in (q, k, v))
    ref_out, ref_lse = attention_dense(qd, kd, vd, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == (q.shape[1], q.shape[0])
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, t, what="out")
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty) and bool((lse.cpu()[empty] < 0).all())
    assert_close(lse.cpu()[~empty], ref_lse[~empty], t, what="lse")
    if not with_grad:
        return
    # the upstream gradients as the op sees them (rounded to out's / lse's dtype), so that the oracle, the
    # op and PyTorch's baseline differentiate the same function
    g_out = randn(out.shape, torch.float64, "cpu", seed + 1).to(out.dtype).double()
    g_lse = randn(lse.shape, torch.float64, "cpu", seed + 2).masked_fill(empty, 0.0).to(lse.dtype).double()
    grads = torch.autograd.grad(
        (out * g_out.to(out)).sum() + (lse.masked_fill(empty.to(lse.device), 0) * g_lse.to(lse)).sum(), (q, k, v)
    )
    ref_grads = torch.autograd.grad(
        (ref_out * g_out).sum() + (ref_lse.masked_fill(empty, 0) * g_lse).sum(), (qd, kd, vd)
    )
    if q.dtype in LOW_PRECISION:
        theirs = torch_attention_grads_in_dtype(q, k, v, mask, scale, g_out, g_lse)
        for name, a, b, w in zip("qkv", grads, theirs, ref_grads):
            assert a.dtype == q.dtype and a.shape == w.shape
            assert_within_2x_of_torch(a, b, w, floor=eps(q.dtype), what=f"d{name} ({q.dtype})")
        return
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, 5 * t, what=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_layouts(mask_kind, shape, seed, device):
    Hq, Hkv, D = SHAPES[shape]
    spans = random_spans(5, seed=10 * seed + 7, max_len=45)  # empty P and G spans included
    lay, mask = layout(spans, mask_kind, device)
    T = int(lay[0][-1])
    q, k, v = (randn((T, h, D), torch.float32, device, seed + i) for i, h in enumerate((Hq, Hkv, Hkv)))
    check_against_oracle(q, k, v, lay, mask, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["ttm", "causal"])
def test_low_precision_gradients_within_2x_of_pytorch(mask_kind, dtype, device):
    """The 2x rule of check_against_oracle for bf16 / fp16 gradients, run by every backend (the CPU
    kernels here; CUDA's kernel and flex in tests/ops/test_flex_attention.py)."""
    Hq, Hkv, D = SHAPES["gqa3-d16"]
    spans = random_spans(5, seed=17, max_len=45)
    lay, mask = layout(spans, mask_kind, device)
    T = int(lay[0][-1])
    q, k, v = (randn((T, h, D), dtype, device, 3 + i) for i, h in enumerate((Hq, Hkv, Hkv)))
    check_against_oracle(q, k, v, lay, mask, seed=4)


def awkward_spans(L: int, mask_kind: str) -> torch.Tensor:
    """A sample of L tokens (for ttm and stm: all four spans, P and G possibly empty) and a 2-token one;
    skips ttm and stm at L < 2, where Q and D cannot both be there."""
    if mask_kind in ("ttm", "stm"):
        if L < 2:
            pytest.skip("ttm and stm need Lq, Ld >= 1")
        spans = torch.tensor([[max(1, L // 5), max(1, L // 3), L // 7, 0]], dtype=torch.int32)
        spans[0, 3] = L - int(spans[0, :3].sum())
    else:
        spans = torch.tensor([[L, 0, 0, 0]], dtype=torch.int32)
    return torch.cat([spans, torch.tensor([[1, 1, 0, 0]], dtype=torch.int32)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [1, 17, 127, 300])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_awkward_lengths(L, mask_kind, device):
    lay, mask = layout(awkward_spans(L, mask_kind), mask_kind, device)
    T = int(lay[0][-1])
    q, k, v = (randn((T, h, 64), torch.float32, device, i) for i, h in enumerate((6, 1, 1)))
    check_against_oracle(q, k, v, lay, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_sequences(device):
    # Hand-made intervals: empty rows, an empty sequence, rows reading disjoint ranges in one tile.
    cu = [0, 70, 70, 75]
    ks = [(i * 7) % 40 for i in range(70)] + [0, 1, 2, 0, 5]
    ke = [min(70, s + (i % 5) * 9) for i, s in enumerate(ks[:70])] + [0, 3, 2, 5, 5]
    lay = [torch.tensor(x, dtype=torch.int32, device=device) for x in (cu, ks, ke)]
    mask = mask_from_intervals(cu, ks, ke)
    assert (mask.sum(1) == 0).any()
    q, k, v = (randn((75, h, 32), torch.float32, device, i) for i, h in enumerate((4, 2, 2)))
    check_against_oracle(q, k, v, lay, mask)
    out = ugd_ops.partitioned_attention(q, k, v, *lay)
    assert bool((out.cpu()[mask.sum(1) == 0] == 0).all())


def test_float64_and_softmax_scale():
    spans = random_spans(3, seed=5, max_len=30)
    lay, mask = layout(spans, "ttm")
    T = int(lay[0][-1])
    q, k, v = (randn((T, h, 24), torch.float64, "cpu", i) for i, h in enumerate((4, 4, 4)))
    check_against_oracle(q, k, v, lay, mask, scale=0.3)


def test_gradcheck_float64():
    spans = torch.tensor([[2, 3, 1, 2], [1, 1, 0, 0]], dtype=torch.int32)
    cu, ks, ke = ugd_ops.row_intervals(spans, "ttm")
    T = int(cu[-1])
    q, k, v = (randn((T, h, 5), torch.float64, "cpu", i).requires_grad_() for i, h in enumerate((4, 2, 2)))

    def f(q, k, v):
        out, lse = ugd_ops.partitioned_attention(q, k, v, cu, ks, ke, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout_kind", ["token", "head", "fused_qkv"])
def test_strided_inputs(layout_kind, device):
    spans = random_spans(4, seed=11, max_len=40)
    lay, mask = layout(spans, "ttm", device)
    T, Hq, Hkv, D = int(lay[0][-1]), 6, 2, 64
    if layout_kind == "token":  # [H, T, D] storage seen as [T, H, D]: non-contiguous token and head dims
        q, k, v = (randn((h, T, D), torch.float32, device, i).transpose(0, 1) for i, h in enumerate((Hq, Hkv, Hkv)))
    elif layout_kind == "head":  # every other head of a wider tensor
        q, k, v = (randn((T, 2 * h, D), torch.float32, device, i)[:, ::2] for i, h in enumerate((Hq, Hkv, Hkv)))
    else:  # slices of one fused projection [T, Hq + 2 Hkv, D]
        qkv = randn((T, Hq + 2 * Hkv, D), torch.float32, device, 0)
        q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    assert not (q.is_contiguous() and k.is_contiguous())
    check_against_oracle(q, k, v, lay, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["ttm", "stm"])
def test_low_precision_within_2x_of_pytorch(dtype, mask_kind, device):
    """Error against the float64 truth is at most twice that of PyTorch's SDPA on the same inputs."""
    spans = random_spans(4, seed=2, max_len=60, allow_empty=False)
    lay, mask = layout(spans, mask_kind, device)
    T, Hq, Hkv, D = int(lay[0][-1]), 6, 2, 64
    q, k, v = (randn((T, h, D), dtype, device, i).requires_grad_() for i, h in enumerate((Hq, Hkv, Hkv)))
    g = randn((T, Hq, D), dtype, device, 9)

    out = ugd_ops.partitioned_attention(q, k, v, *lay)
    ours = [out, *torch.autograd.grad(out, (q, k, v), g)]
    # PyTorch in the same dtype: SDPA over the packed batch with the dense mask (GQA by repeating heads).
    qs, ks_, vs = q.transpose(0, 1)[None], k.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)[None], \
        v.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)[None]
    sdpa = F.scaled_dot_product_attention(qs, ks_, vs, attn_mask=mask.to(device))[0].transpose(0, 1)
    theirs = [sdpa, *torch.autograd.grad(sdpa, (q, k, v), g)]
    truth_out, truth_grads = _truth(q, k, v, mask, g)
    # absolute errors (scale 1: attention outputs and these gradients are of order 1), floor 1e-6
    for name, a, b, w in zip(["out", "dq", "dk", "dv"], ours, theirs, [truth_out, *truth_grads]):
        assert_within_2x_of_torch(a, b, w, floor=1e-6, scale=1.0, what=f"{dtype} {name}")


def _truth(q, k, v, mask, g):
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out, _ = attention_dense(qd, kd, vd, mask, q.shape[-1] ** -0.5)
    return out, torch.autograd.grad(out, (qd, kd, vd), g.double().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_module(dtype):
    """The compiled op and ugd_ops.reference agree (the reference is also the fallback backend)."""
    x = make_attention_inputs(random_spans(6, seed=4, max_len=50), "stm", heads=(4, 2, 32), dtype=dtype)
    out, lse = ugd_ops.partitioned_attention(*x.args(), return_lse=True)
    r_out, r_lse = reference.partitioned_attention(*x.args(), return_lse=True)
    assert out.dtype == r_out.dtype and lse.dtype == r_lse.dtype == torch.float32
    assert_close(out, r_out, tol(dtype, "agreement"), what="out")
    assert_close(lse, r_lse, tol(torch.float32, "agreement"), what="lse")  # fp32 lse of the same inputs


def test_reference_backward_matches_autograd():
    """The reference backend's explicit backward equals autograd through the reference forward."""
    x = make_attention_inputs(random_spans(3, seed=8, max_len=30), "ttm", heads=(6, 2, 16), dtype=torch.float64,
                              requires_grad=True)
    out, lse = reference.partitioned_attention(*x.args(), return_lse=True)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (x.q, x.k, x.v))
    got = reference.partitioned_attention_bwd(g, x.q.detach(), x.k.detach(), x.v.detach(), out.detach(),
                                              lse.detach(), gl, x.cu_seqlens, x.kv_start, x.kv_end, None, 16**-0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_outputs_do_not_depend_on_other_sequences():
    """Packing: a sample's output is the same alone and inside a batch."""
    spans = random_spans(3, seed=21, max_len=30)
    x = make_attention_inputs(spans, "ttm", heads=(4, 2, 32), dtype=torch.float32)
    out = ugd_ops.partitioned_attention(*x.args())
    cu = x.cu_seqlens.tolist()
    for b in range(3):
        s, e = cu[b], cu[b + 1]
        one = ugd_ops.partitioned_attention(x.q[s:e], x.k[s:e], x.v[s:e], torch.tensor([0, e - s], dtype=torch.int32),
                                            x.kv_start[s:e], x.kv_end[s:e])
        torch.testing.assert_close(one, out[s:e])


def test_deterministic():
    x = make_attention_inputs(random_spans(5, seed=3, max_len=80), "ttm", heads=(6, 2, 64), dtype=torch.float32,
                              requires_grad=True)
    runs = []
    for _ in range(2):
        out = ugd_ops.partitioned_attention(*x.args())
        runs.append((out, *torch.autograd.grad(out.square().sum(), (x.q, x.k, x.v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_max_seqlen_accepted():
    x = make_attention_inputs(random_spans(2, seed=3), "ttm", heads=(2, 1, 8), dtype=torch.float32)
    a = ugd_ops.partitioned_attention(*x.args(), max_seqlen=x.max_seqlen)
    b = ugd_ops.partitioned_attention(*x.args(), max_seqlen=x.max_seqlen + 100)
    assert torch.equal(a, b)
    assert math.isfinite(float(a.sum()))

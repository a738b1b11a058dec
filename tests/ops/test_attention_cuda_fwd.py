"""The CUDA partitioned-attention forward kernel (csrc/cuda/attention/, ``ugd_ops::_cuda_attention_fwd``),
called directly, against a float64 reference: random layouts of every mask_kind, GQA ratios, awkward
lengths, empty sequences and rows, strided and misaligned inputs, 1000 sequences of 1-8 tokens up
to T = 64k, max_seqlen omitted, bf16 / fp16 within 2x the error of PyTorch's SDPA in that dtype,
the same bits on a second run, and every output element written (outputs are allocated from
memory poisoned with NaN). The last test checks that the public operator routes here under
UGD_CUDA_ATTENTION=1.

The module is skipped without a CUDA device or without the compiled kernel. The host-testable parts
(schedule, tile skips, fragment maps, a lane-by-lane replay of the kernel) are tested on the CPU by
csrc/tests/test_cuda_attention_plan.cpp (ctest).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.numerics import assert_close, assert_within_2x_of_torch, poison_for_outputs, tol, unit_roundoff
from tests.oracles import intervals_from_table

from ugd_ops import cuda_attention
from ugd_ops.workloads import random_spans

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not cuda_attention.compiled(cuda_attention.FWD_OP),
                       reason="this build has no CUDA attention kernel"),
]

MASKS = ["ttm", "stm", "causal", "bidirectional"]
DTYPES = [torch.bfloat16, torch.float16]
# (Hq, Hkv, D): Qwen2.5-1.5B, GQA 6, MHA, GQA 4.
SHAPES = {"qwen": (12, 2, 128), "gqa6-d64": (6, 1, 64), "mha-d64": (4, 4, 64), "gqa4-d128": (8, 2, 128)}


def fwd(q, k, v, cu, ks, ke, max_seqlen=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # out and lse land in NaN-filled memory: an output element the kernel does not write reads as NaN
    poison_for_outputs(q.numel() * q.element_size() + q.shape[0] * q.shape[1] * 4)
    return torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, cu, ks, ke, max_seqlen, scale)


def layout_from_intervals(cu, ks, ke):
    return [torch.tensor(x, dtype=torch.int32, device="cuda") for x in (cu, ks, ke)]


def random_qkv(T, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn((T, h, D), generator=g, device="cuda").to(dtype) for h in (Hq, Hkv, Hkv)]


def chunks_of(cu, limit=4096):
    """Consecutive sequences grouped so that each group holds at most `limit` tokens (or one sequence)."""
    groups, first = [], 0
    for b in range(1, len(cu)):
        if cu[b] - cu[first] > limit and b - 1 > first:
            groups.append((first, b - 1))
            first = b - 1
    groups.append((first, len(cu) - 1))
    return groups


def dense_reference(q, k, v, cu, ks, ke, scale, dtype):
    """Attention over groups of whole sequences with a dense mask, in `dtype` (float64 for the oracle,
    or through SDPA in the input dtype to measure PyTorch's own error). Returns out [T, Hq, D] (rows
    with an empty interval 0) and, for float64, lse [Hq, T] (-inf for those rows)."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros((T, Hq, D), dtype=torch.float64 if dtype == torch.float64 else q.dtype, device="cuda")
    lse = torch.full((Hq, T), float("-inf"), dtype=torch.float64, device="cuda")
    ks_l, ke_l = ks.tolist(), ke.tolist()
    for b0, b1 in chunks_of(cu):
        t0, t1 = cu[b0], cu[b1]
        if t1 == t0:
            continue
        mask = torch.zeros((t1 - t0, t1 - t0), dtype=torch.bool)
        for b in range(b0, b1):
            for i in range(cu[b], cu[b + 1]):
                mask[i - t0, cu[b] - t0 + ks_l[i]: cu[b] - t0 + ke_l[i]] = True
        mask = mask.cuda()
        empty = ~mask.any(-1)
        qs, kk, vv = (x[t0:t1].transpose(0, 1) for x in (q, k, v))
        kk, vv = kk.repeat_interleave(group, 0), vv.repeat_interleave(group, 0)
        if dtype == torch.float64:
            for h in range(Hq):  # one head at a time: a 8k x 8k float64 score matrix is 512 MiB
                s = scale * qs[h].double() @ kk[h].double().T
                s = s.masked_fill(~mask, float("-inf"))
                l_h = torch.logsumexp(s, -1)
                p = torch.nan_to_num(torch.exp(s - l_h[:, None]), nan=0.0)
                out[t0:t1, h] = p @ vv[h].double()
                lse[h, t0:t1] = l_h
        else:
            o = F.scaled_dot_product_attention(qs[None], kk[None], vv[None], attn_mask=mask, scale=scale)[0]
            out[t0:t1] = o.transpose(0, 1).masked_fill(empty[:, None, None], 0)
    return out, lse


def check(q, k, v, lay, *, max_seqlen=None, scale=None, what=""):
    cu, ks, ke = lay
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = fwd(q, k, v, cu, ks, ke, max_seqlen, scale)
    torch.cuda.synchronize()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    cu_l = cu.tolist()
    ref, ref_lse = dense_reference(q, k, v, cu_l, ks, ke, scale, torch.float64)
    sdpa, _ = dense_reference(q, k, v, cu_l, ks, ke, scale, q.dtype)
    assert not out.isnan().any(), f"{what}: NaN in out (an element not written, or a masked NaN)"
    assert not lse.isnan().any(), f"{what}: NaN in lse"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all()), f"{what}: empty rows' lse"
    assert bool((out.transpose(0, 1)[empty] == 0).all()), f"{what}: empty rows' out must be 0"
    # Within 2x PyTorch's own error in this dtype, in absolute terms (|out| <~ 1), plus one rounding of
    # the dtype at 1 (2^-8 bf16, 2^-11 fp16) for layouts where SDPA happens to be exact, e.g. single-key rows.
    assert_within_2x_of_torch(out, sdpa, ref, floor=unit_roundoff(q.dtype), scale=1.0, what=f"{what}: out")
    ok = ~empty
    assert_close(lse[ok], ref_lse[ok], tol(q.dtype, "attention_lse"), what=f"{what}: lse")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_layouts(mask_kind, shape, dtype, seed):
    Hq, Hkv, D = SHAPES[shape]
    spans = random_spans(6, seed=10 * seed + 3, max_len=90)  # empty P and G spans included
    lay = layout_from_intervals(*intervals_from_table(spans, mask_kind))
    T = int(lay[0][-1])
    q, k, v = random_qkv(T, Hq, Hkv, D, dtype, seed)
    check(q, k, v, lay, what=f"{mask_kind} {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 2, 17, 63, 64, 65, 127, 128, 129, 300])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_awkward_lengths(L, mask_kind, dtype):
    Lq = max(1, L // 3)
    Ld = max(1, L // 3) if L >= 2 else 0
    spans = torch.tensor([[Lq, Ld, max(0, L - Lq - Ld - L // 5), 0]], dtype=torch.int32)
    spans[0, 3] = L - int(spans[0, :3].sum())
    if mask_kind in ("ttm", "stm") and (spans[0, 0] < 1 or spans[0, 1] < 1):
        pytest.skip("ttm / stm need Lq, Ld >= 1")
    lay = layout_from_intervals(*intervals_from_table(spans, mask_kind))
    q, k, v = random_qkv(L, 6, 2, 64, dtype, L)
    check(q, k, v, lay, what=f"L={L} {mask_kind}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_empty_sequences_and_rows(dtype, D):
    """Arbitrary intervals: empty rows, rows with one key, a sequence whose rows are all empty, empty
    sequences at the start, middle and end of cu_seqlens."""
    g = torch.Generator().manual_seed(D)
    lengths = [0, 5, 0, 0, 130, 1, 70, 0, 200, 64, 0]
    cu, ks, ke = [0], [], []
    for b, L in enumerate(lengths):
        for i in range(L):
            if b == 6:  # all rows empty
                lo = hi = int(torch.randint(0, L + 1, (1,), generator=g))
            else:
                lo, hi = sorted(torch.randint(0, L + 1, (2,), generator=g).tolist())
                if torch.rand(1, generator=g) < 0.2:
                    hi = lo
            ks.append(lo)
            ke.append(hi)
        cu.append(cu[-1] + L)
    lay = layout_from_intervals(cu, ks, ke)
    q, k, v = random_qkv(cu[-1], 4, 2, D, dtype, 1)
    check(q, k, v, lay, what="empty sequences and rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_inputs(dtype):
    """Transposed views, slices of a fused qkv projection and a storage offset that breaks 16-byte
    alignment (the op copies such an input): the same bits as contiguous inputs."""
    spans = random_spans(4, seed=5, max_len=70)
    lay = layout_from_intervals(*intervals_from_table(spans, "ttm"))
    T, Hq, Hkv, D = int(lay[0][-1]), 6, 2, 128
    q, k, v = random_qkv(T, Hq, Hkv, D, dtype, 3)
    base, base_lse = check(q, k, v, lay, what="contiguous")
    cu, ks, ke = lay
    # [H, T, D] storage seen as [T, H, D]
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    # one fused [T, Hq + 2 Hkv, D] buffer
    fused = torch.cat([q, k, v], dim=1)
    qf, kf, vf = fused[:, :Hq], fused[:, Hq:Hq + Hkv], fused[:, Hq + Hkv:]
    # a storage offset of one element: not 16-byte aligned
    buf = torch.empty(q.numel() + 1, dtype=dtype, device="cuda")
    qm = buf[1:].view(q.shape)
    qm.copy_(q)
    for name, args in {"transposed": (qt, kt, vt), "fused": (qf, kf, vf), "misaligned": (qm, k, v)}.items():
        out, lse = fwd(*args, cu, ks, ke)
        assert torch.equal(out, base) and torch.equal(lse, base_lse), name


def test_many_tiny_sequences():
    """1000 sequences of 1-8 tokens: one tile each, the grid bound T / 64 + B in use."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (1000,), generator=g).tolist()
    cu, ks, ke = [0], [], []
    for L in lengths:
        for i in range(L):
            ks.append(0)
            ke.append(i + 1)
        cu.append(cu[-1] + L)
    lay = layout_from_intervals(cu, ks, ke)
    q, k, v = random_qkv(cu[-1], 12, 2, 128, torch.bfloat16, 0)
    check(q, k, v, lay, what="1000 tiny sequences")


@pytest.mark.parametrize("mask_kind", ["ttm", "causal"])
def test_long_batch_64k(mask_kind):
    """T = 65,536: 8 sequences of 8,192 tokens (the long-document regime)."""
    spans = torch.tensor([[256, 7680, 16, 240]] * 8, dtype=torch.int32)
    lay = layout_from_intervals(*intervals_from_table(spans, mask_kind))
    assert int(lay[0][-1]) == 65536
    q, k, v = random_qkv(65536, 12, 2, 128, torch.bfloat16, 4)
    check(q, k, v, lay, what=f"64k {mask_kind}")


def test_max_seqlen_and_repeatability():
    """max_seqlen given or omitted, and a second run: the same bits (no atomics, a fixed order)."""
    spans = random_spans(8, seed=9, max_len=150)
    lay = layout_from_intervals(*intervals_from_table(spans, "stm"))
    T = int(lay[0][-1])
    max_len = int((lay[0][1:] - lay[0][:-1]).max())
    q, k, v = random_qkv(T, 12, 2, 128, torch.bfloat16, 2)
    a = fwd(q, k, v, *lay, None)
    b = fwd(q, k, v, *lay, max_len)
    c = fwd(q, k, v, *lay, None)
    for x, y in ((a, b), (a, c)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_scale_and_large_logits():
    """A large softmax scale (peaked rows) and a tiny one (flat rows)."""
    spans = random_spans(4, seed=2, max_len=80)
    lay = layout_from_intervals(*intervals_from_table(spans, "ttm"))
    q, k, v = random_qkv(int(lay[0][-1]), 4, 1, 64, torch.float16, 6)
    for scale in (1.0, 1e-3):
        check(q, k, v, lay, scale=scale, what=f"scale {scale}")


def test_public_operator_routes_here(monkeypatch):
    """Under UGD_CUDA_ATTENTION=1 the public operator gives the kernel's bits."""
    monkeypatch.setenv(cuda_attention.ENV, "1")
    spans = random_spans(5, seed=4, max_len=60)
    lay = layout_from_intervals(*intervals_from_table(spans, "ttm"))
    q, k, v = random_qkv(int(lay[0][-1]), 12, 2, 128, torch.bfloat16, 8)
    assert cuda_attention.serves(q, k, v)
    scale = 1 / math.sqrt(128)
    direct = torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, *lay, None, scale)
    routed = torch.ops.ugd_ops.partitioned_attention_fwd(q, k, v, *lay, None, scale)
    assert torch.equal(direct[0], routed[0]) and torch.equal(direct[1], routed[1])


def test_unserved_inputs_raise():
    """The internal op serves bf16 / fp16 with D 64 or 128 only, and says where the rest goes."""
    lay = layout_from_intervals([0, 3], [0, 0, 0], [1, 2, 3])
    q, k, v = random_qkv(3, 2, 2, 32, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, *lay, None, 1.0)
    q, k, v = random_qkv(3, 2, 2, 64, torch.float32, 0)
    with pytest.raises(ValueError, match="partitioned_attention_fwd"):
        torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, *lay, None, 1.0)


def test_scale_beyond_fp32_raises():
    """A softmax_scale finite as a double but not after the kernel's fp32 scale * log2(e): a ValueError,
    not a tensor of inf / NaN."""
    lay = layout_from_intervals([0, 3], [0, 0, 0], [1, 2, 3])
    q, k, v = random_qkv(3, 2, 2, 64, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="softmax_scale"):
        torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, *lay, None, 1e39)


def test_broken_layout_stays_in_bounds():
    """A layout that breaks the contract (what reaches the kernel when the layout check is skipped, e.g.
    under CUDA-graph capture): cu_seqlens not from 0 to T, decreasing, past T; intervals reversed,
    negative, past their sequence. The values are meaningless, but nothing is read or written out of
    bounds: no CUDA error here, and run under `compute-sanitizer --tool memcheck` it reports nothing."""
    T = 300
    g = torch.Generator().manual_seed(7)
    cu = [5, 150, 20, 290, 400, 260]
    ks = torch.randint(-80, 400, (T,), generator=g, dtype=torch.int32).tolist()
    ke = torch.randint(-80, 400, (T,), generator=g, dtype=torch.int32).tolist()
    lay = layout_from_intervals(cu, ks, ke)
    for D in (64, 128):
        q, k, v = random_qkv(T, 4, 2, D, torch.float16, D)
        out, lse = torch.ops.ugd_ops._cuda_attention_fwd(q, k, v, *lay, None, D ** -0.5)
        torch.cuda.synchronize()
        assert out.shape == q.shape and lse.shape == (4, T)

"""The CUDA attention backward kernel (ugd_ops::_cuda_attention_bwd, csrc/cuda/attention/bwd_*) on a
GPU: gradients against float64 (with and without dlse), awkward sizes, empty sequences and rows,
GQA 6:1 and 1:1, bf16/fp16 within 2x the error of PyTorch's own backward in that dtype, poisoned
outputs, strided inputs, determinism, CUDA-graph capture (no host sync), and, through the public
operator with UGD_CUDA_ATTENTION=1, opcheck and torch.compile(fullgraph=True) over forward +
backward. The whole module is skipped without a CUDA device or without the compiled kernel.

The CPU-side parts (schedule, skips, the per-tile algorithm emulated lane by lane) are tested by
ctest: csrc/tests/test_attention_bwd_schedule.cpp.
"""

import pytest
import torch
from tests.numerics import assert_within_2x_of_torch, eps, nan_fill_cuda_memory, rel_err, tol
from tests.oracles import attention_dense, intervals_from_table, mask_from_intervals, torch_attention_grads_in_dtype

import ugd_ops
from ugd_ops import cuda_attention, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not cuda_attention.compiled(cuda_attention.BWD_OP),
        reason="this build has no CUDA attention backward kernel",
    ),
]

MASKS = ["ttm", "stm", "causal", "bidirectional"]
SHAPES = {"gqa6": (6, 1, 64), "mha": (2, 2, 128), "gqa3": (6, 2, 128), "mha64": (4, 4, 64)}
DTYPES = [torch.bfloat16, torch.float16]
# Gradients are held to the 2x rule of tests/numerics.py: against float64 and relative to the largest
# gradient, an error at most twice that of PyTorch's own dense attention backward in the same dtype
# (tests.oracles.torch_attention_grads_in_dtype) plus one epsilon of the dtype. The fixed tolerances
# used before the rule stay as a ceiling, numerics.TOL[dtype]["attention_bwd"]: a few units of the
# dtype's epsilon (P and dS are rounded to 16 bits for the second products).


DEVICE = "cuda"


def op(*args):
    return torch.ops.ugd_ops._cuda_attention_bwd(*args)


def make_layout(spans, mask_kind):
    cu, ks, ke = intervals_from_table(torch.tensor(spans), mask_kind)
    mask = mask_from_intervals(cu, ks, ke)
    return [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (cu, ks, ke)], mask


def random_spans(B, lens, seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: lens[int(torch.randint(len(lens), (1,), generator=g))]  # noqa: E731
    return [(max(1, pick()), max(1, pick()), pick() // 4, pick() // 2) for _ in range(B)]


def inputs(T, shape, dtype, seed):
    Hq, Hkv, D = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda H, s: (s * torch.randn(T, H, D, generator=g, dtype=torch.float64)).to(DEVICE, dtype)  # noqa: E731
    return mk(Hq, 1.5), mk(Hkv, 1.5), mk(Hkv, 1.0), mk(Hq, 1.0)


def forward_saved(q, k, v, mask, scale):
    """out (in q's dtype) and lse (fp32) as the forward saves them, from a float64 forward."""
    out, lse = attention_dense(q.cpu(), k.cpu(), v.cpu(), mask, scale)
    return out.to(DEVICE, q.dtype), lse.to(DEVICE, torch.float32)


def truth(q, k, v, mask, scale, dout, dlse):
    """float64 gradients of sum(out * dout) + sum(lse * dlse) (dlse of empty rows ignored)."""
    qd, kd, vd = (x.detach().cpu().double().requires_grad_(True) for x in (q, k, v))
    out, lse = attention_dense(qd, kd, vd, mask, scale)
    loss = (out * dout.cpu().double()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * torch.nan_to_num(dlse.cpu().double(), 0, 0, 0)).sum()
    return torch.autograd.grad(loss, (qd, kd, vd))


def within_2x(got, theirs, want, dtype, what, ceiling=1.0):
    """The 2x rule (relative to the largest gradient, floor one epsilon of the dtype), and under
    ``ceiling`` x TOL[dtype]["attention_bwd"], the fixed bound this module used before the rule."""
    assert_within_2x_of_torch(got, theirs, want, floor=eps(dtype), what=f"{what} ({dtype})")
    err = rel_err(got, want)
    assert err <= ceiling * tol(dtype, "attention_bwd"), f"{what}: relative error {err:.3g}"


def check(spans_or_layout, mask_kind, shape, dtype, seed, with_dlse=True):
    (cu, ks, ke), mask = make_layout(spans_or_layout, mask_kind)
    T = int(cu[-1])
    q, k, v, dout = inputs(T, shape, dtype, seed)
    scale = shape[2] ** -0.5
    out, lse = forward_saved(q, k, v, mask, scale)
    dlse = None
    if with_dlse:
        dlse = 0.5 * torch.randn(lse.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        dlse = dlse.to(DEVICE, torch.float32).masked_fill(torch.isinf(lse), float("inf"))
    dq, dk, dv = op(dout, q, k, v, out, lse, dlse, cu, ks, ke, None, scale)
    want = truth(q, k, v, mask, scale, dout, dlse)
    theirs = torch_attention_grads_in_dtype(q, k, v, mask, scale, dout, dlse)
    for name, got, w, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want, theirs):
        assert got.dtype == dtype and got.shape == w.shape, name
        within_2x(got, b, w, dtype, name)
    return (dq, dk, dv), want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_random_layouts(mask_kind, shape, dtype):
    check(random_spans(4, [1, 17, 40, 127], seed=3), mask_kind, SHAPES[shape], dtype, seed=1)


@pytest.mark.parametrize("with_dlse", [True, False])
def test_dlse(with_dlse):
    check(random_spans(3, [17, 64, 90], seed=5), "ttm", SHAPES["gqa6"], torch.bfloat16, seed=2, with_dlse=with_dlse)


@pytest.mark.parametrize("L", [1, 17, 63, 64, 65, 127, 128, 129])
@pytest.mark.parametrize("mask_kind", ["causal", "bidirectional"])
def test_awkward_lengths(L, mask_kind):
    check([(L, 0, 0, 0)], mask_kind, SHAPES["gqa6"], torch.bfloat16, seed=L)


def test_empty_sequences_and_rows():
    spans = [(0, 0, 0, 0), (3, 0, 0, 0), (0, 0, 0, 0), (70, 0, 0, 0), (0, 0, 0, 0)]
    cu, ks, ke = intervals_from_table(torch.tensor(spans), "causal")
    ke = list(ke)
    for i in (0, 5, 40, 72):  # empty rows: [kv_start, kv_end) = [0, 0)
        ke[i] = ks[i]
    mask = mask_from_intervals(cu, ks, ke)
    lay = [torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in (cu, ks, ke)]
    T = cu[-1]
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 0)
    out, lse = forward_saved(q, k, v, mask, 0.125)
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), float("nan"))
    empty_rows = torch.tensor([0, 5, 40, 72], device=DEVICE)
    # NaN in the empty rows' out (their delta is NaN): rows that read nothing contribute exactly 0.
    out[empty_rows] = float("nan")
    dq, dk, dv = op(dout, q, k, v, out, lse, dlse, *lay, None, 0.125)
    want = truth(q, k, v, mask, 0.125, dout, dlse)
    theirs = torch_attention_grads_in_dtype(q, k, v, mask, 0.125, dout, dlse)
    for name, got, w, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want, theirs):
        within_2x(got, b, w, torch.bfloat16, name)
    assert (dq[empty_rows] == 0).all()


@pytest.mark.parametrize("T", [5, 100])
def test_no_sequence_gives_zeros(T):
    """B = 0 (a broken layout that only a skipped host-side check lets through): zeros, as the
    forward gives out 0 -- not unwritten memory, not an invalid launch (max_tiles is 0 for T < 64)."""
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 0)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    ks = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    lse = torch.full((SHAPES["gqa6"][0], T), float("-inf"), device=DEVICE)
    nan_fill_cuda_memory(64 << 20, device=DEVICE)
    dq, dk, dv = op(dout, q, k, v, torch.zeros_like(q), lse, None, cu, ks, ks, None, 0.125)
    assert all((x == 0).all() for x in (dq, dk, dv))


def test_poisoned_outputs():
    """Outputs land in memory full of NaN (the caching allocator reuses it): every element is written."""
    spans = random_spans(3, [17, 64, 127], seed=9)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 4)
    out, lse = forward_saved(q, k, v, mask, 0.125)
    for _ in range(3):
        nan_fill_cuda_memory(256 << 20, device=DEVICE)
        dq, dk, dv = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.125)
        assert all(torch.isfinite(x).all() for x in (dq, dk, dv))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_low_precision_within_2x_of_pytorch(dtype, mask_kind):
    """Errors against float64 at most twice those of PyTorch's own dense backward in that dtype."""
    spans = random_spans(3, [17, 50, 127], seed=11)
    (cu, ks, ke), mask = make_layout(spans, mask_kind)
    T = int(cu[-1])
    shape = SHAPES["gqa3"]
    q, k, v, dout = inputs(T, shape, dtype, 6)
    scale = shape[2] ** -0.5
    out, lse = forward_saved(q, k, v, mask, scale)
    ours = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, scale)
    want = truth(q, k, v, mask, scale, dout, None)
    torch_grads = torch_attention_grads_in_dtype(q, k, v, mask, scale, dout, None)  # PyTorch in the dtype, on the GPU
    for name, a, b, w in zip(("dq", "dk", "dv"), ours, torch_grads, want):
        assert_within_2x_of_torch(a, b, w, floor=eps(dtype), what=name)


def test_strided_inputs():
    """Token / head strides of views (no copy), including ones that rule out 16-byte vector loads."""
    spans = random_spans(3, [17, 70], seed=13)
    (cu, ks, ke), mask = make_layout(spans, "stm")
    T = int(cu[-1])
    Hq, Hkv, D = SHAPES["gqa3"]
    q, k, v, dout = inputs(T, (Hq, Hkv, D), torch.bfloat16, 8)
    out, lse = forward_saved(q, k, v, mask, 0.1)
    want = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.1)
    wide = torch.zeros(T, Hq + 1, D + 2, device=DEVICE, dtype=torch.bfloat16)  # head stride D + 2: not 16-byte
    wide[:, 1:, :D] = q
    q_odd = wide[:, 1:, :D]
    fused = torch.cat([k, v], dim=1)  # k, v as views of one [T, 2 Hkv, D] (a fused projection)
    got = op(dout, q_odd, fused[:, :Hkv], fused[:, Hkv:], out, lse, None, cu, ks, ke, None, 0.1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_deterministic():
    spans = random_spans(4, [17, 127, 200], seed=17)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 9)
    out, lse = forward_saved(q, k, v, mask, 0.125)
    first = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.125)
    torch.use_deterministic_algorithms(True)
    try:
        second = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.125)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_graph_capture():
    """No host synchronisation: the op can be captured in a CUDA graph and replayed."""
    spans = random_spans(3, [17, 90], seed=19)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = inputs(T, SHAPES["mha"], torch.float16, 10)
    out, lse = forward_saved(q, k, v, mask, 0.1)
    want = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.1)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = op(dout, q, k, v, out, lse, None, cu, ks, ke, None, 0.1)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_rejects_what_it_does_not_serve():
    (cu, ks, ke), mask = make_layout([(5, 0, 0, 0)], "causal")
    q, k, v, dout = inputs(5, (2, 1, 32), torch.bfloat16, 0)
    lse = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        op(dout, q, k, v, q, lse, None, cu, ks, ke, None, 0.1)


# ---------------------------------------------------------------------------------------------
# Through the public operator (the routing of ugd_ops/cuda_attention.py), switched on
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def switched_on(monkeypatch):
    monkeypatch.setenv(cuda_attention.ENV, "1")
    probe = torch.zeros(1, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    if not cuda_attention.serves(probe, probe, probe, op=cuda_attention.BWD_OP):
        pytest.skip(cuda_attention.unserved_reason(probe, probe, probe, op=cuda_attention.BWD_OP))


def test_opcheck(switched_on):
    spans = random_spans(2, [17, 70], seed=23)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 11)
    out, lse = forward_saved(q, k, v, mask, 0.125)
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    torch.library.opcheck(
        torch.ops.ugd_ops.partitioned_attention_bwd.default,
        (dout, q, k, v, out, lse, dlse, cu, ks, ke, None, 0.125),
    )


def test_compile_fullgraph_forward_backward(switched_on):
    spans = random_spans(3, [17, 70, 127], seed=29)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = inputs(T, SHAPES["gqa6"], torch.bfloat16, 12)

    def loss_fn(q, k, v):
        out, lse = ugd_ops.partitioned_attention(q, k, v, cu, ks, ke, softmax_scale=0.125, return_lse=True)
        return (out.float() * dout.float()).sum() + lse.masked_fill(torch.isinf(lse), 0).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    compiled(*leaves).backward()
    eager = [x.detach().requires_grad_(True) for x in (q, k, v)]
    loss_fn(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)
    dlse = torch.ones(q.shape[1], T, dtype=torch.float64)
    want = truth(q, k, v, mask, 0.125, dout, dlse)
    theirs = torch_attention_grads_in_dtype(q, k, v, mask, 0.125, dout, dlse)  # PyTorch's forward and backward in bf16
    for name, a, w, b in zip(("dq", "dk", "dv"), leaves, want, theirs):
        within_2x(a.grad, b, w, torch.bfloat16, name, ceiling=2.0)  # forward and backward: twice the ceiling


def test_reference_matches_truth_here():
    """The float64 truth used above is the reference operator's definition (sanity of this module)."""
    spans = random_spans(2, [17, 40], seed=31)
    (cu, ks, ke), mask = make_layout(spans, "ttm")
    T = int(cu[-1])
    q, k, v, dout = (x.double() for x in inputs(T, SHAPES["gqa6"], torch.float32, 13))
    out, lse = attention_dense(q.cpu(), k.cpu(), v.cpu(), mask, 0.125)
    dlse = torch.randn_like(lse)
    got = reference.partitioned_attention_bwd(
        dout.cpu(), q.cpu(), k.cpu(), v.cpu(), out, lse, dlse, cu.cpu(), ks.cpu(), ke.cpu(), None, 0.125
    )
    for a, b in zip(got, truth(q, k, v, mask, 0.125, dout, dlse)):
        torch.testing.assert_close(a, b)

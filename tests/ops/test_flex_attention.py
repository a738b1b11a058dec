"""The FlexAttention path of partitioned_attention (ugd_ops/flex.py) and the CUDA routing.

On the CPU: the block tables against the dense mask, flex's eager (dense math) forward/backward with
our BlockMask, mask_mod and lse against the float64 oracle, the compiled CPU flex kernel's forward
(which does skip blocks by our lists), the cache, and the routing decisions. On CUDA (marked): the
whole path as ``partitioned_attention`` runs it, against the oracle, with no host sync; the compiled
CUDA kernel when ``UGD_CUDA_ATTENTION=1`` and it is built.
"""

import os
import warnings

import pytest
import torch
from tests.conftest import requires_cuda
from tests.numerics import assert_close, tol
from tests.oracles import attention_dense
from tests.ops.test_attention import MASKS, check_against_oracle, layout, randn

import ugd_ops
from ugd_ops import _backend, cuda_attention, flex
from ugd_ops.ops import attention_path
from ugd_ops.workloads import random_spans

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without flex_attention")

SHAPES = {"gqa6": (6, 1, 64), "mha": (2, 2, 128), "gqa3-d16": (6, 2, 16)}


def _layout(mask_kind, seed, n=5, max_len=45, device="cpu"):
    spans = random_spans(n, seed=10 * seed + 7, max_len=max_len)  # empty P and G spans included
    return layout(spans, mask_kind, device)


def _inputs(lay, shape, dtype, device, seed):
    Hq, Hkv, D = SHAPES[shape]
    T = int(lay[0][-1])
    return [randn((T, h, D), dtype, device, seed + i) for i, h in enumerate((Hq, Hkv, Hkv))]


# ---------------------------------------------------------------------------------------------
# block mask (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("block", [8, 16, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_tables_cover_the_mask_and_full_blocks_are_full(mask_kind, block, seed):
    (cu, ks, ke), mask = _layout(mask_kind, seed)
    T = mask.shape[0]
    lo, hi = flex.row_bounds(cu, ks, ke)
    dense = torch.zeros((T, T), dtype=torch.bool)
    for i in range(T):
        dense[i, lo[i]:hi[i]] = True
    assert torch.equal(dense, mask)
    partial, full = flex.block_tables(lo, hi, block)
    n = -(-T // block)
    assert partial.shape == full.shape == (n, n)
    assert not (partial & full).any()
    padded = torch.zeros((n * block, n * block), dtype=torch.bool)
    padded[:T, :T] = mask
    blocks = padded.view(n, block, n, block)
    any_allowed = blocks.any(dim=(1, 3))
    # a skipped block holds no allowed pair; a full block holds nothing else (within the real rows and keys)
    assert not (any_allowed & ~(partial | full)).any()
    for qb, kb in full.nonzero().tolist():
        rows = slice(qb * block, min((qb + 1) * block, T))
        assert (kb + 1) * block <= T and bool(mask[rows, kb * block:(kb + 1) * block].all())
    if block == 8 and mask_kind == "bidirectional":
        assert full.any()  # the full-block lists are actually used


def test_block_mask_counts_and_indices():
    (cu, ks, ke), mask = _layout("stm", 3, n=8)
    bm = flex.build_block_mask(cu, ks, ke)
    lo, hi = flex.row_bounds(cu, ks, ke)
    partial, full = flex.block_tables(lo, hi)
    assert torch.equal(bm.kv_num_blocks[0, 0], partial.sum(-1).int())
    assert torch.equal(bm.full_kv_num_blocks[0, 0], full.sum(-1).int())
    for qb in range(partial.shape[0]):
        listed = bm.kv_indices[0, 0, qb, : int(bm.kv_num_blocks[0, 0, qb])].tolist()
        assert listed == partial[qb].nonzero().flatten().tolist()  # ascending, exactly the partial ones


def test_block_mask_cache_reuses_and_invalidates():
    flex.clear_cache()
    (cu, ks, ke), _ = _layout("ttm", 0)
    a = flex.block_mask(cu, ks, ke)
    assert flex.block_mask(cu, ks, ke) is a  # every layer of one forward
    ke2 = ke.clone()
    assert flex.block_mask(cu, ks, ke2) is not a  # same values, another tensor: no identity to rely on
    ke.add_(0)  # in place: the version counter moves
    assert flex.block_mask(cu, ks, ke) is not a
    flex.clear_cache()


# ---------------------------------------------------------------------------------------------
# flex's eager implementation with our BlockMask (CPU): values, lse convention, gradients incl. dlse
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_backward(monkeypatch):
    """flex refuses requires_grad on the CPU at its entry (its compiled CPU kernel has no backward); its
    eager path is flex's own dense math with the same autograd, which is what this test needs."""
    from torch.nn.attention import flex_attention as module

    monkeypatch.setattr(module, "_validate_device", lambda *a, **k: None, raising=False)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_eager_flex_matches_the_oracle(mask_kind, shape, cpu_backward, monkeypatch):
    lay, mask = _layout(mask_kind, 1)
    q, k, v = _inputs(lay, shape, torch.float64, "cpu", 5)

    def eager(q, k, v, cu, ks, ke, *, softmax_scale, return_lse):
        out = flex.partitioned_attention(q, k, v, cu, ks, ke, softmax_scale, compiled=False)
        return out if return_lse else out[0]

    monkeypatch.setattr(ugd_ops, "partitioned_attention", eager)
    check_against_oracle(q, k, v, lay, mask, purpose="flex", seed=3)


# ---------------------------------------------------------------------------------------------
# the compiled flex kernel on the CPU: forward only (flex's CPU kernel has neither backward nor lse)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["ttm", "bidirectional"])
def test_compiled_cpu_flex_skips_blocks_correctly(mask_kind):
    from torch.nn.attention.flex_attention import flex_attention

    lay, mask = _layout(mask_kind, 2, n=4, max_len=120)  # several 128-blocks, skipped, full and partial
    cu, ks, ke = lay
    q, k, v = _inputs(lay, "gqa3-d16", torch.float32, "cpu", 9)
    bm = flex.build_block_mask(cu, ks, ke)
    assert int(bm.full_kv_num_blocks.sum()) > 0 or mask_kind != "bidirectional"
    assert int((bm.kv_num_blocks + bm.full_kv_num_blocks).sum()) < bm.kv_num_blocks.shape[-1] ** 2
    fn = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        out = fn(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=bm, enable_gqa=True)
    ref, _ = attention_dense(q.double(), k.double(), v.double(), mask, 16**-0.5)
    assert_close(out[0].transpose(0, 1), ref, tol(torch.float32, "attention"))


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------


def test_routing_decisions_on_the_cpu(monkeypatch):
    q = torch.zeros(4, 2, 64)
    assert attention_path(q, q, q) == ("cpu" if _backend.compiled else "reference")
    assert cuda_attention.unserved_reason(q, q, q) == "not a CUDA tensor"
    assert "not a CUDA tensor" in flex.unserved_reason(q, q, q)
    assert flex.case_reason(torch.bfloat16, 128) is None
    assert "dtype" in flex.case_reason(torch.float64, 128)
    assert "head dim" in flex.case_reason(torch.bfloat16, 80)
    monkeypatch.setenv(flex.ENV, "0")
    assert "switched off" in flex.case_reason(torch.bfloat16, 128)
    monkeypatch.setenv(cuda_attention.ENV, "0")
    assert cuda_attention.switch() == "off" and not cuda_attention.enabled()
    monkeypatch.setenv(cuda_attention.ENV, "1")
    assert cuda_attention.enabled()
    if not cuda_attention.compiled():
        assert cuda_attention.case_reason(torch.bfloat16, 128) == "this build has no CUDA attention kernel"


def test_a_new_layout_does_not_recompile(monkeypatch):
    """Every batch brings a new block mask (a new ``mask_mod`` closure over new tensors) and a new T:
    after dynamo's one automatic-dynamic recompile, further layouts reuse the compiled graph. The
    guards are dynamo's, whatever the backend, so ``aot_eager`` checks on the CPU what the CUDA path
    relies on (inductor on CPU has no lse)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    monkeypatch.setattr(flex, "_compiled_fn", torch.compile(flex.flex_attention, backend="aot_eager"))
    flex.clear_cache()
    graphs = []
    for seed in range(5):
        (cu, ks, ke), _ = _layout("ttm", seed, n=6, max_len=60)
        q, k, v = _inputs((cu, ks, ke), "gqa6", torch.float32, "cpu", seed)
        with torch.no_grad():
            flex.partitioned_attention(q, k, v, cu, ks, ke, 0.125)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[-1] - graphs[0] <= 1 and graphs[-1] == graphs[2], graphs
    torch._dynamo.reset()


@pytest.mark.skipif(not _backend.compiled, reason="the router exists in the compiled build")
def test_cuda_router_falls_back_to_the_reference_with_one_warning():
    (cu, ks, ke), mask = _layout("stm", 0)
    q, k, v = _inputs((cu, ks, ke), "mha", torch.float32, "cpu", 1)
    router = _backend._attention_router("partitioned_attention_fwd")
    with pytest.warns(RuntimeWarning, match="reference"):
        out, lse = router(q, k, v, cu, ks, ke, None, 128**-0.5)
    ref, ref_lse = attention_dense(q.double(), k.double(), v.double(), mask, 128**-0.5)
    assert_close(out, ref, tol(torch.float32, "attention"))


def test_info_reports_the_attention_paths():
    from ugd_ops import info

    text = info.report()
    assert "partitioned attention on CUDA" in text and "FlexAttention: available" in text
    paths = {(dt, d): p for dt, d, p, _ in info.attention_cases()}
    expect_kernel = cuda_attention.case_reason(torch.bfloat16, 128) is None
    assert paths[("bfloat16", 128)] == ("compiled CUDA kernel" if expect_kernel else "flex")
    assert paths[("float64", 64)] == "reference"


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_cuda_flex_path_matches_the_oracle(mask_kind, shape, monkeypatch):
    monkeypatch.setenv(cuda_attention.ENV, "0")  # the flex path, whatever kernel is compiled
    lay, mask = _layout(mask_kind, 4, n=8, max_len=90, device="cuda")
    q, k, v = _inputs(lay, shape, torch.float32, "cuda", 2)
    assert attention_path(q, k, v) == "flex"
    check_against_oracle(q, k, v, lay, mask, purpose="flex", seed=1)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    check_against_oracle(qb, kb, vb, lay, mask, purpose="flex", seed=2)


@requires_cuda
def test_cuda_flex_builds_the_block_mask_once_without_host_sync(monkeypatch):
    monkeypatch.setenv(cuda_attention.ENV, "0")
    flex.clear_cache()
    lay, _ = _layout("stm", 5, n=16, max_len=200, device="cuda")
    q, k, v = (x.requires_grad_() for x in _inputs(lay, "mha", torch.bfloat16, "cuda", 3))
    ugd_ops.partitioned_attention(q, k, v, *lay)  # compile outside the sync check
    flex.clear_cache()
    builds = []
    real = flex.build_block_mask
    monkeypatch.setattr(flex, "build_block_mask", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = q
        for _ in range(4):  # four "layers" of one batch
            x = ugd_ops.partitioned_attention(x, k, v, *lay)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.float().sum().backward()
    assert len(builds) == 1 and q.grad is not None and torch.isfinite(q.grad).all()


@requires_cuda
@pytest.mark.skipif(not cuda_attention.compiled(), reason="this build has no CUDA attention kernel")
@pytest.mark.parametrize("mask_kind", MASKS)
def test_cuda_kernel_path_when_switched_on(mask_kind, monkeypatch):
    monkeypatch.setenv(cuda_attention.ENV, "1")
    lay, mask = _layout(mask_kind, 6, n=8, max_len=90, device="cuda")
    for dtype in cuda_attention.DTYPES:
        q, k, v = _inputs(lay, "mha", dtype, "cuda", 4)
        assert attention_path(q, k, v) == "cuda-kernel"
        check_against_oracle(q, k, v, lay, mask, purpose="attention", seed=5)


def test_ops_run_sees_nested_operator_calls():
    """What the routing test below relies on, checked on the CPU: the profiler names the operators a call
    ran, the custom op and those inside it."""
    (cu, ks, ke), _ = _layout("stm", 1)
    q, k, v = _inputs((cu, ks, ke), "gqa3-d16", torch.float32, "cpu", 2)
    ran = ops_run(lambda: torch.ops.ugd_ops.partitioned_attention_fwd(q, k, v, cu, ks, ke, None, 0.25))
    assert "ugd_ops::partitioned_attention_fwd" in ran
    ran = ops_run(lambda: ugd_ops.reference.partitioned_attention_fwd(q, k, v, cu, ks, ke, None, 0.25))
    assert "ugd_ops::partitioned_attention_fwd" not in ran and any(n.startswith("aten::") for n in ran)


def ops_run(fn) -> set:
    """The names of the dispatcher operators ``fn()`` ran (nested calls included), from the profiler's
    record of each operator call: which implementation a router chose."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@requires_cuda
def test_direct_operator_call_routes_to_the_kernel_when_switched_on(monkeypatch):
    """UGD_CUDA_ATTENTION is read when the test runs (a plain pytest on a GPU runs this test), and the
    test checks which path ran: the compiled kernel op, not the reference the router falls back to."""
    if not cuda_attention.compiled():
        if os.environ.get(cuda_attention.ENV) == "1":
            pytest.fail(f"{cuda_attention.ENV}=1 but this build has no CUDA attention kernel")
        pytest.skip("this build has no CUDA attention kernel")
    monkeypatch.setenv(cuda_attention.ENV, "1")
    lay, mask = _layout("ttm", 7, device="cuda")
    q, k, v = _inputs(lay, "mha", torch.bfloat16, "cuda", 6)
    assert attention_path(q, k, v) == "cuda-kernel"
    result = []
    ran = ops_run(lambda: result.append(torch.ops.ugd_ops.partitioned_attention_fwd(q, k, v, *lay, None, 128**-0.5)))
    assert f"ugd_ops::{cuda_attention.FWD_OP}" in ran, sorted(ran)
    out, lse = result[0]
    ref, _ = attention_dense(q.cpu().double(), k.cpu().double(), v.cpu().double(), mask.cpu(), 128**-0.5)
    assert_close(out, ref, tol(torch.bfloat16, "attention"))
    # switched off, the same call does not reach the kernel (the router falls back to the reference)
    monkeypatch.setenv(cuda_attention.ENV, "0")
    with warnings.catch_warnings():  # the router's one warning, unless an earlier test in this process had it
        warnings.simplefilter("ignore", RuntimeWarning)
        ran = ops_run(lambda: torch.ops.ugd_ops.partitioned_attention_fwd(q, k, v, *lay, None, 128**-0.5))
    assert f"ugd_ops::{cuda_attention.FWD_OP}" not in ran, sorted(ran)


def test_hf_layout_conversion_is_done_once_per_forward():
    """Every layer gets the same layout objects; converted ones ([1, n], int64) are converted once, so
    that every layer hands ugd_ops the same tensors and flex builds the block mask once per batch."""
    import ugd.modules.attention as ua

    ks64 = torch.tensor([[0, 0, 1, 1]], dtype=torch.int64)
    a = ua._index_tensor(ks64, "kv_start", torch.device("cpu"))
    assert a.dtype == torch.int32 and a.shape == (4,)
    assert ua._index_tensor(ks64, "kv_start", torch.device("cpu")) is a  # the next layer
    ks64.add_(0)  # changed in place: converted anew
    assert ua._index_tensor(ks64, "kv_start", torch.device("cpu")) is not a
    ks32 = torch.tensor([0, 1], dtype=torch.int32)
    assert ua._index_tensor(ks32, "kv_start", torch.device("cpu")) is ks32  # nothing to convert


@requires_cuda
def test_cuda_hf_model_builds_one_block_mask_per_batch(monkeypatch):
    """A 2-layer model with attn_implementation="ugd" on CUDA: flex serves, one block mask per batch
    (forward and backward), and the result matches the same model on the CPU kernels."""
    pytest.importorskip("transformers")
    from tests.modules.test_hf_attention import make_models, packed_batch, ugd_kwargs

    monkeypatch.setenv(cuda_attention.ENV, "0")
    flex.clear_cache()
    builds = []
    real = flex.build_block_mask
    monkeypatch.setattr(flex, "build_block_mask", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    (model,) = make_models("qwen2", "ugd")
    batch = packed_batch([[3, 5, 3, 4], [2, 4, 3, 2], [5, 2, 3, 3]], "stm")
    want = model(use_cache=False, **ugd_kwargs(batch)).logits
    model.cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in ugd_kwargs(batch).items()}
    got = model(use_cache=False, **kwargs).logits
    got.float().sum().backward()
    assert len(builds) == 1
    assert got.dtype == want.dtype
    assert_close(got, want, tol(torch.float32, "flex"))  # fp32 models: CUDA flex against the CPU kernels

"""linear_cross_entropy against float64 F.cross_entropy(hidden @ weight.T + bias): reductions, per-sample
means (docs/spec.md section 5, paper eq. 3), ignore_index, extremes, gradients of hidden / weight / bias, the custom-op
contract (opcheck, torch.compile) and that the [N, V] logits never exist whole.

CPU always; the CUDA cases (the fp32-output matmul paths) run where a GPU is present.
"""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import DEVICES, requires_cuda
from tests.numerics import TOL, assert_close, magnitude
from torch.utils._python_dispatch import TorchDispatchMode

import ugd_ops
from ugd_ops import chunked_ce

ops = torch.ops.ugd_ops
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Tolerances: numerics.TOL[dtype]["cross_entropy"], relative to the size of what is compared
# (atol = tol * max(1, |reference|.max())). Low-precision inputs are exact in the oracle (it upcasts
# the same values); the differences come from the logits and gradients being rounded to the input
# dtype (CPU matmuls) and from accumulation order.


def make_inputs(N, H, V, dtype, device="cpu", seed=0, bias=True, ignore_every=5, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = ignore_index
    cast = lambda x: x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), (cast(b) if bias else None), targets.to(device)


def oracle(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean", per_sample=None):
    """float64, full logits, F.cross_entropy; 'mean' with every row ignored gives 0 (see docs/losses.md).
    Written apart from ugd_ops: no code of chunked_ce (its row_weights, its eager peer) takes part, so a
    bug there cannot pass by agreeing with itself. Per-sample means (docs/spec.md section 5, paper eq. 3)
    are written out sample by sample (per_sample_by_hand)."""
    if per_sample is not None:
        return per_sample_by_hand(hidden, weight, bias, targets, per_sample, reduction, ignore_index)
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    rows = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # 0 at ignored rows
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    valid = int((targets != ignore_index).sum())
    return rows.sum() / valid if valid else rows.sum() * 0  # F.cross_entropy's "mean" would be 0/0 = NaN


def leaves64(*xs):
    return [None if x is None else x.detach().cpu().double().requires_grad_() for x in xs]


def check_against_oracle(hidden, weight, bias, targets, *, reduction, chunk_size, per_sample=None,
                         ignore_index=-100, tol=None, seed=1):
    loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, per_sample=per_sample,
                                        chunk_size=chunk_size, ignore_index=ignore_index)
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want = oracle(h64, w64, targets.cpu(), b64, ignore_index, reduction,
                  None if per_sample is None else per_sample.cpu())
    tol = tol or TOL[hidden.dtype]["cross_entropy"]
    assert loss.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert loss.shape == want.shape
    assert_close(loss, want, tol, scale=magnitude(want, at_least=1.0), what="loss")
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3  # non-unit
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    inputs64 = [x for x in (h64, w64, b64) if x is not None]
    got = torch.autograd.grad((loss * up.to(loss)).sum(), inputs)
    ref = torch.autograd.grad((want * up).sum(), inputs64)
    for g, r, x in zip(got, ref, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(g, r, tol, scale=magnitude(r, at_least=1.0), what="gradient")
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_against_cross_entropy(device, dtype, reduction, with_bias):
    # 41 rows in chunks of 16 (16 + 16 + 9), V = 1271: nothing is a multiple of anything.
    hidden, weight, bias, targets = make_inputs(41, 24, 1271, dtype, device, bias=with_bias)
    check_against_oracle(hidden, weight, bias, targets, reduction=reduction, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 41, 1000, None])
def test_chunk_sizes_agree(chunk_size):
    hidden, weight, bias, targets = make_inputs(41, 8, 97, torch.float64)
    check_against_oracle(hidden, weight, bias, targets, reduction="mean", chunk_size=chunk_size)


def test_default_chunk_size():
    assert chunked_ce.default_chunk_size(151_936) == 512  # Qwen2.5: [512, V] fp32 logits, 297 MiB
    assert chunked_ce.default_chunk_size(1271) == 4096
    assert chunked_ce.default_chunk_size(1 << 30) == 16
    for v in (1, 2, 3, 1000, 32_000, 151_936, 262_144):
        c = chunked_ce.default_chunk_size(v)
        assert c & (c - 1) == 0 and 16 <= c <= 4096


def test_leading_dims():
    hidden, weight, bias, targets = make_inputs(12, 8, 31, torch.float64)
    h3 = hidden.detach().reshape(3, 4, 8).requires_grad_()
    rows = ugd_ops.linear_cross_entropy(h3, weight, targets.reshape(3, 4), bias=bias, reduction="none")
    assert rows.shape == (3, 4)
    flat = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="none")
    torch.testing.assert_close(rows.reshape(-1), flat)


@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_ignore_index(ignore_index):
    hidden, weight, bias, targets = make_inputs(30, 8, 50, torch.float64, ignore_every=0)
    targets[::3] = ignore_index
    if ignore_index == 7:
        targets[1] = 7  # a real class id used as the ignore index: that row is ignored too
    for reduction in ("mean", "sum", "none"):
        check_against_oracle(hidden, weight, bias, targets, reduction=reduction, chunk_size=8,
                             ignore_index=ignore_index)
    rows = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="none",
                                        ignore_index=ignore_index)
    ignored = targets == ignore_index
    assert (rows[ignored] == 0).all() and (rows[~ignored] > 0).all()
    (gh,) = torch.autograd.grad(rows.sum(), hidden)
    assert (gh[ignored] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_all_rows_ignored(reduction, per_sample):
    """Every row ignored: the loss is 0 and every gradient 0, never NaN. (F.cross_entropy's "mean"
    gives 0/0 = NaN here; ugd_ops chose 0 so that a batch without reason tokens adds nothing.)"""
    if per_sample and reduction == "none":
        pytest.skip("per_sample needs a reducing reduction")
    hidden, weight, bias, targets = make_inputs(9, 4, 11, torch.float32, ignore_every=0)
    targets.fill_(-100)
    ids = torch.arange(9) // 3 if per_sample else None
    loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, per_sample=ids)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_no_rows():
    hidden, weight, bias, targets = make_inputs(0, 4, 11, torch.float32, ignore_every=0)
    for reduction in ("mean", "sum"):
        loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction)
        assert float(loss.detach()) == 0.0
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert gh.shape == (0, 4) and (gw == 0).all()
    assert ugd_ops.linear_cross_entropy(hidden, weight, targets, reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    """Logits of +-1e4: the max and the log-sum are kept apart, nothing overflows."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], dtype=dtype, requires_grad=True)
    weight = torch.tensor([[1e4, 0.0], [-1e4, 0.0], [0.0, 1e4], [0.0, -1e4], [6e3, 6e3]], dtype=dtype,
                          requires_grad=True)
    targets = torch.tensor([1, 3, 3, 0])  # the targets are the least likely classes: losses of order 1e4
    for reduction in ("none", "mean"):
        loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=3)
        grads = torch.autograd.grad(loss.sum(), (hidden, weight))
        for t in (loss, *grads):
            assert torch.isfinite(t).all()
        if dtype != torch.bfloat16:  # bf16 CPU logits are rounded to bf16 (a spacing of 64 at 1e4)
            want = oracle(*leaves64(hidden, weight), targets, reduction=reduction)
            torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-6, atol=1e-6)
    # the confident and right rows: loss 0 to fp32 precision
    right = ugd_ops.linear_cross_entropy(hidden.detach(), weight.detach(), torch.tensor([0, 2, 4, 1]),
                                         reduction="none")
    assert torch.isfinite(right).all() and float(right.abs().max()) < 1e-3


def per_sample_by_hand(hidden, weight, bias, targets, ids, reduction, ignore_index=-100):
    """L_gen of docs/spec.md section 5 (paper eq. 3) written out: per sample, the mean of its non-ignored
    rows' losses; then the mean (or sum) over the samples that have at least one such row."""
    rows = oracle(hidden, weight, targets, bias, ignore_index, "none")
    ids = torch.as_tensor(ids).cpu()
    per_sample = []
    for s in sorted(set(ids.tolist())):
        keep = (ids == s) & (targets != ignore_index)
        if keep.any():
            per_sample.append(rows[keep].mean())
    if not per_sample:
        return rows.sum() * 0
    total = torch.stack(per_sample).sum()
    return total / len(per_sample) if reduction == "mean" else total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample(device, reduction):
    hidden, weight, bias, targets = make_inputs(14, 8, 23, torch.float64, device, ignore_every=0)
    # sample 0: rows 0-4 (row 2 ignored); 1: rows 5-6; 2: rows 7-12 (all ignored -> left out); 3: row 13
    ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3], device=device)
    targets[2] = -100
    targets[7:13] = -100
    loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, per_sample=ids,
                                        chunk_size=4)
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want = per_sample_by_hand(h64, w64, b64, targets.cpu(), ids.cpu(), reduction)
    torch.testing.assert_close(loss.detach().cpu(), want.detach(), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss * 2.5, (hidden, weight, bias))
    ref = torch.autograd.grad(want * 2.5, (h64, w64, b64))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-12)
    # the ids of ignored rows do not matter (padding may carry any id, -1 included)
    ids2 = ids.clone()
    ids2[7:13] = -1
    loss2 = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, per_sample=ids2)
    torch.testing.assert_close(loss2, loss)


def test_per_sample_in_any_order_and_against_oracle():
    hidden, weight, bias, targets = make_inputs(40, 8, 37, torch.float32)
    ids = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(3))
    for reduction in ("mean", "sum"):
        check_against_oracle(hidden, weight, bias, targets, reduction=reduction, chunk_size=6, per_sample=ids)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias", "hidden+weight", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_of_a_subset(which, reduction):
    """Only the gradients asked for are computed; each one still right."""
    hidden, weight, bias, targets = make_inputs(19, 6, 29, torch.float64)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        t.requires_grad_(name in which)
    loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, chunk_size=5)
    if which == "none":
        assert not loss.requires_grad
        return
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want = oracle(h64, w64, targets, b64, reduction=reduction)
    up = torch.linspace(-2, 3, want.numel(), dtype=torch.float64).reshape(want.shape)
    inputs = [t for t in (hidden, weight, bias) if t.requires_grad]
    inputs64 = [t64 for t, t64 in zip((hidden, weight, bias), (h64, w64, b64)) if t.requires_grad]
    for g, r in zip(torch.autograd.grad((loss * up).sum(), inputs), torch.autograd.grad((want * up).sum(), inputs64)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_without_precomputed_gradients(reduction):
    """Calling the operator itself without asking for gradients: the backward recomputes them."""
    hidden, weight, bias, targets = make_inputs(11, 6, 13, torch.float64)
    ids = torch.arange(11) % 3
    loss, gh, gw, gb = ops.linear_cross_entropy_fwd(hidden, weight, targets, bias, ids, -100, reduction, 4, False,
                                                    False, False)
    assert gh.shape == gw.shape == gb.shape == (0,)
    got = torch.autograd.grad(loss * 1.5, (hidden, weight, bias))
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want = oracle(h64, w64, targets, b64, reduction=reduction, per_sample=ids)
    for g, r in zip(got, torch.autograd.grad(want * 1.5, (h64, w64, b64))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    hidden, weight, bias, targets = make_inputs(7, 3, 5, torch.float64, ignore_every=3)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    for reduction, per_sample in (("mean", None), ("sum", None), ("none", None), ("mean", ids)):
        assert torch.autograd.gradcheck(
            lambda h, w, b: ugd_ops.linear_cross_entropy(h, w, targets, bias=b, reduction=reduction,
                                                         per_sample=per_sample, chunk_size=3),
            (hidden, weight, bias))


def test_no_grad():
    hidden, weight, bias, targets = make_inputs(5, 4, 7, torch.float32)
    with torch.no_grad():
        loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias)
    assert not loss.requires_grad
    want = oracle(*leaves64(hidden, weight), targets, leaves64(bias)[0])
    assert_close(loss, want, TOL[torch.float32]["cross_entropy"])  # atol not scaled here


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_never_whole(reduction):
    """No tensor of the forward or the backward holds more than chunk_size x V elements (nor the
    weight's V x H): the [N, V] logits never exist."""
    N, H, V, chunk = 256, 4, 300, 16
    hidden, weight, bias, targets = make_inputs(N, H, V, torch.float32)
    with _LargestTensor() as mode:
        loss = ugd_ops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction,
                                            chunk_size=chunk)
        torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert mode.largest <= max(chunk * V, V * H, N * H) < N * V


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,per_sample", [("mean", False), ("sum", False), ("none", False), ("mean", True)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_forward(device, reduction, per_sample, with_bias):
    hidden, weight, bias, targets = make_inputs(13, 8, 37, torch.float32, device, bias=with_bias, ignore_every=4)
    ids = (torch.arange(13, device=device) // 4) if per_sample else None
    pre = reduction != "none"
    for flags in ((pre, pre, pre and with_bias), (False, False, False)):
        torch.library.opcheck(ops.linear_cross_entropy_fwd.default,
                              (hidden, weight, targets, bias, ids, -100, reduction, 5, *flags))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    hidden, weight, bias, targets = make_inputs(13, 8, 37, torch.float32, device)
    args = [x.detach() for x in (hidden, weight, bias)]
    grad_rows = torch.randn(13, device=device)
    for flags in ((True, True, True), (False, True, False)):
        torch.library.opcheck(ops.linear_cross_entropy_bwd.default,
                              (grad_rows, args[0], args[1], targets, args[2], -100, 5, *flags))


def test_compile_fullgraph():
    """A step using the loss compiles as one graph and matches eager (values and gradients)."""
    hidden, weight, bias, targets = make_inputs(24, 8, 53, torch.float32)
    proj = torch.randn(8, 8, requires_grad=True)
    ids = torch.arange(24) // 6

    def step(hidden, proj, weight, bias):
        h = torch.tanh(hidden @ proj)
        gen = ugd_ops.linear_cross_entropy(h, weight, targets, bias=bias, per_sample=ids, chunk_size=7)
        rows = ugd_ops.linear_cross_entropy(h, weight, targets, reduction="none")
        return gen + 0.1 * rows.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    params = (hidden, proj, weight, bias)
    eager_loss = step(*params)
    eager_grads = torch.autograd.grad(eager_loss, params)
    comp_loss = compiled(*params)
    comp_grads = torch.autograd.grad(comp_loss, params)
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change,message", [
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(reduction="none", per_sample=torch.zeros(4, dtype=torch.int64)), "per_sample needs reduction"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), "targets must be int64"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), "targets must be \\[N\\]"),
    (dict(targets=torch.tensor([0, 1, 7, 2])), "targets must lie in \\[0, V\\)"),
    (dict(targets=torch.tensor([0, 1, -3, 2])), "targets must lie in \\[0, V\\)"),
    (dict(weight=torch.zeros(7, 3)), "weight must be \\[V, H\\] with H = 5"),
    (dict(weight=torch.zeros(7, 5, dtype=torch.float64)), "weight must have the dtype of hidden"),
    (dict(bias=torch.zeros(6)), "bias must be \\[V\\] with V = 7"),
    (dict(hidden=torch.zeros(4, 5, dtype=torch.int64)), "hidden must be float32"),
    (dict(per_sample=torch.tensor([0, 0, 4, 1])), "per_sample ids of non-ignored rows must lie in \\[0, N\\)"),
    (dict(per_sample=torch.zeros(4, dtype=torch.int32)), "per_sample must be int64"),
    (dict(chunk_size=0), "chunk_size must be positive"),
])
def test_bad_arguments(change, message):
    args = dict(hidden=torch.randn(4, 5), weight=torch.randn(7, 5), targets=torch.tensor([0, 1, 6, -100]),
                bias=None, reduction="mean", per_sample=None, chunk_size=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ugd_ops.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp32_output_matmuls(dtype):
    """On CUDA, bf16 / fp16 logits come out of an fp32-output matmul and grad_weight is accumulated by an
    fp32-output addmm: both must be taken (not the fallback) and be at least as accurate as on the CPU."""
    hidden, weight, bias, targets = make_inputs(300, 64, 5000, dtype, "cuda")
    check_against_oracle(hidden, weight, bias, targets, reduction="mean", chunk_size=64,
                         tol=TOL[dtype]["cross_entropy"] / 2)
    assert chunked_ce._MM_OUT_DTYPE_OK == {"mm": True, "addmm": True}


@requires_cuda
def test_cuda_memory_below_full_logits():
    """The peak memory of a forward+backward stays far below that of the [N, V] fp32 logits, and below
    half of what eager F.cross_entropy over the full logits takes."""
    N, H, V, chunk = 2048, 256, 32_000, 128
    hidden, weight, bias, targets = make_inputs(N, H, V, torch.bfloat16, "cuda", bias=False)

    def peak(fn):
        fn().backward()  # warm-up: cuBLAS workspaces and the like are allocated before the baseline
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda: ugd_ops.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk))
    eager = peak(lambda: F.cross_entropy((hidden @ weight.t()).float(), targets))
    full_logits = N * V * 4
    # chunk buffers (6 bytes x chunk x V) + fp32 grad_weight accumulator + the grads themselves
    assert ours < 6 * chunk * V + 4 * V * H + 2 * (V * H + N * H) + (1 << 24) < full_logits
    assert ours < eager / 2


def test_the_oracle_is_independent_of_the_op(monkeypatch):
    """The per-sample oracle used to call chunked_ce.row_weights, the op's own weighting: a bug there
    passed. With chunked_ce's helpers broken the oracle still gives the loss written out by hand."""
    hidden, weight, bias, targets = make_inputs(12, 6, 11, torch.float64, ignore_every=4)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want = {r: oracle(h64, w64, targets, b64, reduction=r, per_sample=ids).item() for r in ("mean", "sum")}

    def broken(*args, **kwargs):
        raise AssertionError("the oracle called ugd_ops' own code")

    monkeypatch.setattr(chunked_ce, "row_weights", broken)
    monkeypatch.setattr(chunked_ce, "linear_cross_entropy_eager", broken)
    logits = h64.detach() @ w64.detach().t() + b64.detach()
    rows = F.cross_entropy(logits, targets, reduction="none")
    by_sample = [rows[(ids == s) & (targets != -100)].mean() for s in range(4) if ((ids == s) & (targets != -100)).any()]
    assert oracle(h64, w64, targets, b64, reduction="sum", per_sample=ids).item() == pytest.approx(
        float(sum(by_sample)), rel=1e-12) == pytest.approx(want["sum"], rel=1e-12)
    assert oracle(h64, w64, targets, b64, reduction="mean", per_sample=ids).item() == pytest.approx(
        float(sum(by_sample)) / len(by_sample), rel=1e-12) == pytest.approx(want["mean"], rel=1e-12)

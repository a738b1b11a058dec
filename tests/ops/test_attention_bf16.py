"""The bf16 path of the CPU partitioned-attention kernel (csrc/cpu/bf16_gemm.h, attention_bf16.h).

Every backend this CPU can run (UGD_CPU_BF16_GEMM: avx512bf16 where the CPU has it; brgemm, which
runs anywhere, packed on AMX and unpacked elsewhere; loop, the fp32-converted kernel) is held to the
2x rule: values and gradients within twice the error of PyTorch's own bf16 SDPA against a float64
reference, on the shapes and layouts of test_attention.py. Results must not depend on the thread count.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from tests.numerics import assert_within_2x_of_torch
from tests.ops.test_attention import MASKS, SHAPES, awkward_spans, check_against_oracle, layout, randn
from tests.oracles import attention_dense, mask_from_intervals

import ugd_ops
from ugd_ops.workloads import random_spans


def _info() -> dict:
    return json.loads(torch.ops.ugd_ops.build_info())


def _cpu_flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return name in f.read().split()
    except OSError:
        return False


# the reference backend (nothing compiled) reports no CPU kernels
COMPILED = _info().get("cpu") is not None
pytestmark = pytest.mark.skipif(not COMPILED, reason="the compiled CPU kernels are not built")
UNITS = (_info().get("cpu") or {}).get("bf16_units", "none")


def _backends() -> list:
    return (["avx512bf16"] if _cpu_flag("avx512_bf16") else []) + ["brgemm", "loop"]


BACKENDS = _backends()
# brgemm unpacked (no AMX) is a slow generic loop: held to the small layouts only
FAST = [b for b in BACKENDS if b != "brgemm" or UNITS == "amx+brgemm"]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("UGD_CPU_BF16_GEMM", request.param)
    return request.param


def _within_2x(q, k, v, lay, mask, seed=9, what=""):
    """out, dq, dk, dv of the kernel and of SDPA (bf16, dense mask, GQA by repeating heads) against the
    float64 truth, absolute errors (scale 1: these are of order 1), floor 1e-6."""
    Hq, Hkv = q.shape[1], k.shape[1]
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    g = randn(q.shape, q.dtype, "cpu", seed)
    out = ugd_ops.partitioned_attention(q, k, v, *lay)
    ours = [out, *torch.autograd.grad(out, (q, k, v), g)]
    qs = q.transpose(0, 1)[None]
    ks_ = k.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)[None]
    vs = v.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)[None]
    sdpa = F.scaled_dot_product_attention(qs, ks_, vs, attn_mask=mask)[0].transpose(0, 1)
    theirs = [sdpa, *torch.autograd.grad(sdpa, (q, k, v), g)]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    truth, _ = attention_dense(qd, kd, vd, mask, q.shape[-1] ** -0.5)
    truths = [truth, *torch.autograd.grad(truth, (qd, kd, vd), g.double())]
    for name, a, b, w in zip(["out", "dq", "dk", "dv"], ours, theirs, truths):
        assert_within_2x_of_torch(a, b, w, floor=1e-6, scale=1.0, what=f"{what} {name}")


def _inputs(T, Hq, Hkv, D, seed=0):
    return [randn((T, h, D), torch.bfloat16, "cpu", seed + i) for i, h in enumerate((Hq, Hkv, Hkv))]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_random_layouts_within_2x_of_sdpa(backend, shape, mask_kind):
    Hq, Hkv, D = SHAPES[shape]
    spans = random_spans(4, seed=7, max_len=45 if backend in FAST else 12, allow_empty=False)
    lay, mask = layout(spans, mask_kind)
    _within_2x(*_inputs(int(lay[0][-1]), Hq, Hkv, D), lay, mask, what=f"{backend} {shape} {mask_kind}")


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("L", [1, 17, 127, 300])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_awkward_lengths_within_2x_of_sdpa(backend, L, mask_kind):
    """Lengths 1, 17 (odd: padded pairs), 127, 300 (past the backward's fused pass: the split passes);
    empty P and G spans."""
    lay, mask = layout(awkward_spans(L, mask_kind), mask_kind)
    _within_2x(*_inputs(int(lay[0][-1]), 6, 1, 64), lay, mask, what=f"{backend} L={L} {mask_kind}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mask_kind", ["ttm", "causal"])
def test_long_sequence_every_backend(backend, mask_kind):
    """A 300-token sequence (the backward's split passes) on every backend, brgemm included (few heads)."""
    spans = torch.tensor([[60, 100, 40, 100], [3, 2, 1, 1]], dtype=torch.int32)
    if mask_kind == "causal":
        spans = torch.tensor([[300, 0, 0, 0], [7, 0, 0, 0]], dtype=torch.int32)
    lay, mask = layout(spans, mask_kind)
    _within_2x(*_inputs(int(lay[0][-1]), 2, 1, 16), lay, mask, what=f"{backend} long {mask_kind}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("D", [5, 17])
def test_odd_head_dims(backend, D):
    """An odd D pads the products' pairs with zeros (SDPA runs the same D)."""
    spans = random_spans(3, seed=2, max_len=10, allow_empty=False)
    lay, mask = layout(spans, "ttm")
    _within_2x(*_inputs(int(lay[0][-1]), 4, 2, D), lay, mask, what=f"{backend} D={D}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_rows_and_sequences(backend):
    """Rows with empty intervals (output 0, lse -inf) and an empty sequence; SDPA gives NaN on empty
    rows, so against the float64 oracle with the bf16 tolerance of test_attention.py."""
    cu = [0, 70, 70, 75]
    ks = [(i * 7) % 40 for i in range(70)] + [0, 1, 2, 0, 5]
    ke = [min(70, s + (i % 5) * 9) for i, s in enumerate(ks[:70])] + [0, 3, 2, 5, 5]
    lay = [torch.tensor(x, dtype=torch.int32) for x in (cu, ks, ke)]
    mask = mask_from_intervals(cu, ks, ke)
    q, k, v = _inputs(75, 4, 2, 32)
    check_against_oracle(q, k, v, lay, mask)
    out = ugd_ops.partitioned_attention(q, k, v, *lay)
    assert bool((out[mask.sum(1) == 0] == 0).all())


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_thread_count_invariance(backend):
    """Bit-identical values and gradients on 1, 2 and 3 threads (fused and split backward passes)."""
    spans = torch.cat([random_spans(5, seed=3, max_len=60), torch.tensor([[90, 120, 40, 50]], dtype=torch.int32)])
    lay, _ = layout(spans, "ttm")
    q, k, v = (x.requires_grad_() for x in _inputs(int(lay[0][-1]), 6, 2, 64))
    g = randn(q.shape, torch.bfloat16, "cpu", 5)
    n0 = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = ugd_ops.partitioned_attention(q, k, v, *lay, return_lse=True)
            runs.append((out, lse, *torch.autograd.grad(out, (q, k, v), g)))
    finally:
        torch.set_num_threads(n0)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_backend_choice_is_reported():
    """build_info names the CPU's bf16 units and the backend the bf16 products use by default."""
    cpu = _info()["cpu"]
    assert (cpu["bf16_units"] != "none") == (_cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16"))
    assert cpu["bf16_units"] in ("amx+brgemm", "avx512bf16", "none")
    assert cpu["bf16_gemm"] == {"amx+brgemm": "brgemm", "avx512bf16": "avx512bf16", "none": "loop"}[cpu["bf16_units"]]


def test_info_names_the_bf16_units():
    from ugd_ops import info

    line = next(x for x in info.report().splitlines() if x.startswith("CPU bf16 units:"))
    assert UNITS in line and _info()["cpu"]["bf16_gemm"] in line


def test_bf16_products_really_change_with_backend(monkeypatch):
    """The forced backends run different code: bf16-rounded P (avx512bf16/brgemm) against fp32 P (loop)."""
    spans = random_spans(2, seed=1, max_len=12, allow_empty=False)
    lay, _ = layout(spans, "stm")
    q, k, v = _inputs(int(lay[0][-1]), 2, 1, 64)
    outs = {}
    for b in BACKENDS:
        monkeypatch.setenv("UGD_CPU_BF16_GEMM", b)
        outs[b] = ugd_ops.partitioned_attention(q, k, v, *lay)
    for b in BACKENDS:
        if b != "loop":
            assert not torch.equal(outs["loop"], outs[b]), b


def test_bad_backend_name_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("UGD_CPU_BF16_GEMM", "amx")
    q, k, v = _inputs(4, 1, 1, 8)
    lay = [torch.tensor(x, dtype=torch.int32) for x in ([0, 4], [0] * 4, [4] * 4)]
    with pytest.raises(ValueError, match="UGD_CPU_BF16_GEMM must be brgemm, avx512bf16 or loop"):
        ugd_ops.partitioned_attention(q, k, v, *lay)
